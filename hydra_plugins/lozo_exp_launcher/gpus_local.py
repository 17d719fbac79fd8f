"""`lozo-exp -m ... hydra/launcher=gpus_local`: a sweep's jobs in parallel on one host, each on its
own GPUs.

Each job is its own `lozo-exp` run, `python -m lozo_exp <the job's overrides>
hydra.run.dir=<its directory in the sweep>`, or with `gpus_per_job: N` a data-parallel run of N
processes under `torchrun --standalone`, with CUDA_VISIBLE_DEVICES naming its GPUs. As many jobs
run at once as there are groups of N GPUs; the next starts when one ends. On a host without
GPUs, `cpu_jobs` jobs run at once on the CPU. A job's console output goes to `console.log` in its
directory and its result is read from its `results.json`, so the sweep's summary and a sweeper
see what they would see from an in-process sweep.

Hydra finds launchers only in the `hydra_plugins` package, and imports this module in every
Hydra application of the environment: it imports nothing heavy, and without `from __future__
import annotations` (Hydra's plugin scan runs it outside `sys.modules`, where a dataclass
cannot resolve string annotations).
"""

import logging
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    filter_overrides,
    setup_globals,
)
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class GPUsLocalConf:
    _target_: str = "hydra_plugins.lozo_exp_launcher.gpus_local.GPUsLocalLauncher"
    # The GPUs to share out, as CUDA_VISIBLE_DEVICES names them; None: every visible GPU.
    gpus: list[str] | None = None
    # GPUs per job: above 1, each job runs data-parallel across them (torchrun).
    gpus_per_job: int = 1
    # On a host without GPUs: jobs at once, each with gpus_per_job CPU processes.
    cpu_jobs: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="gpus_local", node=GPUsLocalConf, provider="lozo_exp"
)


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's names, else every GPU torch sees."""
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is not None:
        return [name.strip() for name in names.split(",") if name.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def job_slots(gpus: list[str], gpus_per_job: int, cpu_jobs: int) -> list[list[str] | None]:
    """What each job running at the same time gets: disjoint groups of `gpus_per_job` GPUs, or
    (no GPUs) the CPU, `cpu_jobs` times."""
    if gpus_per_job < 1 or cpu_jobs < 1:
        raise HydraException(
            f"hydra.launcher.gpus_per_job={gpus_per_job} and hydra.launcher.cpu_jobs={cpu_jobs} "
            f"must be positive integers"
        )
    if not gpus:
        return [None] * cpu_jobs
    if gpus_per_job > len(gpus):
        raise HydraException(
            f"hydra.launcher.gpus_per_job={gpus_per_job}, but only {len(gpus)} GPU"
            f"{'s are' if len(gpus) != 1 else ' is'} available ({', '.join(gpus)}): use "
            f"gpus_per_job <= {len(gpus)}, or list the GPUs in hydra.launcher.gpus"
        )
    if len(gpus) % gpus_per_job:
        log.warning(
            "%d GPUs in groups of %d: GPU %s stays idle",
            len(gpus),
            gpus_per_job,
            ", ".join(gpus[len(gpus) - len(gpus) % gpus_per_job :]),
        )
    return [
        gpus[i : i + gpus_per_job]
        for i in range(0, len(gpus) // gpus_per_job * gpus_per_job, gpus_per_job)
    ]


def _quoted(value: str) -> str:
    """A Hydra override value that may hold `=`, `,` and quotes (job directory names do)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class _Job:
    num: int
    overrides: list[str]
    directory: Path
    config: DictConfig


class GPUsLocalLauncher(Launcher):
    def __init__(self, gpus: list[str] | None = None, gpus_per_job: int = 1, cpu_jobs: int = 1):
        self.gpus = None if gpus is None else [str(g) for g in gpus]
        self.gpus_per_job, self.cpu_jobs = gpus_per_job, cpu_jobs
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.slots: list[list[str] | None] = []

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        # bad settings end here, before the sweeper writes the sweep directory
        self.slots = job_slots(
            visible_gpus() if self.gpus is None else self.gpus, self.gpus_per_job, self.cpu_jobs
        )

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        slots = self.slots
        jobs = [self._job(initial_job_idx + k, list(o)) for k, o in enumerate(job_overrides)]
        where = "the CPU" if slots[0] is None else f"GPUs {', '.join(map(','.join, slots))}"
        log.info("Launching %d jobs, %d at a time, on %s", len(jobs), len(slots), where)
        free: queue.Queue = queue.Queue()
        for slot in slots:
            free.put(slot)

        def run(job: _Job) -> JobReturn:
            slot = free.get()
            try:
                return self._run(job, slot)
            finally:
                free.put(slot)

        with ThreadPoolExecutor(len(slots)) as pool:
            return list(pool.map(run, jobs))

    def _job(self, num: int, overrides: list[str]) -> _Job:
        """The job's config as Hydra would compose it, and its directory in the sweep."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = num
        HydraConfig.instance().set_config(config)  # the subdir may read ${hydra:...}
        directory = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        return _Job(num, overrides, directory.absolute(), config)

    def _command(self, job: _Job) -> list[str]:
        if self.gpus_per_job == 1:
            start = [sys.executable, "-m", "lozo_exp"]
        else:
            start = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            start += [f"--nproc_per_node={self.gpus_per_job}", "-m", "lozo_exp"]
        extra = [f"hydra.run.dir={_quoted(str(job.directory))}"]
        if job.config.hydra.verbose:
            extra.append(f"hydra.verbose={job.config.hydra.verbose}")
        if job.config.logger.group is None:  # as an in-process sweep: its jobs share a group
            from lozo_exp.outputs import run_name

            extra.append(f"logger.group={_quoted(run_name(Path(job.config.hydra.sweep.dir)))}")
        return [*start, *job.overrides, *extra]

    def _run(self, job: _Job, gpus: list[str] | None) -> JobReturn:
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        job.directory.mkdir(parents=True, exist_ok=True)
        where = "CPU" if gpus is None else f"GPU {','.join(gpus)}"
        log.info("\t#%d (%s): %s", job.num, where, " ".join(filter_overrides(job.overrides)))
        with (job.directory / "console.log").open("a") as console:  # never truncate a file
            code = subprocess.run(
                self._command(job), stdout=console, stderr=subprocess.STDOUT, env=env
            ).returncode
        from lozo_exp.outputs import read_results

        results = read_results(job.directory)
        status = results.get("status", "missing")
        log.info("\t#%d %s (exit status %d): %s", job.num, status, code, job.directory)
        dev = results.get("dev") or {}
        task_cfg = job.config.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        return JobReturn(
            overrides=job.overrides,
            cfg=task_cfg,
            hydra_cfg=DictConfig({"hydra": job.config.hydra}),
            working_dir=str(job.directory),
            task_name=JobRuntime.instance().get("name"),
            status=JobStatus.COMPLETED,  # as an in-process sweep's job: its status is on disk
            _return_value=dev.get(results.get("metric")),
        )
