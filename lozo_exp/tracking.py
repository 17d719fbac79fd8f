"""Where a run's numbers go: `metrics.jsonl` always, plus Weights & Biases and/or TensorBoard
when the logger config asks (`logger=[wandb,tensorboard]`); memory and progress readings."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from lozo_exp.config import ConfigError, LoggerConfig

log = logging.getLogger(__name__)

DEVICES = "auto, cpu, cuda, cuda:N or mps"

PROC_STATUS = Path("/proc/self/status")  # Linux: VmHWM, the peak resident memory
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")  # writing 5 resets VmHWM


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The entries that are numbers (not strings, flags or None)."""
    return {
        k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _named(prefix: str, scores: dict[str, Any]) -> dict[str, float]:
    """`{prefix}/{key}` for the numbers in `scores` (`dev_loss` under "dev" is `dev/loss`)."""
    return {f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in _numbers(scores).items()}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A `metrics.jsonl` record as the loggers' scalars: a training record's numbers as
    `train/<key>`, a dev evaluation's as `dev/<key>`. Strings (`split`, `status`) are not
    metrics, and the final record's numbers go to the run summary instead."""
    split = record.get("split", "train")
    if split == "final":
        return {}
    return _named(split, {k: v for k, v in record.items() if k != "step"})


def run_summary(results: dict[str, Any]) -> dict[str, Any]:
    """What a run ended with: the selected dev evaluation's metrics (`dev/<key>`), every test
    set's (`test/<set>/<key>`, e.g. `test/test_matched/accuracy`) and its status and costs."""
    summary: dict[str, Any] = _named("dev", results.get("dev") or {})
    for name, scores in (results.get("test_sets") or {}).items():
        summary.update(_named(f"test/{name}", scores))
    keys = ("status", "steps", "best_step", "wall_time_s", "peak_mem_mb")
    return summary | {k: results[k] for k in keys if results.get(k) is not None}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": value}; lists (and empty dicts) become JSON strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | dict) else value
    return flat


class Sink(Protocol):
    """A logger besides `metrics.jsonl`: scalars by step, then the run's summary."""

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class WandbSink:
    """A W&B run named by its directory, grouped by `logger.group` (in a sweep: the sweep's
    directory); its summary holds the test and the selected dev metrics."""

    def __init__(self, cfg: LoggerConfig, out_dir: Path, name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            name=name,
            mode=cfg.mode,
            dir=str(out_dir),
            config=config,
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        # Commit the last step's row first: committed later, it would overwrite the summary's
        # dev metrics with the last evaluation's.
        self.run.log({}, commit=True)
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary.get("status", "completed") == "completed" else 1)


class TensorBoardSink:
    """Event files in `<run dir>/tensorboard`: the same scalars, then the run's hyperparameters
    with its final metrics for TensorBoard's HParams view (the selected dev metrics as
    `best_dev/<key>`, beside the `dev/<key>` series)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.hparams = {k: v for k, v in flatten(config).items() if not k.startswith("logger.")}
        self.step = 0

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what was logged
        self.step = step

    def finish(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = {re.sub(r"^dev/", "best_dev/", k): v for k, v in _numbers(summary).items()}
        for part in hparams(self.hparams, metrics):
            self.writer.file_writer.add_summary(part, self.step)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, self.step)
        self.writer.close()


class MetricsLog:
    """Appends one JSON record per line to `metrics.jsonl`, flushed at once so a crash keeps
    what was logged, and sends the same records to the loggers the config asks for."""

    def __init__(
        self,
        out_dir: Path,
        cfg: LoggerConfig,
        run_name: str,
        config: dict[str, Any],
        active: bool = True,  # False: writes nothing (a run's other processes)
    ):
        self.sinks: list[Sink] = []  # first: a W&B that cannot start leaves no metrics.jsonl
        self.file = None
        if not active:
            return
        if cfg.wandb:
            try:
                self.sinks.append(WandbSink(cfg, out_dir, run_name, config))
            except Exception as err:  # wandb's own errors (login, network, settings)
                raise ConfigError(
                    f"logger=wandb could not start ({type(err).__name__}: {err}); check "
                    f"logger.mode and your W&B login, or use logger=local"
                ) from err
        if cfg.tensorboard:
            self.sinks.append(TensorBoardSink(out_dir, config))
        self.file = (out_dir / "metrics.jsonl").open("a")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = scalars(record)
        if values:
            for sink in self.sinks:
                sink.log(values, record["step"])

    def close(self, results: dict[str, Any] | None = None) -> None:
        """Close the file; the loggers get the run's summary from `results` (results.json)."""
        if self.file is not None:
            self.file.close()
        summary = run_summary(results or {})
        for sink in self.sinks:
            sink.finish(summary)


def device_problems(name: str) -> list[str]:
    """A `trainer.device` this machine does not have, found before the model loads."""
    if name == "auto":
        return []
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return [f"trainer.device={name!r} is not a device; use {DEVICES}"]
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            return [
                f"trainer.device={name} but no CUDA GPU is visible to torch here: use "
                f"trainer.device=cpu (or auto: cuda when available)"
            ]
        if device.index is not None and device.index >= count:
            return [f"trainer.device={name} but {count} GPU(s) are visible: cuda:0..{count - 1}"]
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return [f"trainer.device={name} but MPS is not available here: use trainer.device=cpu"]
    elif device.type not in ("cpu", "cuda", "mps"):
        return [f"trainer.device={name!r} is not supported; use {DEVICES}"]
    return []


def resolve_device(name: str) -> torch.device:
    """`trainer.device`: "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so host clocks time what ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_capacity(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere (no fixed limit to check)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last reading, which resets it: GPU memory allocated on CUDA,
    resident memory on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident memory since the last reading, which resets it. On Linux,
    VmHWM, which writing 5 to /proc/self/clear_refs resets to the current RSS, so each job of a
    sweep run in one process reads its own peak; elsewhere the process's lifetime peak
    (ru_maxrss)."""
    try:
        hwm = re.search(r"^VmHWM:\s+(\d+) kB", PROC_STATUS.read_text(), re.M)
    except OSError:
        hwm = None
    if hwm is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
        return maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    with contextlib.suppress(OSError):  # a read-only /proc: the lifetime peak, as above
        PROC_CLEAR_REFS.write_text("5")
    return int(hwm[1]) / 2**10


def reset_peak_memory(device: torch.device) -> None:
    """Start this job's peak-memory reading (a sweep's jobs share a process): on CUDA, from
    what is allocated once the memory earlier jobs left is freed."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    peak_memory_mb(device)


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
        """Log if `every_s` has passed since the last line, and at the end (`done == total`)."""
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
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
