"""Checkpoints and exact resume: a run stopped by a crash, SIGKILL, SIGTERM or a full disk and
resumed gives the uninterrupted run's losses, dev/test metrics, step log and final weights, bit
for bit; ZO checkpoints hold no weights; what cannot be resumed says why."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import LOZO_EXP, compose_config, read_metrics, run_cli, run_overrides
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lozo_exp import checkpoint, cli, outputs, tracking, train
from lozo_exp import runner as runner_module
from lozo_exp.checkpoint import CheckpointError
from lozo_exp.config import ConfigError
from lozo_exp.runner import Runner, run
from lozo_exp.signals import Preempted

ADAPTER = runner_module.adapter_class("causal")  # tiny-opt's
RUN = ("trainer.max_steps=24", "trainer.eval_steps=8", "trainer.log_steps=3",
       "trainer.save_final=true", "trainer.checkpoint_steps=5")  # fmt: skip
CASES = {
    "lozo-m": ["method=lozo-m", "method.interval=4"],  # V refreshes, momentum carried over
    "lozo": ["method=lozo"],
    "mezo": ["method=mezo"],
    "mezo-plain": ["method=mezo", "method.engine=plain"],
    "mezo-lora": ["method=mezo-lora"],
    "ft": ["method=ft"],  # dropout on: the RNG state is restored
    "ft-amp": ["method=ft", "trainer.amp=fp16"],  # + the loss scaler
    "ft-lora": ["method=ft-lora"],
}
TIMING = {"step_time_s", "mem_peak_mb", "eval_time_s", "peak_mem_mb"}
SAME = ("status", "dev", "test", "test_sets", "steps", "best_step")


def outcome(run_dir: Path) -> dict:
    """What an exact resume must reproduce: every record but its timings, the results, the step
    log, the final weights."""
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "metrics": [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)],
        "results": {k: results[k] for k in SAME},
        "steps": (run_dir / checkpoint.STEPS).read_text(),
        "weights": load_file(run_dir / runner_module.FINAL_WEIGHTS),
    }


def assert_same_run(resumed: Path, whole: Path) -> None:
    a, b = outcome(resumed), outcome(whole)
    assert a["metrics"] == b["metrics"]
    assert a["results"] == b["results"] and a["results"]["status"] == "completed"
    assert a["steps"] == b["steps"]
    assert a["weights"].keys() == b["weights"].keys()
    for name, w in b["weights"].items():
        assert torch.equal(a["weights"][name], w), name


@contextmanager
def at_loss_call(monkeypatch, call: int, action: Callable[[], None]) -> Iterator[None]:
    """`action()` at the `call`-th loss evaluation (ZO: two per step; dev loss too)."""
    real, calls = ADAPTER.loss, [0]

    def loss(self, batch):
        calls[0] += 1
        if calls[0] == call:
            action()
        return real(self, batch)

    with monkeypatch.context() as m:
        m.setattr(ADAPTER, "loss", loss)
        yield


def crash() -> None:
    raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory) -> Callable[[str], Path]:
    """The uninterrupted run of a case, made once per module."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = tmp_path_factory.mktemp(case) / "whole"
            run_overrides(made[case], *CASES[case], *RUN)
        return made[case]

    return get


# -- crash, preemption, full disk: in-process ------------------------------------------------


@pytest.mark.parametrize(
    "case", ["lozo-m", "mezo-plain", "ft-amp", "ft-lora", "mezo-lora",
             pytest.param("lozo", marks=pytest.mark.slow),
             pytest.param("mezo", marks=pytest.mark.slow),
             pytest.param("ft", marks=pytest.mark.slow)],
)  # fmt: skip
def test_a_crashed_run_resumes_bit_identically(tmp_path, monkeypatch, whole_runs, case):
    """The crash lands inside a step (ZO: during its second evaluation, the weights at θ−εd):
    ZO resumes at its last logged step from the base weights and the log, FT at its last
    checkpoint (every 5 steps)."""
    cfg = compose_config(*CASES[case], *RUN)
    call = 28 if case.startswith(("lozo", "mezo")) else 13  # ZO: 2 per step
    with at_loss_call(monkeypatch, call, crash), pytest.raises(RuntimeError, match="simulated"):
        run(cfg, tmp_path)
    stopped = json.loads((tmp_path / "results.json").read_text())
    assert stopped["status"] == "failed" and "simulated crash" in stopped["error"]
    run(compose_config(*CASES[case], *RUN), tmp_path, resume="require")
    assert_same_run(tmp_path, whole_runs(case))
    resumed_at = json.loads((tmp_path / "results.json").read_text())["resumed_at"]
    assert resumed_at == ([13] if case.startswith(("lozo", "mezo")) else [10])


@pytest.mark.parametrize("case, signum", [("lozo-m", signal.SIGTERM), ("ft", signal.SIGUSR1)])
def test_a_stop_signal_checkpoints_says_preempted_and_resumes(
    tmp_path, monkeypatch, whole_runs, case, signum
):
    cfg = compose_config(*CASES[case], *RUN)
    handler = signal.getsignal(signum)
    kill = at_loss_call(monkeypatch, 13, lambda: os.kill(os.getpid(), signum))
    with kill, pytest.raises(Preempted) as stop:
        run(cfg, tmp_path)
    assert signal.getsignal(signum) is handler  # restored
    step = stop.value.step
    assert stop.value.exit_status == 128 + signum and step >= 6
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "preempted" and results["steps"] == step
    assert f"lozo-exp resume={tmp_path}" in results["error"]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == step
    assert read_metrics(tmp_path)[-1] == {
        "step": step,
        "split": "final",
        "status": "preempted",
        "peak_mem_mb": results["peak_mem_mb"],
    }
    run(compose_config(*CASES[case], *RUN), tmp_path, resume="require")
    assert_same_run(tmp_path, whole_runs(case))


def test_the_handler_before_ours_takes_over_after_the_checkpoint(tmp_path, monkeypatch, whole_runs):
    """Under submitit (Hydra's submitit launcher) SIGUSR2 requeues the job and exits: the run
    checkpoints first and says preempted; its SIGTERM, which precedes it, is only logged: the run
    goes on. The requeued job (same config, same directory) continues the run by itself."""
    requeued = []

    def submitit_usr2(signum, frame):
        requeued.append(signum)
        sys.exit(-1)

    def submitit_term(signum, frame):
        pass  # "Bypassing signal SIGTERM"

    def both() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)

    old = {s: signal.signal(s, h) for s, h in
           ((signal.SIGUSR2, submitit_usr2), (signal.SIGTERM, submitit_term))}  # fmt: skip
    try:
        with at_loss_call(monkeypatch, 13, both), pytest.raises(SystemExit) as exit_:
            train.run_job(lambda: compose_config(*CASES["lozo-m"], *RUN), tmp_path, "allow")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert exit_.value.code == -1 and requeued == [signal.SIGUSR2]
    results = json.loads((tmp_path / "results.json").read_text())
    saved = json.loads((tmp_path / "checkpoint.json").read_text())["step"]
    assert results["status"] == "preempted" and results["steps"] == saved > 6  # went on after TERM
    train.run_job(lambda: compose_config(*CASES["lozo-m"], *RUN), tmp_path, "allow")  # requeued
    assert_same_run(tmp_path, whole_runs("lozo-m"))


def _failing_fsync(monkeypatch, name: str, at: int) -> list[int]:
    """os.fsync fails with ENOSPC on the `at`-th file whose name contains `name`."""
    real, seen = os.fsync, []

    def fsync(fd: int) -> None:
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) == at:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
@pytest.mark.parametrize(
    "case, file, at, failed, previous",
    [("lozo-m", ".checkpoint.json.tmp", 6, 16, 15), ("ft", ".weights-", 3, 15, 10)],
)
def test_a_full_disk_stops_the_run_with_its_last_checkpoint_whole(
    tmp_path, monkeypatch, whole_runs, case, file, at, failed, previous
):
    """A checkpoint write fails (ZO: checkpoint.json after the dev evaluation of step 16; FT:
    the weights of step 15): a clear error, the previous checkpoint whole, nothing
    half-written left, and the run resumes from it exactly (ZO: redoing step 16 and its
    evaluation)."""
    with monkeypatch.context() as m:
        _failing_fsync(m, file, at)
        with pytest.raises(CheckpointError) as err:
            run(compose_config(*CASES[case], *RUN), tmp_path)
    message = str(err.value)
    assert "No space left on device" in message and f"resume={tmp_path}" in message
    assert f"could not write the checkpoint of step {failed}" in message
    assert f"its checkpoint of step {previous} is intact" in message
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == previous
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    if case == "ft":
        names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
        assert names == [f"trainer-{previous}.pt", f"weights-{previous}.safetensors"]
    run(compose_config(*CASES[case], *RUN), tmp_path, resume="require")
    assert_same_run(tmp_path, whole_runs(case))


def test_lines_cut_short_are_dropped_with_a_warning(tmp_path, monkeypatch, whole_runs, caplog):
    caplog.set_level(logging.INFO, logger="lozo_exp")
    with at_loss_call(monkeypatch, 27, crash), pytest.raises(RuntimeError):
        run(compose_config(*CASES["lozo-m"], *RUN), tmp_path)
    logged = (tmp_path / "steps.jsonl").read_text().count("\n")
    for name in ("metrics.jsonl", "steps.jsonl"):
        with (tmp_path / name).open("a") as f:
            f.write(f'{{"step": {logged + 1}, "loss": 0.69')  # killed in the middle of a write
    run(compose_config(*CASES["lozo-m"], *RUN), tmp_path, resume="require")
    assert_same_run(tmp_path, whole_runs("lozo-m"))
    assert caplog.text.count("line(s) cut short") == 2
    assert f"replayed {logged} steps" in caplog.text


def test_a_step_is_logged_for_replay_only_after_its_metrics_record(
    tmp_path, monkeypatch, whole_runs
):
    """A ZO run that dies writing step 12's metrics.jsonl record (log_steps 3) has not logged
    step 12 for replay, so a resume redoes it and the record is written, once."""
    write = tracking.MetricsLog.write

    def dies_at_step_12(self, record):
        if record.get("step") == 12 and "loss" in record:
            raise RuntimeError("killed")
        write(self, record)

    monkeypatch.setattr(tracking.MetricsLog, "write", dies_at_step_12)
    with pytest.raises(RuntimeError, match="killed"):
        run(compose_config(*CASES["lozo-m"], *RUN), tmp_path)
    monkeypatch.setattr(tracking.MetricsLog, "write", write)
    assert (tmp_path / "steps.jsonl").read_text().count("\n") == 11
    run(compose_config(*CASES["lozo-m"], *RUN), tmp_path, resume="require")
    assert json.loads((tmp_path / "results.json").read_text())["resumed_at"] == [11]
    assert_same_run(tmp_path, whole_runs("lozo-m"))


# -- what a checkpoint holds ------------------------------------------------------------------


def test_zo_checkpoints_hold_no_weights(whole_runs):
    run_dir = whole_runs("lozo-m")
    saved = json.loads((run_dir / "checkpoint.json").read_text())
    assert saved["replay"] is True and "weights" not in saved
    assert not (run_dir / checkpoint.WEIGHTS_DIR).exists()
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 25))
    assert {"loss", "lr", "loss2"} <= set(steps[0])
    assert (run_dir / "checkpoint.json").stat().st_size < 20_000
    assert len(saved["base"]) == len(load_file(run_dir / "final.safetensors"))


@pytest.mark.parametrize("case", ["ft", "ft-lora"])
def test_ft_checkpoints_hold_the_trainable_weights_and_adamw_state(
    tmp_path, monkeypatch, whole_runs, case
):
    with at_loss_call(monkeypatch, 13, crash), pytest.raises(RuntimeError):
        run(compose_config(*CASES[case], *RUN), tmp_path)
    saved = json.loads((tmp_path / "checkpoint.json").read_text())
    assert saved["step"] == 10 and saved["replay"] is False
    weights = load_file(tmp_path / saved["weights"])
    assert weights.keys() == load_file(whole_runs(case) / "final.safetensors").keys()
    if case == "ft-lora":  # only the adapter
        assert weights and all("lora_" in name for name in weights)
    else:
        assert len(weights) > 20 and not any("lora_" in name for name in weights)
    trainer = torch.load(tmp_path / saved["trainer"], weights_only=True)
    assert len(trainer["optimizer"]["state"]) == len(weights)
    assert {"exp_avg", "exp_avg_sq"} <= set(trainer["optimizer"]["state"][0])
    assert not (whole_runs(case) / checkpoint.WEIGHTS_DIR).exists()  # removed once completed


def test_checkpoints_are_due_by_steps_by_time_and_after_free_evaluations(monkeypatch, tmp_path):
    clock = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    zo = checkpoint.Checkpoints(tmp_path, compose_config("trainer.checkpoint_steps=5"), True)
    ft = checkpoint.Checkpoints(tmp_path, compose_config("method=ft"), False)  # 10 minutes
    assert [s for s in range(1, 12) if zo.due(s, evaluated=s == 8)] == [5, 8, 10]
    assert not any(ft.due(s, evaluated=True) for s in range(1, 12))  # its weights cost
    clock[0] += 600
    assert ft.due(3, evaluated=False) and zo.due(3, evaluated=False)


def test_a_zo_run_continues_after_its_checkpoint_but_before_an_unfinished_evaluation():
    def evaluates_at(step: int) -> bool:
        return step % 10 == 0

    last = checkpoint._last_without_evaluation
    assert last(10, 17, evaluates_at) == 17  # logged past the checkpoint: nothing lost
    assert last(10, 20, evaluates_at) == 19  # the evaluation of step 20 was under way
    assert last(10, 25, evaluates_at) == 19  # ... or its checkpoint failed: redone
    assert last(10, 10, evaluates_at) == 10


def test_config_changes_name_the_keys_but_not_runtime_ones():
    saved = {"method": {"lr": 1e-6, "rank": 2}, "trainer": {"device": "cuda"}, "logger": {}}
    now = {"method": {"lr": 1e-7, "rank": 2}, "trainer": {"device": "cpu"}, "logger": {"x": 1}}
    assert checkpoint.config_changes(saved, now) == ["method.lr: 1e-06 -> 1e-07"]


# -- what cannot be resumed, and the resume command -------------------------------------------


def test_resume_checks_config_and_base_weights_before_continuing(tmp_path, monkeypatch):
    with at_loss_call(monkeypatch, 11, crash), pytest.raises(RuntimeError):
        run(compose_config(*CASES["lozo-m"], *RUN), tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    with monkeypatch.context() as m:
        m.setattr(runner_module, "load_model", no_model)
        with pytest.raises(ConfigError, match=r"another config \(method\.lr: 0\.001 -> 0\.01"):
            Runner(compose_config(*CASES["lozo-m"], *RUN, "method.lr=0.01"), tmp_path, "allow")
        with pytest.raises(outputs.RunDirTaken, match=f"lozo-exp resume={tmp_path}"):
            Runner(compose_config(*CASES["lozo-m"], *RUN), tmp_path)  # a new run: never here
    saved = json.loads((tmp_path / "checkpoint.json").read_text())
    saved["base"][0] *= 1.5  # as if the checkpoint named by model.hub_id had changed
    (tmp_path / "checkpoint.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="are not those it started from"):
        run(compose_config(*CASES["lozo-m"], *RUN), tmp_path, resume="require")


def test_the_resume_command(tmp_path, monkeypatch, capsys, caplog, whole_runs):
    caplog.set_level(logging.INFO)
    train.main([f"resume={whole_runs('lozo-m')}"])  # a completed run: says so, exit status 0
    assert "has completed: there is nothing to resume" in capsys.readouterr().out
    overrides = [*CASES["lozo-m"], *RUN]
    with at_loss_call(monkeypatch, 11, crash), pytest.raises(RuntimeError):
        run(compose_config(*overrides), tmp_path)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cli.compose("config", overrides), tmp_path / ".hydra" / "config.yaml")
    for args, message in [
        (["model=tiny-roberta"], "model=tiny-opt: model=tiny-roberta would change it"),
        (["method.lr=1"], "method.lr=0.001: method.lr=1 would change it"),
        (["logger=wandb"], "Only these keys may be given with resume: trainer.device"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            train.main([f"resume={tmp_path}", *args])
        assert exit_.value.code == 1 and message in capsys.readouterr().err
    train.main([f"resume={tmp_path}", "trainer.progress_every_s=0.5"])
    assert_same_run(tmp_path, whole_runs("lozo-m"))
    assert "continuing from step 5" in (tmp_path / "train.log").read_text()
    with pytest.raises(SystemExit):
        train.main([f"resume={tmp_path / 'none'}"])
    assert "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    (tmp_path / "plain").mkdir()  # a directory without a run: nothing is written into it
    with pytest.raises(SystemExit):
        train.main([f"resume={tmp_path / 'plain'}"])
    assert "holds no run to resume" in capsys.readouterr().err
    assert not any((tmp_path / "plain").iterdir())


# -- killed processes: the real command -------------------------------------------------------


def lozo_exp(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [*LOZO_EXP, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def kill_at(run_dir: Path, step: int, signum: int, *overrides: str) -> tuple[int, int]:
    """Run the command and send `signum` once steps.jsonl logs `step` steps; the exit status
    and the steps logged by then."""
    proc = lozo_exp(f"hydra.run.dir={run_dir}", *overrides)
    steps = run_dir / checkpoint.STEPS
    while proc.poll() is None:
        if steps.exists() and steps.read_text().count("\n") >= step:
            proc.send_signal(signum)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, f"finished before the signal:\n{out}"
    return proc.returncode, steps.read_text().count("\n")


def resume_command(run_dir: Path) -> str:
    done = run_cli(None, f"resume={run_dir}", timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


LONG = ("trainer.max_steps=80", "trainer.eval_steps=20", "trainer.log_steps=3",
        "trainer.save_final=true", "trainer.checkpoint_steps=7")  # fmt: skip


@pytest.mark.parametrize(
    "case", ["lozo-m", *(pytest.param(c, marks=pytest.mark.slow) for c in ("lozo", "mezo", "ft"))]
)
def test_a_killed_run_resumes_bit_identically(tmp_path, case):
    """SIGKILL at whatever point the process is at once step 33 is logged (mid-step, mid-write,
    mid-evaluation), then `lozo-exp resume=DIR`."""
    whole = tmp_path / "whole"
    run_overrides(whole, *CASES[case], *LONG)
    status, logged = kill_at(tmp_path / "killed", 33, signal.SIGKILL, *CASES[case], *LONG)
    assert status == -signal.SIGKILL and 33 <= logged < 80
    assert not (tmp_path / "killed" / "results.json").exists()
    log = resume_command(tmp_path / "killed")
    assert "continuing from step" in log
    assert_same_run(tmp_path / "killed", whole)


@pytest.mark.slow
def test_a_sigterm_to_the_command_exits_preempted_and_resumes(tmp_path):
    whole = tmp_path / "whole"
    run_overrides(whole, *CASES["ft"], *LONG)
    status, logged = kill_at(tmp_path / "stopped", 20, signal.SIGTERM, *CASES["ft"], *LONG)
    assert status == 128 + signal.SIGTERM
    results = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert results["status"] == "preempted" and results["steps"] == logged
    resume_command(tmp_path / "stopped")
    assert_same_run(tmp_path / "stopped", whole)


@pytest.mark.slow
def test_a_file_size_limit_mid_run_keeps_a_resumable_run(tmp_path):
    """A real write failure (EFBIG past RLIMIT_FSIZE, as a full disk gives ENOSPC): the step log
    ends in a partial line, the run fails with its status, and resumes exactly."""
    whole = tmp_path / "whole"
    run_overrides(whole, *CASES["lozo-m"], *LONG)
    limit = 6_000  # steps.jsonl reaches it first, after about 70 steps (.hydra/hydra.yaml: 5k)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run_dir = tmp_path / "capped"
    proc = lozo_exp(f"hydra.run.dir={run_dir}", *CASES["lozo-m"], *LONG, preexec_fn=cap)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "File too large" in out
    assert (run_dir / checkpoint.STEPS).stat().st_size == limit  # cut in the middle of a line
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    log = resume_command(run_dir)
    assert "line(s) cut short" in log
    assert_same_run(run_dir, whole)
