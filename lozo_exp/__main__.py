"""`python -m lozo_exp [overrides]`: compose the config with Hydra, run, print where results are.

Bad settings and unreachable data end with one readable paragraph and a non-zero exit status
before any model is loaded; in a multirun (`-m`) a failing job is reported and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse


def _go_offline_if_hub_unreachable() -> None:
    """Without this, every hub lookup on an offline machine retries for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


_go_offline_if_hub_unreachable()

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from lozo_exp.config import ConfigError, RunConfig, register_configs  # noqa: E402
from lozo_exp.runner import TrainingDiverged, run  # noqa: E402

log = logging.getLogger("lozo_exp")
register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.info("HF_HUB_OFFLINE=1: reading only local files and the hub cache")
    try:
        cfg: RunConfig = OmegaConf.to_object(dict_cfg)
        results = run(cfg, out_dir)
    except (ConfigError, TrainingDiverged) as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:  # report the job and let the sweep go on
            log.error("job %d failed: %s", hydra_cfg.job.num, err)
            return None
        print(f"\nlozo-exp: {err}", file=sys.stderr)
        sys.exit(1)
    log.info("results: %s", out_dir / "results.json")
    print(f"Results are in {out_dir}: results.json, metrics.jsonl, .hydra/")
    dev = results.get("dev") or {}
    return dev.get(results["metric"])


if __name__ == "__main__":
    main()
