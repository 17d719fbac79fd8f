"""The command line as a user types it: default run, sweeps, bad input, taken directories.
(The slow tier runs real jobs; the default tier what ends before a model is built.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import LOZO_EXP, run_cli

from lozo_exp.__main__ import COMMANDS
from lozo_exp.config import TrainerConfig

QUICK = ("trainer.max_steps=2", "trainer.eval_steps=2")


def snapshot(directory: Path) -> dict[str, bytes]:
    files = [p for p in directory.rglob("*") if p.is_file()]
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def job_results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def one_paragraph(done: subprocess.CompletedProcess) -> str:
    """The error a failed command printed: exit status 1, one paragraph, no traceback."""
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("lozo-exp: ")
    return message.removeprefix("lozo-exp: ")


@pytest.mark.slow  # a full default run in a subprocess (in-process: test_smoke)
def test_default_run_says_where_its_results_are(tmp_path):
    done = run_cli(tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("Results are in"))
    out = Path(line.split("Results are in ")[1].split(":")[0])
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["model"] == "tiny-opt"
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert "Generating train split" not in done.stdout + done.stderr  # datasets' bars are off


@pytest.mark.slow  # two runs in a subprocess
def test_a_sweep_is_one_directory_with_jobs_named_by_their_values(tmp_path):
    done = run_cli(tmp_path, "-m", "task=sst2,rte", "method=lozo", "method.lr=1e-6", *QUICK)
    assert done.returncode == 0, done.stderr
    (sweep,) = tmp_path.glob("multirun/*/*")  # one per invocation, whatever the tasks
    jobs = job_results(sweep)
    named = "eval_steps=2,lr=1e-06,max_steps=2,method=lozo"  # keys shortened, sorted
    assert {name: (r["task"], r["status"]) for name, r in jobs.items()} == {
        f"0_{named},task=sst2": ("sst2", "completed"),
        f"1_{named},task=rte": ("rte", "completed"),
    }
    assert f"Sweep {sweep.relative_to(tmp_path)}: 2 jobs (2 completed)" in done.stdout


@pytest.mark.slow  # a run that diverges, one that crashes, two rejected
def test_failed_jobs_leave_results_the_sweep_goes_on_and_ends_with_a_summary(tmp_path):
    # lr 1e30 diverges; lr -1 is rejected before the job starts; a hidden size the 4 attention
    # heads do not divide: a crash when the model is built.
    done = run_cli(tmp_path, "-m", "method.lr=1e30,-1", "model.arch.hidden_size=64,66", *QUICK)
    assert done.returncode == 1
    (sweep,) = tmp_path.glob("multirun/*/*")
    jobs = {name.split("_")[0]: results for name, results in job_results(sweep).items()}
    assert {num: r["status"] for num, r in jobs.items()} == {
        "0": "diverged",
        "1": "failed",
        "2": "rejected",
        "3": "rejected",
    }
    assert all(r["error"] for r in jobs.values())
    assert jobs["2"]["error"] == "Invalid configuration: method.lr=-1.0 must be >= 0."
    summary = done.stdout[done.stdout.index("Sweep ") :].splitlines()
    assert summary[0].endswith("4 jobs (1 diverged, 1 failed, 2 rejected)")
    assert [line.split()[0] for line in summary[1:]] == ["diverged", "failed"] + 2 * ["rejected"]
    assert "method.lr=-1.0 must be >= 0" in summary[-1]


@pytest.mark.slow  # a rejected run, then a real one in its directory
def test_a_rejected_run_leaves_its_directory_free_and_a_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    bad = run_cli(tmp_path, "method=lozo", "method.interval=0", f"hydra.run.dir={run_dir}")
    assert one_paragraph(bad).endswith("method.interval=0 must be a positive integer.")
    assert json.loads((run_dir / "results.json").read_text())["status"] == "rejected"

    assert run_cli(tmp_path, *QUICK, f"hydra.run.dir={run_dir}").returncode == 0  # reused
    before = snapshot(run_dir)
    assert json.loads(before["results.json"])["status"] == "completed"
    again = run_cli(tmp_path, "method=lozo", f"hydra.run.dir={run_dir}")
    assert one_paragraph(again) == (
        f"output directory {run_dir} already holds a run ({run_dir}/metrics.jsonl); a run "
        f"never overwrites another: choose a new hydra.run.dir"
    )
    assert snapshot(run_dir) == before  # .hydra/config.yaml and overrides.yaml included


@pytest.mark.slow  # two real runs at once
def test_two_runs_started_together_into_one_directory_one_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = [*LOZO_EXP, *QUICK, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    done = [(proc.wait(timeout=600), proc.stderr.read()) for proc in procs]
    assert sorted(code for code, _ in done) == [0, 1]
    refused = next(err for code, err in done if code == 1).strip().splitlines()[-1]
    assert re.match(
        rf"lozo-exp: output directory {run_dir} (is in use by another run|alr)", refused
    )
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    finals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if "status" in r]
    assert len(finals) == 1  # one run's records
    assert not (run_dir / ".lozo-lock").exists()


def test_a_run_refuses_a_directory_that_holds_a_run_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    for name, text in [
        (".hydra/config.yaml", "method:\n  name: mezo\n"),
        (".hydra/overrides.yaml", "- method=mezo\n"),
        ("results.json", '{"status": "completed"}\n'),
    ]:
        (run_dir / name).write_text(text)
    before = snapshot(run_dir)
    done = run_cli(tmp_path, "method=lozo", f"hydra.run.dir={run_dir}")
    assert one_paragraph(done) == (
        f"output directory {run_dir} already holds a run ({run_dir}/results.json); a run "
        f"never overwrites another: choose a new hydra.run.dir"
    )
    assert snapshot(run_dir) == before


def test_jobs_rejected_before_they_start_leave_results_and_fail_the_sweep(tmp_path):
    done = run_cli(tmp_path, "-m", "+trainer.foo=1,2", "hydra.sweep.dir=sweep")
    assert done.returncode == 1
    error = "trainer.foo is not a key of trainer; its keys are: " + ", ".join(
        TrainerConfig.__dataclass_fields__
    )
    assert job_results(tmp_path / "sweep") == {
        "0_foo=1": {"status": "rejected", "error": error},
        "1_foo=2": {"status": "rejected", "error": error},
    }
    assert "Sweep sweep: 2 jobs (2 rejected)" in done.stdout


def test_a_sweep_refuses_a_directory_that_holds_a_run(tmp_path):
    sweep = tmp_path / "sweep"
    job = sweep / "0_lr=1e-06"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- method.lr=1e-6\n")
    (job / "metrics.jsonl").write_text('{"step": 1}\n')
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    before = snapshot(sweep)
    done = run_cli(tmp_path, "-m", "method.lr=1e-6,1e-7", f"hydra.sweep.dir={sweep}")
    assert "choose a new hydra.sweep.dir" in one_paragraph(done)
    assert snapshot(sweep) == before


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.foo=1",
            "trainer.foo is not a key of trainer; its keys are: "
            + ", ".join(TrainerConfig.__dataclass_fields__),
        ),
        ("model.bogus=1", "model.bogus is not a key of model tiny-opt; its keys are: name, "),
        ("method=adamw", "method=adamw is not an option of method; its options are: ft, "),
    ],
)
def test_a_compose_error_is_one_paragraph_before_anything_is_written(tmp_path, override, message):
    done = run_cli(tmp_path, override)
    assert one_paragraph(done).startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_commands_and_config_groups(tmp_path):
    done = run_cli(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    for command in COMMANDS:
        assert re.search(rf"^lozo-exp \[?{command}\b", done.stdout, re.MULTILINE), command
    assert "method: ft, ft-lora, icl, lozo, lozo-m, mezo, mezo-lora, zero-shot" in done.stdout
    typo = run_cli(tmp_path, "trian")
    assert typo.returncode != 0 and "'trian' is neither a command" in typo.stderr
