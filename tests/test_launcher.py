"""`hydra/launcher=gpus_local`: a sweep's jobs in parallel, each on its own GPUs (on a CPU host,
`cpu_jobs` at once); the slow tier runs two sweeps on the CPU, one of data-parallel jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from hydra.errors import HydraException

from hydra_plugins.lozo_exp_launcher.gpus_local import job_slots, visible_gpus

QUICK = ("method=lozo", "trainer.max_steps=4", "trainer.eval_steps=2", "trainer.log_steps=2")


def test_each_running_job_gets_its_own_gpus():
    gpus = ["0", "1", "2", "3"]
    assert job_slots(gpus, 1, cpu_jobs=9) == [["0"], ["1"], ["2"], ["3"]]
    assert job_slots(gpus, 2, cpu_jobs=9) == [["0", "1"], ["2", "3"]]
    assert job_slots(gpus[:3], 2, cpu_jobs=9) == [["0", "1"]]  # GPU 2 idle (a warning)
    assert job_slots([], 2, cpu_jobs=3) == [None, None, None]  # the CPU, three jobs at once


def test_bad_launcher_settings_name_the_setting():
    with pytest.raises(HydraException, match=r"gpus_per_job=3, but only 2 GPUs are available"):
        job_slots(["0", "1"], 3, cpu_jobs=1)
    with pytest.raises(HydraException, match=r"hydra\.launcher\.cpu_jobs=0 must be positive"):
        job_slots([], 1, cpu_jobs=0)


def test_a_bad_launcher_setting_ends_the_sweep_before_anything_is_written(tmp_path):
    done = run_cli(tmp_path, "-m", "hydra/launcher=gpus_local", "hydra.launcher.cpu_jobs=0",
                   "hydra.sweep.dir=sweep", "method.lr=1e-3,1e-4", timeout=120)  # fmt: skip
    assert done.returncode == 1 and "hydra.launcher.cpu_jobs=0 must be" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "sweep" / "multirun.yaml").exists()
    assert not list((tmp_path / "sweep").glob("*/.hydra"))


def test_the_visible_gpus_are_the_ones_cuda_visible_devices_names(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def _sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "lozo_exp", "-m", "hydra/launcher=gpus_local", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow  # two sweeps of lozo-exp subprocesses, one under torchrun
def test_jobs_run_at_once_in_their_sweep_directories(tmp_path):
    done = _sweep(tmp_path, "hydra.launcher.cpu_jobs=2", "method.lr=1e-3,1e-4", *QUICK)
    assert "Sweep multirun/" in done.stdout and "2 jobs (2 completed)" in done.stdout
    jobs = sorted(p.parent.parent for p in tmp_path.glob("multirun/*/*/*/.hydra/config.yaml"))
    names = [set(j.name.split(",")) for j in jobs]  # the usual job names
    assert [j.name[:2] for j in jobs] == ["0_", "1_"] and "lr=0.001" in names[0]
    assert "lr=0.0001" in names[1]
    spans = []
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["processes"] == 1
        assert (job / "console.log").stat().st_size > 0
        started = (job / ".hydra" / "config.yaml").stat().st_mtime
        spans.append((started, (job / "results.json").stat().st_mtime))
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # they overlapped

    _sweep(tmp_path, "hydra.launcher.gpus_per_job=2", "hydra.sweep.dir=dp", *QUICK)
    (job,) = (p.parent.parent for p in tmp_path.glob("dp/*/.hydra/config.yaml"))
    results = json.loads((job / "results.json").read_text())
    assert results["status"] == "completed" and results["processes"] == 2
