"""`lozo-exp [train] [overrides]`: compose the run config with Hydra, run it, say where results are;
`lozo-exp [train] resume=RUN_DIR`: continue the run in RUN_DIR from its last checkpoint.

A bad setting ends with one readable paragraph and exit status 1, before any model is loaded.
In a sweep (`-m`) a job that fails still leaves `results.json` with `status` and `error`, the
sweep goes on, and a summary of every job closes it (`lozo_exp.outputs.SweepSummary`). A run
stopped by SIGTERM, SIGUSR1 or SIGUSR2 writes a checkpoint, says "preempted" and exits with 128
+ the signal; a Hydra job that finds its own unfinished run in its directory (SLURM requeued it)
continues it.

Under `torchrun --nproc_per_node=N -m lozo_exp ...` the main process runs Hydra (or reads the
config of the run it resumes) and sends it to the others, which run it with it
(`lozo_exp.distributed`) and write nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lozo_exp import cli, outputs
from lozo_exp.config import ConfigError, RunConfig, check_overrides
from lozo_exp.signals import Preempted

log = logging.getLogger("lozo_exp")

RESUME = "resume="


def train(dict_cfg: DictConfig) -> float | None:
    """One Hydra job. Returns the dev metric the paper reports (what an Optuna search
    maximises), or None for a job without one (failed, rejected, diverged): a failed trial."""
    hydra_cfg = HydraConfig.get()
    cli.set_verbosity(bool(hydra_cfg.verbose))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        log.info("HF_HUB_OFFLINE=1: reading only local files and the hub cache")
    out_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN

    def config() -> RunConfig:
        # A single run's directory was claimed before Hydra wrote to it (StartGuard), which
        # refuses one that holds a run; a sweep job's is claimed here. A job that finds its own
        # unfinished run there was requeued (the submitit launcher, after a preemption or a
        # time-out) and continues it.
        outputs.claim_run_dir(out_dir, "hydra.sweep.dir" if sweep else "hydra.run.dir", "allow")
        cfg = cli.to_object(dict_cfg)
        if sweep and cfg.logger.group is None:
            cfg.logger.group = outputs.run_name(Path(hydra_cfg.sweep.dir))  # shared by its jobs
        from lozo_exp.models import resolve_model  # torch: only once a job runs

        cfg.model = resolve_model(cfg.model)  # a family read from the checkpoint is known
        check_overrides(cfg, hydra_cfg.overrides.task)
        return cfg

    try:
        return run_job(config, out_dir, "allow", hydra_cfg.job.num if sweep else None)
    finally:
        outputs.release_run_dir(out_dir)  # once the job's results are written


def resume(run_dir: Path, overrides: Sequence[str], verbose: bool = False) -> float | None:
    """Continue the run in `run_dir` with the config it ran with (`.hydra/config.yaml`),
    logging to its log file too."""
    cli.start(verbose)
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    name = OmegaConf.load(hydra_yaml).hydra.job.name if hydra_yaml.is_file() else "train"
    # the run's own log, where there is a run (nothing is written into another directory)
    handler = logging.FileHandler(run_dir / f"{name}.log", delay=True)
    handler.setFormatter(logging.Formatter(cli.LOG_FORMAT))

    def stored_config() -> RunConfig:
        outputs.check_output_dir(run_dir, resume="require")  # finished, or nothing to resume?
        logging.getLogger().addHandler(handler)
        return cli.stored_run_config(run_dir, overrides)

    try:
        return run_job(stored_config, run_dir, "require")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_job(
    make_config: Callable[[], RunConfig], out_dir: Path, resume: str, job: int | None = None
) -> float | None:
    """Run one config into `out_dir`; `job`: its number in a sweep, where a failure lets the
    sweep go on."""
    cfg = None
    try:
        cfg = make_config()
        from lozo_exp import distributed  # torch: only once a job runs
        from lozo_exp.runner import run

        if distributed.world_size() > 1:
            distributed.send_run((cfg, out_dir, resume))
        results = run(cfg, out_dir, resume)
    except outputs.RunFinished as done:
        print(f"{done}; its results are in {out_dir / outputs.RESULTS}")
        return None
    except Preempted as stop:
        log.warning("%s; continue it with: lozo-exp resume=%s", stop, out_dir)
        stop.exit()
    except Exception as err:
        if resume != "require":  # a resume that fails leaves the run as it was
            outputs.record_failure(out_dir, err, cfg)
        status = outputs.read_status(out_dir)
        if job is not None:
            log.error("job %d %s (%s): %s", job, status, out_dir, err)
            return None  # the sweep goes on
        if isinstance(err, ConfigError) or status == "diverged":
            cli.fail(err)  # one paragraph; a crash keeps its traceback
        raise
    log.info("results: %s", out_dir / outputs.RESULTS)
    print(f"Results are in {out_dir}: results.json, metrics.jsonl, .hydra/")
    dev = results.get("dev") or {}
    return dev.get(results["metric"])


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    runs = [a.removeprefix(RESUME) for a in args if a.startswith(RESUME)]
    if cli.torchrun_processes() > 1:
        from lozo_exp import distributed

        distributed.init()
        if not distributed.is_main():
            follow()
            return
    # Under torchrun a run that fails ends this process (status 1), and torchrun then stops the
    # others, wherever they are; otherwise they wait for the next run: there is none.
    if not runs:
        cli.run_hydra(train, "config", args)
    elif len(runs) > 1 or not runs[0]:
        cli.fail(f"give one run directory to resume (resume=RUN_DIR); got {', '.join(runs)!r}")
    else:
        verbose = "--verbose" in args
        overrides = [a for a in args if not a.startswith(RESUME) and a != "--verbose"]
        try:
            resume(Path(runs[0]).expanduser(), overrides, verbose)
        except ConfigError as err:
            cli.fail(err)
    if cli.torchrun_processes() > 1:
        distributed.send_run(None)
        distributed.teardown()


def follow() -> None:
    """Another process of a torchrun launch: run what the main process sends. A bad config, a
    diverged or a preempted run ends the same way in every process; the main process reports
    it and its exit status ends the launch."""
    cli.start()
    logging.getLogger().setLevel(logging.WARNING)  # the main process logs progress
    from lozo_exp import distributed
    from lozo_exp.runner import TrainingDiverged, run

    while (job := distributed.receive_run()) is not None:
        try:
            run(*job)
        except (ConfigError, TrainingDiverged, outputs.RunFinished):
            return
        except Preempted as stop:
            stop.exit()
    distributed.teardown()


if __name__ == "__main__":
    main()
