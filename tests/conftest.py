"""Shared test helpers: compose the real Hydra config and run it in-process, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# One intra-op thread: the tests' models are tiny, and on a loaded machine threads waiting for
# each other made each op wait for the scheduler (the float64 trajectories ran 20-50× slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from lozo_exp import cli
from lozo_exp.config import RunConfig
from lozo_exp.runner import run

CONF = cli.config_dir()
REPORT_FIGURES = ("loss_curves", "memory", "accuracy", "step_time")  # what `report` draws
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def compose_config(*overrides: str) -> RunConfig:
    """The typed config `lozo-exp <overrides>` would run."""
    return cli.run_config(overrides)


def run_overrides(out_dir: Path, *overrides: str) -> dict:
    """Run in-process into `out_dir` and return results.json as written."""
    run(compose_config(*overrides), out_dir)
    return json.loads((out_dir / "results.json").read_text())


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


LOZO_EXP = [sys.executable, "-m", "lozo_exp"]
"""The command `lozo-exp`, for a fresh process (e.g. one that a test kills)."""


def run_cli(
    cwd: Path | None, *args: str | Path, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """`lozo-exp ARGS` run to its end in a fresh process in `cwd`, offline, its stdout and
    stderr captured as text."""
    return subprocess.run(
        [*LOZO_EXP, *map(str, args)],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def hold_run_dir(directory: Path) -> subprocess.Popen:
    """Another process that claims `directory` for its run and holds it until its stdin
    closes (`proc.stdin.close(); proc.wait()`), or it is killed."""
    code = (
        "import sys; from pathlib import Path; from lozo_exp import outputs; "
        f"outputs.claim_run_dir(Path({str(directory)!r})); print('held', flush=True); "
        "sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
