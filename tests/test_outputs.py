"""Run directories: which hold a run, what a failed job leaves, how sweep jobs are named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import compose_config, hold_run_dir
from omegaconf import OmegaConf

from lozo_exp import outputs
from lozo_exp.config import ConfigError


def test_a_directory_holds_a_run_unless_its_run_was_rejected(tmp_path):
    def write(name: str, text: str) -> None:
        (tmp_path / name).write_text(text)

    assert outputs.run_record(tmp_path) is None
    write("results.json", json.dumps({"status": "rejected", "error": "bad"}))
    assert outputs.run_record(tmp_path) is None
    outputs.check_output_dir(tmp_path)  # free to reuse
    for status in ("completed", "failed", "diverged"):
        write("results.json", json.dumps({"status": status}))
        assert outputs.run_record(tmp_path) == "results.json"
    write("results.json", "{not json")
    assert outputs.run_record(tmp_path) == "results.json"
    (tmp_path / "results.json").unlink()
    write("metrics.jsonl", "")
    with pytest.raises(outputs.RunDirTaken, match=r"choose a new hydra\.sweep\.dir"):
        outputs.check_output_dir(tmp_path, "hydra.sweep.dir")


def test_a_run_continues_in_its_directory_only_when_resuming_and_resumable(tmp_path):
    def write(name: str, text: str) -> None:
        (tmp_path / name).write_text(text)

    assert outputs.check_output_dir(tmp_path, resume="allow") is False  # free: a new run
    with pytest.raises(ConfigError, match="holds no run to resume"):
        outputs.check_output_dir(tmp_path, resume="require")
    write("metrics.jsonl", "")  # a run that stopped before its first checkpoint
    with pytest.raises(ConfigError, match="has no checkpoint"):
        outputs.check_output_dir(tmp_path, resume="require")
    with pytest.raises(outputs.RunDirTaken, match=r"choose a new hydra\.run\.dir$"):
        outputs.check_output_dir(tmp_path, resume="allow")
    write("checkpoint.json", "{}")
    for status in (None, "failed", "preempted"):
        if status is not None:
            write("results.json", json.dumps({"status": status}))
        assert outputs.check_output_dir(tmp_path, resume="allow") is True
        assert outputs.check_output_dir(tmp_path, resume="require") is True
        with pytest.raises(outputs.RunDirTaken, match=f"continue it: lozo-exp resume={tmp_path}"):
            outputs.check_output_dir(tmp_path)  # a new run never continues another
    for status in outputs.FINISHED:
        write("results.json", json.dumps({"status": status}))
        with pytest.raises(outputs.RunFinished, match=f"has {status}: there is nothing to"):
            outputs.check_output_dir(tmp_path, resume="require")
        with pytest.raises(outputs.RunDirTaken, match=r"hydra\.run\.dir$"):
            outputs.check_output_dir(tmp_path)
    (tmp_path / "results.json").unlink()
    (tmp_path / "metrics.jsonl").unlink()
    assert outputs.run_record(tmp_path) == "checkpoint.json"  # killed before metrics.jsonl


def test_a_failure_before_the_runner_wrote_results_is_recorded(tmp_path):
    outputs.record_failure(tmp_path, ConfigError("method.lr=-1 must be >= 0"))
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "status": "rejected",
        "error": "method.lr=-1 must be >= 0",
    }
    outputs.record_failure(tmp_path, RuntimeError("boom"))  # replaces a rejection
    assert outputs.read_status(tmp_path) == "failed"
    completed = json.dumps({"status": "completed"})
    (tmp_path / "results.json").write_text(completed)
    outputs.record_failure(tmp_path, RuntimeError("later"))  # the runner's record stays
    outputs.record_failure(tmp_path, outputs.RunDirTaken("another run's directory"))
    assert (tmp_path / "results.json").read_text() == completed


def test_a_rejected_run_records_its_setting_when_its_config_was_read(tmp_path):
    cfg = compose_config("method=lozo", "method.rank=0", "seed=3")
    outputs.record_failure(tmp_path, ConfigError("method.rank=0 must be a positive integer"), cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["status"], results["method"], results["seed"]) == ("rejected", "lozo", 3)
    assert results["method_config"]["rank"] == 0 and results["model_config"]["name"] == "tiny-opt"
    assert set(results) >= {"task_config", "trainer_config"}


def test_a_run_is_named_by_its_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        outputs.run_name(tmp_path / "multirun" / "day" / "0_lr=1e-06") == "multirun/day/0_lr=1e-06"
    )
    assert outputs.run_name(Path("outputs/run")) == "outputs/run"
    assert outputs.run_name(tmp_path.parent / "elsewhere") == str(tmp_path.parent / "elsewhere")


@pytest.mark.parametrize(
    "overrides, exclude, name",
    [
        ([], [], "3"),
        (["method.lr=1e-6", "method=lozo"], [], "3_lr=1e-06,method=lozo"),
        (["method.lr=1.2520653814999453e-06", "seed=2"], [], "3_lr=1.252e-06,seed=2"),  # Optuna
        (["method.eps=0.1", "task.eps=2"], [], "3_method.eps=0.1,task.eps=2"),  # would clash
        (["logger=wandb", "logger.mode=online", "seed=1"], ["logger"], "3_seed=1"),
        (["model.hub_id=facebook/opt-13b"], [], "3_hub_id=facebook_opt-13b"),
        (["trainer.device=cuda:1", "task.k=16"], ["trainer.device"], "3_k=16"),
    ],
)
def test_job_directories_are_named_by_their_values(overrides, exclude, name):
    assert outputs.job_dirname(3, overrides, exclude) == name


def _job(sweep, name: str, results: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text(f"- {name}\n")
    if results is not None:
        (sweep / name / "results.json").write_text(json.dumps(results))


def test_the_sweep_summary_lists_this_sweeps_jobs_and_fails_unless_all_finished(tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    _job(tmp_path, "0_old", {"status": "rejected", "error": "from an earlier sweep"})
    summary = outputs.SweepSummary()
    summary.on_multirun_start(config)
    _job(tmp_path, "0_new", {"status": "completed"})
    _job(tmp_path, "1_new", {"status": "diverged", "error": "loss nan\nat step 3"})
    summary.on_multirun_end(config)  # all finished: no exit
    assert capsys.readouterr().out.splitlines() == [
        f"Sweep {tmp_path}: 2 jobs (1 completed, 1 diverged)",
        f"  completed {tmp_path}/0_new",
        f"  diverged  {tmp_path}/1_new: loss nan",
    ]
    _job(tmp_path, "2_new", None)  # killed before results.json
    with pytest.raises(SystemExit) as exit_:
        summary.on_multirun_end(config)
    assert exit_.value.code == 1
    assert f"  missing   {tmp_path}/2_new" in capsys.readouterr().out.splitlines()


def test_a_claimed_directory_is_refused_to_other_processes_until_released(tmp_path):
    run = tmp_path / "run"
    holder = hold_run_dir(run)
    try:
        lock = json.loads((run / outputs.LOCK).read_text())
        assert lock["pid"] == holder.pid
        with pytest.raises(
            outputs.RunDirTaken, match=rf"in use by another run \(process {holder.pid} on"
        ):
            outputs.claim_run_dir(run)
        with pytest.raises(outputs.RunDirTaken, match="in use"):
            outputs.claim_run_dir(run, resume="require")  # a resume too
        with pytest.raises(outputs.RunDirTaken, match="in use"):
            outputs.check_output_dir(run)
    finally:
        holder.stdin.close()
        holder.wait()
    assert not (run / outputs.LOCK).exists()  # released at its exit
    outputs.claim_run_dir(run)
    try:
        outputs.claim_run_dir(run)  # this process holds it: checked again, not refused
        (run / outputs.METRICS).write_text("")
        with pytest.raises(outputs.RunDirTaken, match="already holds a run"):
            outputs.claim_run_dir(run)  # ... and a run in it is still refused
        (run / outputs.CHECKPOINT).write_text("{}")
        assert outputs.claim_run_dir(run, resume="require") is True  # unless resumed
    finally:
        outputs.release_run_dir(run)
    assert not (run / outputs.LOCK).exists()


def test_a_lock_left_by_a_killed_run_does_not_block_the_directory(tmp_path):
    run = tmp_path / "run"
    holder = hold_run_dir(run)
    holder.kill()  # SIGKILL: no clean-up, the lock file stays; the kernel drops the lock
    holder.wait()
    assert (run / outputs.LOCK).exists()
    assert outputs.run_record(run) is None
    outputs.check_output_dir(run)
    with outputs.claimed(run):
        assert json.loads((run / outputs.LOCK).read_text())["pid"] == os.getpid()
    assert not (run / outputs.LOCK).exists()


def test_a_claim_refused_for_a_run_it_holds_leaves_the_directory_as_it_was(tmp_path):
    (tmp_path / outputs.RESULTS).write_text(json.dumps({"status": "completed"}))
    with pytest.raises(outputs.RunDirTaken, match="already holds a run"):
        outputs.claim_run_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [outputs.RESULTS]
