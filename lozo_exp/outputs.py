"""Where runs write, and the rule that keeps one run from overwriting another.

A directory *holds a run* when it has `metrics.jsonl`, `checkpoint.json`, or a `results.json`
whose status is not "rejected" (a run refused before it started, for a bad config or missing
data, leaves its directory free to reuse), or while another process's run uses it.
`check_output_dir` is the one place that decides whether a run may write to a directory, and
whether it continues the run there (resume: `lozo-exp resume=DIR`, or a requeued job). A run
*claims* its directory atomically before anything is written (`claim_run_dir`: an exclusive
lock on `<dir>/.lozo-lock`, held until the run ends, released by the kernel if the process
dies), so of two runs started together into one directory, one gets a clear error. The entry
module claims before Hydra writes anything (`lozo_exp.cli.StartGuard`; a sweep claims its
directory). `SweepSummary` reports a sweep's jobs at its end; `job_dirname` names job
directories by their values.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lozo_exp.config import ConfigError, RunConfig

RESULTS = "results.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.json"  # a run that can be resumed has one (`lozo_exp.checkpoint`)
REJECTED = "rejected"
FINISHED = ("completed", "diverged")  # a sweep with a job in any other state exits non-zero
CONFIG_GROUPS = ("model", "task", "method", "trainer")  # results.json's `<group>_config` keys
LOCK = ".lozo-lock"  # locked by the process whose run uses the directory; says which one
RESUME = ("never", "allow", "require")
"""May a run continue the run its directory holds: never (a new run: `lozo_exp.run`, a fresh
command), allow (a Hydra job: a job that SLURM requeued finds its own run there), require
(`lozo-exp resume=DIR`)."""


class RunDirTaken(ConfigError):
    """The output directory already holds a run, or another run is using it."""


class RunFinished(Exception):
    """The run to resume has finished (completed or diverged): there is nothing to continue."""


def read_results(directory: Path) -> dict[str, Any]:
    """`directory/results.json`; {} without one, status "unreadable" when it cannot be parsed."""
    try:
        results = json.loads((directory / RESULTS).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        return {"status": "unreadable", "error": str(err)}
    return results if isinstance(results, dict) else {"status": "unreadable"}


def read_status(directory: Path) -> str | None:
    """The `status` in `directory/results.json`, None without one."""
    results = read_results(directory)
    return results.get("status", "unknown") if results else None


def run_record(directory: Path) -> str | None:
    """The file that shows `directory` holds a run, or None when a run may write there."""
    for name in (METRICS, CHECKPOINT):
        if (directory / name).exists():
            return name
    status = read_status(directory)
    return RESULTS if status not in (None, REJECTED) else None


# -- claiming a directory ----------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # directories this process has claimed -> their lock's descriptor


def _key(directory: Path) -> Path:
    return Path(os.path.abspath(directory))


def _lock(path: Path) -> int | None:
    """A descriptor of `path` holding its exclusive lock, or None when another process holds
    it. (Where the file system has no flock, creating the file is the claim.)"""
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # released meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:  # no flock here
            if created:
                return fd
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder released and removed it before we locked it: again


def _user(directory: Path) -> str:
    """Who holds the directory's lock, as its file says."""
    try:
        info = json.loads((directory / LOCK).read_text())
        return f"process {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"a process that holds {directory / LOCK}"


def _in_use(directory: Path) -> bool:
    """Whether another process's run holds `directory` (its lock file is locked)."""
    if _key(directory) in _HELD:
        return False
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY)
    except OSError:
        return False  # no lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # locked; or no flock here, where the file itself is the claim
        return True
    finally:
        os.close(fd)
    return False  # left by a run that ended without removing it: nobody uses the directory


def check_output_dir(out_dir: Path, setting: str = "hydra.run.dir", resume: str = "never") -> bool:
    """Whether a run may write to `out_dir`, and whether it continues the run there (True) or
    starts a new one (False); a run never overwrites another, nor uses a directory another
    run uses. A run can be continued when it has a checkpoint and did not finish; `resume` (one
    of RESUME) says whether this one may. (The one check; `claim_run_dir` makes it atomic.)"""
    if _in_use(out_dir):
        raise RunDirTaken(
            f"output directory {out_dir} is in use by another run ({_user(out_dir)}); a run "
            f"never overwrites another: choose a new {setting}"
        )
    record = run_record(out_dir)
    if record is None:
        if resume == "require":
            raise ConfigError(f"resume={out_dir}: that directory holds no run to resume")
        return False
    status = read_status(out_dir)
    resumable = status not in FINISHED and (out_dir / CHECKPOINT).is_file()
    if resume != "never":
        if status in FINISHED:
            raise RunFinished(f"the run in {out_dir} has {status}: there is nothing to resume")
        if resumable:
            return True
        if resume == "require":
            raise ConfigError(
                f"resume={out_dir}: the run there has no checkpoint ({CHECKPOINT}), so it cannot "
                f"be resumed (it did not train, or stopped before its first step)"
            )
    hint = f", or continue it: lozo-exp resume={out_dir}" if resumable else ""
    raise RunDirTaken(
        f"output directory {out_dir} already holds a run ({out_dir / record}); a run never "
        f"overwrites another: choose a new {setting}{hint}"
    )


def claim_run_dir(out_dir: Path, setting: str = "hydra.run.dir", resume: str = "never") -> bool:
    """Claim `out_dir` for this process's run, atomically, before anything is written there:
    a run started meanwhile by another process into the same directory gets RunDirTaken, and
    so does a directory that holds a run, unless `resume` lets this run continue it (then True;
    `check_output_dir`). Claiming a directory this process holds checks it again. Held until
    `release_run_dir` or the process ends."""
    key = _key(out_dir)
    acquired = key not in _HELD
    if acquired:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = _lock(out_dir / LOCK)
        if fd is None:
            raise RunDirTaken(
                f"output directory {out_dir} is in use by another run ({_user(out_dir)}); a "
                f"run never overwrites another: choose a new {setting}"
            )
        _HELD[key] = fd
        user = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(user).encode())
    try:
        return check_output_dir(out_dir, setting, resume)
    except Exception:
        if acquired:
            release_run_dir(out_dir)
        raise


def release_run_dir(out_dir: Path) -> None:
    """Give up this process's claim on `out_dir` (nothing when it holds none)."""
    fd = _HELD.pop(_key(out_dir), None)
    if fd is not None:
        (out_dir / LOCK).unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def claimed(out_dir: Path, setting: str = "hydra.run.dir", resume: str = "never") -> Iterator[bool]:
    """`claim_run_dir` for the block (which gets whether the run continues the one there),
    released at its end unless it was held before."""
    held = _key(out_dir) in _HELD
    resuming = claim_run_dir(out_dir, setting, resume)
    try:
        yield resuming
    finally:
        if not held:
            release_run_dir(out_dir)


@atexit.register
def _release_all() -> None:
    for directory in list(_HELD):
        release_run_dir(directory)


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """What `results.json` says about the run's setting, so it reads without `.hydra/`: the
    model, task and method names, the seed and every resolved key of model, task, method and
    trainer (`<group>_config`)."""
    return {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "method": cfg.method.name,
        "seed": cfg.seed,
        **{f"{group}_config": asdict(getattr(cfg, group)) for group in CONFIG_GROUPS},
    }


def run_name(directory: Path) -> str:
    """A run's (or a sweep's) name for the loggers: its directory, relative to the working
    directory when under it. Unique: no two runs share a directory, and sweeps have their own."""
    path = Path(directory).absolute()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def record_failure(out_dir: Path, err: BaseException, cfg: RunConfig | None = None) -> None:
    """Leave `results.json` with `status` and `error` (and the setting, when the config was
    read) for a run that stopped before the runner wrote its own: "rejected" for a bad config
    or missing data, "failed" for anything else."""
    if isinstance(err, RunDirTaken) or read_status(out_dir) not in (None, REJECTED):
        return  # another run's directory, or the runner already recorded how this one ended
    rejected = isinstance(err, ConfigError)
    results = {
        "status": REJECTED if rejected else "failed",
        "error": str(err) if rejected else f"{type(err).__name__}: {err}",
        **(hyperparameters(cfg) if cfg is not None else {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")


# -- sweep job names -------------------------------------------------------------------------


def job_dirname(num: int, overrides: list[str], exclude: list[str]) -> str:
    """`<num>_<key>=<value>,...` from a job's overrides, like Hydra's `override_dirname` but
    with each key shortened to its last part (`method.lr` -> `lr`) unless two would clash, and
    long floats rounded.
    An `exclude` entry drops that key and every key under it (`logger` drops `logger.mode`)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    kept = [
        (o.key_or_group, _dir_value(o))
        for o in parsed
        if not any(o.key_or_group == e or o.key_or_group.startswith(e + ".") for e in exclude)
    ]
    tails = [key.rsplit(".", 1)[-1] for key, _ in kept]
    items = sorted(
        f"{tail if tails.count(tail) == 1 else key}={value}"
        for (key, value), tail in zip(kept, tails, strict=True)
    )
    return "_".join([str(num), ",".join(items)]) if items else str(num)


def _dir_value(override: Override) -> str:
    """An override's value in a directory name: a float to 4 significant digits (an Optuna
    trial's lr 1.2520653814999453e-06 is 1.252e-06), `/` as `_`."""
    value = override.value()
    text = format(value, ".4g") if isinstance(value, float) else None
    return (text or override.get_value_element_as_str()).replace(os.sep, "_")


def register_resolvers() -> None:
    """`${lozo_exp.job_dirname:...}` for `hydra.sweep.subdir`."""
    OmegaConf.register_new_resolver("lozo_exp.job_dirname", job_dirname, replace=True)


# -- Hydra callbacks -------------------------------------------------------------------------


def job_dirs(sweep_dir: Path) -> dict[Path, int]:
    """A sweep's job directories (each has `.hydra/`) -> when Hydra last wrote their overrides."""
    return {
        p.parent.parent: p.stat().st_mtime_ns for p in sweep_dir.glob("**/.hydra/overrides.yaml")
    }


class SweepSummary(Callback):
    """At the end of a sweep, lists its jobs by status (completed, diverged, failed, rejected;
    missing: no results.json) with their directories and errors, and exits with status 1 unless
    every job completed or diverged. Jobs are read from disk, so any launcher works."""

    def __init__(self) -> None:
        self.before: dict[Path, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.before = job_dirs(Path(config.hydra.sweep.dir))  # rejected jobs of an earlier sweep

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        started = {d: t for d, t in job_dirs(sweep_dir).items() if self.before.get(d) != t}
        jobs = sorted(started, key=started.__getitem__)  # in launch order
        by_status: dict[str, list[str]] = {}
        for job in jobs:
            results = read_results(job)
            status = results.get("status", "missing")
            error = f": {_first_line(results['error'])}" if "error" in results else ""
            by_status.setdefault(status, []).append(f"{job}{error}")
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_status.items()))
        lines = [f"Sweep {sweep_dir}: {len(jobs)} jobs ({counts})"]
        for status, entries in sorted(by_status.items()):
            lines += [f"  {status:<9} {entry}" for entry in entries]
        print("\n".join(lines))
        if set(by_status) - set(FINISHED):
            raise SystemExit(1)  # an Exception here would become a warning (Hydra's callbacks)


def _first_line(text: str, limit: int = 200) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
