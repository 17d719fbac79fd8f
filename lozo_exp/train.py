"""`lozo-exp [train] [overrides]`: compose the run config with Hydra, run it, say where results are.

A bad setting ends with one readable paragraph and exit status 1, before any model is loaded.
In a sweep (`-m`) a job that fails still leaves `results.json` with `status` and `error`, the
sweep goes on, and a summary of every job closes it (`lozo_exp.outputs.SweepSummary`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lozo_exp import cli, outputs
from lozo_exp.config import ConfigError, check_overrides

log = logging.getLogger("lozo_exp")


def train(dict_cfg: DictConfig) -> float | None:
    """One Hydra job. Returns the dev metric the paper reports (what an Optuna search
    maximises), or None for a job without one (failed, rejected, diverged): a failed trial."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    cli.set_verbosity(bool(hydra_cfg.verbose))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.info("HF_HUB_OFFLINE=1: reading only local files and the hub cache")
    cfg = None
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        # A single run's directory was claimed before Hydra wrote to it (StartGuard); a sweep
        # job's is claimed here. Released once the job's results are written.
        outputs.claim_run_dir(out_dir, "hydra.sweep.dir" if multirun else "hydra.run.dir")
        cfg = cli.to_object(dict_cfg)
        if multirun and cfg.logger.group is None:
            cfg.logger.group = outputs.run_name(Path(hydra_cfg.sweep.dir))  # shared by its jobs
        from lozo_exp.models import resolve_model  # torch: only once a job runs
        from lozo_exp.runner import run

        cfg.model = resolve_model(cfg.model)  # a family read from the checkpoint is known
        check_overrides(cfg, hydra_cfg.overrides.task)
        results = run(cfg, out_dir)
    except Exception as err:
        outputs.record_failure(out_dir, err, cfg)
        outputs.release_run_dir(out_dir)
        status = outputs.read_status(out_dir)
        if multirun:
            log.error("job %d %s (%s): %s", hydra_cfg.job.num, status, out_dir, err)
            return None  # the sweep goes on
        if isinstance(err, ConfigError) or status == "diverged":
            cli.fail(err)  # one paragraph; a crash keeps its traceback
        raise
    outputs.release_run_dir(out_dir)
    log.info("results: %s", out_dir / outputs.RESULTS)
    print(f"Results are in {out_dir}: results.json, metrics.jsonl, .hydra/")
    dev = results.get("dev") or {}
    return dev.get(results["metric"])


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_hydra(train, "config", argv)


if __name__ == "__main__":
    main()
