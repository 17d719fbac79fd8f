"""Where a run's numbers go: `metrics.jsonl` always, Weights & Biases when asked; memory and
progress readings."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from lozo_exp.config import ConfigError, LoggerConfig

log = logging.getLogger(__name__)


def require_wandb(cfg: LoggerConfig) -> None:
    """Fail at start, not after training, when W&B is asked for but missing."""
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                "logger=wandb needs the wandb package, which is not installed: "
                "pip install wandb (or use logger=local)"
            ) from err


class MetricsLog:
    """Appends one JSON record per line, flushed at once so a crash keeps what was logged."""

    def __init__(self, out_dir: Path, cfg: LoggerConfig, run_name: str, config: dict[str, Any]):
        self.file = (out_dir / "metrics.jsonl").open("a")
        self.wandb = None
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.project, name=run_name, mode=cfg.mode, dir=str(out_dir), config=config
            )

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def resolve_device(name: str) -> torch.device:
    """`trainer.device`: "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so host clocks time what ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device, reset: bool = True) -> float:
    """Peak GPU memory allocated since the last reset; on CPU, the process's peak RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A log line with rate and ETA, at most once every `every_s` seconds (and at the end)."""

    def __init__(self, what: str, total: int, every_s: float, start: int = 0):
        self.what, self.total, self.every_s, self.first = what, total, every_s, start
        self.start = self.last = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        """Log if `every_s` has passed since the last line (at the end: since the start)."""
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = (done - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        log.info(
            "%s %d/%d (%.0f%%)%s | %.2f/s | elapsed %s | ETA %s",
            self.what,
            done,
            self.total,
            100 * done / max(self.total, 1),
            f" {note}" if note else "",
            rate,
            _clock(now - self.start),
            _clock(eta),
        )
