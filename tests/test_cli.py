"""The command line as a user types it: default run, a grid sweep, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lozo_exp", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # a full default run in a subprocess (in-process: test_smoke)
def test_default_run_says_where_its_results_are(tmp_path):
    done = cli(tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("Results are in"))
    out = Path(line.split("Results are in ")[1].split(":")[0])
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["model"] == "tiny-opt"
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()


@pytest.mark.slow  # four end-to-end runs in a subprocess
def test_grid_sweep_gives_each_job_its_own_directory(tmp_path):
    done = cli(
        tmp_path,
        "-m",
        "method=mezo,lozo",
        "method.lr=1e-6,1e-7",
        "trainer.max_steps=2",
        "trainer.eval_steps=2",
    )
    assert done.returncode == 0, done.stderr
    found = sorted(tmp_path.glob("multirun/*/*/*/results.json"))
    assert len(found) == 4
    jobs = {
        (c.method.name, c.method.lr)
        for c in (OmegaConf.load(p.parent / ".hydra" / "config.yaml") for p in found)
    }
    assert jobs == {("mezo", 1e-6), ("mezo", 1e-7), ("lozo", 1e-6), ("lozo", 1e-7)}


def test_bad_value_is_one_clear_message_and_a_failing_status(tmp_path):
    done = cli(tmp_path, "method=lozo", "method.interval=0")
    assert done.returncode != 0
    assert "method.interval=0 must be a positive integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_method_lists_the_choices(tmp_path):
    done = cli(tmp_path, "method=adamw")
    assert done.returncode != 0
    assert "Could not find 'method/adamw'" in done.stderr and "lozo-m" in done.stderr
