"""One run across several processes (lozo_exp.distributed): the pieces in one process, bad
launches as one paragraph, and (slow tier) two gloo processes on a CPU giving the one-process
run's losses, weights and metrics in float64, data-parallel ZO and FSDP-sharded FT alike, with
only the main process writing."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import compose_config, read_metrics
from safetensors.torch import load_file

from lozo_exp import distributed
from lozo_exp import runner as runner_module
from lozo_exp.checkpoint import Checkpoints
from lozo_exp.config import ConfigError
from lozo_exp.methods import build_method
from lozo_exp.runner import Runner
from lozo_exp.runner import run as runner_run
from lozo_exp.signals import Preempted, StopSignals

# Float64, dropout off (FT's masks differ by process), batch 5 over 31 rows (OPT protocol):
# shards of 3 and 2 rows, and each epoch ends with one row, so a process gets no rows (weight 0).
OPT_ROWS = ("task.num_train=31", "task.num_dev=8", "task.num_eval=7")
EXACT = (
    "model.dtype=float64",
    "+model.arch.dropout=0.0",
    "+model.arch.attention_dropout=0.0",
    "method.batch_size=5",
    "trainer.max_steps=8",
    "trainer.eval_steps=4",
    "trainer.log_steps=1",
    "trainer.eval_batch_size=3",
)

ADAPTER = runner_module.adapter_class("causal")  # tiny-opt's


# -- one process ------------------------------------------------------------------------------


def test_shards_cover_the_batch_in_order_with_sizes_differing_by_at_most_one():
    for n in range(12):
        for world in (1, 2, 3, 5):
            parts = [distributed.split(n, k, world) for k in range(world)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_one_process_keeps_the_batch_the_loss_and_the_order():
    rows = [{"i": i} for i in range(5)]
    assert distributed.shard(rows) == (rows, 1.0)
    loss = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    assert distributed.global_mean(loss, 7) is loss
    done = []
    assert distributed.map_batches(lambda b: b * 2, [1, 2, 3], done.append) == [2, 4, 6]
    assert done == [1, 2, 3]


def _two_processes(monkeypatch, rank: int = 0) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


def test_a_process_without_rows_evaluates_one_for_nothing(monkeypatch):
    _two_processes(monkeypatch, rank=0)
    assert distributed.shard([{"i": 0}]) == ([{"i": 0}], 0.0)
    assert distributed.shard([{"i": 0}, {"i": 1}, {"i": 2}]) == ([{"i": 0}], 1.0)


def test_bad_launches_fail_in_one_paragraph_before_a_model_is_loaded(monkeypatch, tmp_path):
    _two_processes(monkeypatch)
    with pytest.raises(ConfigError, match=r"method\.batch_size=1 is smaller than the 2 processes"):
        Runner(compose_config("method=lozo", "method.batch_size=1"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"masked-LM adapter \(RoBERTa\) calls the encoder"):
        Runner(compose_config("model=tiny-roberta", "task=sst2", "method=ft"), tmp_path / "b")
    with pytest.raises(ConfigError, match=r"trainer\.device='cuda:1': under torchrun"):
        distributed.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes on this host, which has 1 GPU visible"):
        distributed.device("auto")
    assert distributed.device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.device("cuda") == torch.device("cuda", 1)


def test_sharded_fine_tuning_needs_its_share_of_the_memory_on_each_gpu(monkeypatch):
    methods = {m: build_method(compose_config(f"method={m}")) for m in ("ft", "ft-lora", "lozo")}
    one = {m: method.memory_floor(10**9, 4)[0] for m, method in methods.items()}
    _two_processes(monkeypatch)
    two = {m: method.memory_floor(10**9, 4) for m, method in methods.items()}
    assert two["ft"] == (one["ft"] // 2, two["ft"][1]) and "split across 2" in two["ft"][1]
    assert two["ft-lora"][0] == one["ft-lora"]  # LoRA's floor: the weights each process loads
    assert two["lozo"][0] == one["lozo"]  # zeroth-order: every process keeps the whole model
    monkeypatch.setattr(distributed, "world_size", lambda: 8)
    eight = methods["ft"].memory_floor(10**9, 4)  # 16 GB / 8 < the 4 GB every process loads
    assert eight[0] == 4 * 10**9 and "loads first" in eight[1]


def test_an_ft_checkpoint_continues_only_with_the_process_count_that_wrote_it(tmp_path):
    """FT's optimizer and RNG state are laid out per process; a ZO run replays with any."""
    saved = {"processes": 2, "config": {"method": {"name": "ft"}}}
    ft = Checkpoints(tmp_path, compose_config("method=ft"), replay=False)
    with pytest.raises(ConfigError, match=r"checkpointed by 2 processes and is resumed by 1"):
        ft.check_processes(saved)
    ft.check_processes({**saved, "processes": 1})
    Checkpoints(tmp_path, compose_config("method=lozo"), replay=True).check_processes(saved)


def test_the_processes_act_on_the_stop_signals_any_of_them_noted():
    """`agree` gives every process the union of the signals noted; one noted here but not in
    that union (it came after the all-reduce) waits for the next step boundary."""
    assert distributed.agree(True, [signal.SIGTERM]) == (True, [signal.SIGTERM])  # one process
    stops = StopSignals()
    stops.pending = [signal.SIGTERM]
    saved: list[int] = []
    stops.stop_if_signalled(3, lambda: saved.append(3), [])
    assert stops.pending == [signal.SIGTERM] and saved == []
    with pytest.raises(Preempted) as stop:
        stops.stop_if_signalled(4, lambda: saved.append(4), [signal.SIGUSR1])
    assert stop.value.signum == signal.SIGUSR1 and saved == [4]
    assert stops.pending == [signal.SIGTERM]


# -- two processes (gloo) ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """Join a gloo process group as torchrun's process `rank` of `world` would."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    distributed.init()


def _process(rank: int, world: int, port: int, overrides: tuple[str, ...], out: Path) -> None:
    """One process of a run: the runner with the trained weights saved (whole, if sharded)."""
    _join(rank, world, port)
    try:
        if rank == 0:
            (out / "run").mkdir(parents=True)
        runner = Runner(compose_config(*overrides), out / "run")
        runner.run()
        state = runner.state.trainable().items()
        params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in state}
        torch.save({n: p.detach().clone() for n, p in params.items()}, out / f"params{rank}.pt")
    finally:
        distributed.teardown()


def _run_both(tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    """The run in one process and across two: (params, metrics, results) of each."""
    single = tmp_path / "single"
    single.mkdir()
    runner = Runner(compose_config(*overrides), single)
    start = {n: p.detach().clone() for n, p in runner.state.trainable().items()}
    runner.run()
    assert any(not torch.equal(p, start[n]) for n, p in runner.state.trainable().items())
    one = {
        "params": {n: p.detach().clone() for n, p in runner.state.trainable().items()},
        "metrics": read_metrics(single),
        "results": json.loads((single / "results.json").read_text()),
    }
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    mp.start_processes(
        _process, args=(2, _free_port(), overrides, two_dir), nprocs=2, start_method="spawn"
    )
    two = {
        "params": [torch.load(two_dir / f"params{r}.pt") for r in (0, 1)],
        "metrics": read_metrics(two_dir / "run"),
        "results": json.loads((two_dir / "run" / "results.json").read_text()),
    }
    written = sorted(p.name for p in (two_dir / "run").iterdir())
    assert written == ["checkpoint.json", "metrics.jsonl", "results.json", "steps.jsonl"]
    return one, two


def _assert_same_run(one: dict, two: dict, rel: float) -> None:
    for name, p in one["params"].items():
        assert torch.equal(two["params"][0][name], two["params"][1][name]), name
        torch.testing.assert_close(two["params"][0][name], p, rtol=rel, atol=rel, msg=name)
    moved = [r for r in one["metrics"] if "loss" in r]
    assert len(moved) == 8 and [r["step"] for r in two["metrics"] if "loss" in r] == list(
        range(1, 9)
    )
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "projected_grad", "grad_norm", "accuracy", "f1", "dev_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=rel), (key, a, b)
    assert two["results"]["processes"] == 2 and one["results"]["processes"] == 1
    assert two["results"]["status"] == one["results"]["status"] == "completed"
    for key in ("dev", "test", "best_step"):
        assert two["results"][key] == pytest.approx(one["results"][key], rel=rel), key


@pytest.mark.slow  # two spawned processes and a one-process run, ~30 s each
@pytest.mark.parametrize(
    "model, method, task",
    [
        ("tiny-opt", "lozo", "sst2"),
        ("tiny-opt", "mezo", "squad"),  # the LM loss: a mean over answer tokens
        ("tiny-roberta", "mezo-lora", "sst2"),  # the masked family, LoRA
    ],
)
def test_data_parallel_zo_equals_the_one_process_run(tmp_path, model, method, task):
    rows = OPT_ROWS if model == "tiny-opt" else ()  # RoBERTa: the k-shot sample, 8 rows
    overrides = (f"model={model}", f"method={method}", f"task={task}", *rows, *EXACT)
    one, two = _run_both(tmp_path, *overrides)
    _assert_same_run(one, two, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, task",
    [("ft", "sst2"), ("ft-lora", "squad")],  # squad: generation under FSDP, processes in step
)
def test_fsdp_fine_tuning_equals_the_one_process_run(tmp_path, method, task):
    clip = ("trainer.max_grad_norm=0.5",) if method == "ft" else ()
    overrides = (f"method={method}", f"task={task}", "method.lr=1e-3", *clip, *OPT_ROWS, *EXACT)
    one, two = _run_both(tmp_path, *overrides)
    _assert_same_run(one, two, rel=1e-9)
    if clip:  # the clipping was active, on the global norm
        assert all(r["grad_norm"] > 0.5 for r in one["metrics"] if "grad_norm" in r)


@pytest.mark.slow
def test_fsdp_mixed_precision_trains_float32_shards_close_to_one_process(tmp_path):
    """fp16 compute on gathered fp16 weights, float32 shards and gradients, the loss scaler in
    step across processes: close to autocast in one process, not equal (there the embeddings
    and the residual stream stay float32; Adam's first steps move every weight by about lr
    whatever its gradient, so trajectories part ways; fp16 activations overflow sooner)."""
    fp16 = ("method=ft", "trainer.amp=fp16", "trainer.max_grad_norm=1.0", "method.lr=1e-3")
    one, two = _run_both(tmp_path, *fp16, *OPT_ROWS, *EXACT[1:])  # float32 weights
    assert all(p.dtype == torch.float32 for p in two["params"][0].values())
    logged = [[r for r in run["metrics"] if "loss" in r] for run in (one, two)]
    assert logged[1][0]["loss"] == pytest.approx(logged[0][0]["loss"], rel=1e-3)  # same weights
    norms = [[r["grad_norm"] for r in run if math.isfinite(r["grad_norm"])] for run in logged]
    assert len(norms[1]) >= 6  # the scaler skipped at most two steps
    ratio = statistics.median(norms[1]) / statistics.median(norms[0])
    assert 0.7 < ratio < 1.4  # the gradient of the global mean, not of a multiple of it
    assert two["results"]["status"] == "completed" and two["results"]["steps"] == 8


# -- long runs across processes: checkpoints, stop signals, resume ----------------------------

# Dropout on (each process's RNG state is saved and restored), a checkpoint every 3 steps.
LONG = (*OPT_ROWS, "model.dtype=float64", "method.batch_size=5", "trainer.max_steps=12",
        "trainer.eval_steps=4", "trainer.log_steps=1", "trainer.eval_batch_size=3",
        "trainer.checkpoint_steps=3", "trainer.save_final=true")  # fmt: skip
WRITES = {"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"}


def _session(
    rank: int,
    world: int,
    port: int,
    overrides: tuple[str, ...],
    run_dir: Path,
    resume: str,
    stop: tuple[str, int | None, int] | None,
) -> None:
    """One process of a session of a run: `stop` = (what, rank or None for all, at which loss
    call): "crash" raises there, a signal's name sends it to this process. Records how the
    session ended and every file this process wrote, renamed or removed in the run directory
    (an audit hook sees Python's and torch's writes, and the rename that ends each atomic
    write of safetensors' own)."""
    _join(rank, world, port)
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event not in WRITES:
            return
        path = str(args[1] if event == "os.rename" else args[0])
        write_mode = (
            event != "open"
            or (args[1] is not None and any(c in args[1] for c in "wax+"))
            or (args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        )
        if write_mode and path.startswith(str(run_dir)):
            writes.append(f"{event} {Path(path).name}")

    real, calls = ADAPTER.loss, [0]

    def loss(self, batch):
        calls[0] += 1
        if stop is not None and calls[0] == stop[2] and stop[1] in (None, rank):
            if stop[0] == "crash":
                raise RuntimeError("simulated crash")
            os.kill(os.getpid(), getattr(signal, stop[0]))
        return real(self, batch)

    ADAPTER.loss = loss
    sys.addaudithook(audit)
    try:
        runner_module.run(compose_config(*overrides), run_dir, resume)
        ended = "completed"
    except Preempted as err:
        ended = f"preempted at {err.step}"
    except RuntimeError as err:
        assert "simulated crash" in str(err)
        ended = "crashed"
    finally:
        distributed.teardown()
    record = {"ended": ended, "writes": writes}
    (run_dir.parent / f"{run_dir.name}-{resume}-{rank}.json").write_text(json.dumps(record))


def _sessions(run_dir: Path, overrides, resume="never", stop=None) -> list[dict]:
    """A session of the run in `run_dir` in two processes: what each recorded."""
    args = (2, _free_port(), tuple(overrides), run_dir, resume, stop)
    mp.start_processes(_session, args=args, nprocs=2, start_method="spawn")
    return [json.loads((run_dir.parent / f"{run_dir.name}-{resume}-{r}.json").read_text())
            for r in (0, 1)]  # fmt: skip


def _assert_only_the_main_process_wrote(sessions: list[dict]) -> None:
    main, other = (s["writes"] for s in sessions)
    assert other == [], other
    assert any("steps.jsonl" in w for w in main) and any("checkpoint.json" in w for w in main)


@pytest.mark.slow  # seven two-process sessions, ~2 min
def test_a_two_process_zo_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """LOZO-M (V refreshed every 4 steps, momentum): crashed in both processes mid-step, and
    stopped by a SIGTERM that only the second process got; each resumed by two processes
    (every one replays the step log) equals the uninterrupted two-process run bit for bit: the
    logged losses are the global means every process used. Resumed by one process instead, the
    same run continues (the same maths, the global mean summed in another order: 1e-9)."""
    from test_resume import assert_same_run, outcome

    overrides = ("method=lozo-m", "method.interval=4", *LONG)
    whole = tmp_path / "whole"
    _assert_only_the_main_process_wrote(_sessions(whole, overrides))

    crashed = tmp_path / "crashed"
    ended = _sessions(crashed, overrides, stop=("crash", None, 18))  # 2 calls a step, 2 for dev
    assert [s["ended"] for s in ended] == ["crashed", "crashed"]
    assert json.loads((crashed / "checkpoint.json").read_text())["step"] == 6
    shutil.copytree(crashed, tmp_path / "crashed-one")
    resumed = _sessions(crashed, overrides, resume="require")
    _assert_only_the_main_process_wrote(resumed)
    assert_same_run(crashed, whole)
    assert json.loads((crashed / "results.json").read_text())["resumed_at"] == [7]

    stopped = tmp_path / "stopped"
    ended = _sessions(stopped, overrides, stop=("SIGTERM", 1, 9))  # in step 4's dev evaluation
    assert ended[0]["ended"] == ended[1]["ended"] == "preempted at 4"  # both, at the same step
    assert json.loads((stopped / "checkpoint.json").read_text())["step"] == 4
    _sessions(stopped, overrides, resume="require")
    assert_same_run(stopped, whole)

    one = tmp_path / "crashed-one"
    runner_run(compose_config(*overrides), one, resume="require")
    a, b = outcome(one), outcome(whole)
    assert a["results"]["status"] == "completed" and a["metrics"][:8] == b["metrics"][:8]
    for name, w in b["weights"].items():
        torch.testing.assert_close(a["weights"][name], w, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow  # six two-process sessions, ~2 min
@pytest.mark.parametrize(
    "method, stop",
    [("ft", ("SIGUSR1", 0, 9)), ("ft-lora", ("crash", None, 8))],
)
def test_an_fsdp_run_checkpointed_and_resumed_equals_the_uninterrupted_one(tmp_path, method, stop):
    """FSDP-sharded FT (dropout on: each process's RNG) stopped by a signal only the main
    process got, and FT-LoRA crashed in both: the checkpoint gathers the shards into one
    safetensors file and AdamW's whole state; resumed by two processes (scattered back) the
    run equals the uninterrupted two-process one bit for bit."""
    from test_resume import assert_same_run

    overrides = (f"method={method}", "method.lr=1e-3", *LONG)
    whole = tmp_path / "whole"
    _assert_only_the_main_process_wrote(_sessions(whole, overrides))
    cut = tmp_path / "cut"
    ended = _sessions(cut, overrides, stop=stop)
    assert ended[0]["ended"] == ended[1]["ended"]
    saved = json.loads((cut / "checkpoint.json").read_text())
    assert saved["processes"] == 2 and saved["weights"] is not None
    weights = load_file(cut / saved["weights"])
    assert all(w.dtype == torch.float64 for w in weights.values())  # whole tensors, not shards
    resumed = _sessions(cut, overrides, resume="require")
    _assert_only_the_main_process_wrote(resumed)
    assert_same_run(cut, whole)
    assert json.loads((cut / "results.json").read_text())["resumed_at"] == [saved["step"]]


# -- the command line under torchrun ------------------------------------------------------------


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone")


def _torchrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, "-m", "lozo_exp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # torchrun with two processes, three times
def test_torchrun_launch_writes_one_run_directory_and_reports_bad_launches(tmp_path):
    steps = ("trainer.max_steps=4", "trainer.eval_steps=2", "trainer.log_steps=2")
    done = _torchrun(tmp_path, "method=lozo", *steps)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p.parent for p in tmp_path.glob("outputs/*/*/results.json")]
    assert len(runs) == 1 and len(list(tmp_path.glob("outputs/*/*"))) == 1
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["status"] == "completed" and results["processes"] == 2
    assert [r["step"] for r in read_metrics(runs[0]) if "loss" in r] == [2, 4]
    assert done.stdout.count("Results are in") == 1

    bad = _torchrun(tmp_path, "method=lozo", "method.batch_size=1", "hydra.run.dir=bad")
    assert bad.returncode != 0
    paragraph = "lozo-exp: Cannot split this run across processes: method.batch_size=1 is"
    assert bad.stderr.count(paragraph) == 1, bad.stderr  # the main process's
    assert "lozo_exp/" not in bad.stderr, bad.stderr  # no traceback of ours (torchrun's follows)
    assert json.loads((tmp_path / "bad" / "results.json").read_text())["status"] == "rejected"

    sweep = _torchrun(tmp_path, "-m", "method.lr=1e-3,1e-4", "hydra.sweep.dir=sweep")
    assert sweep.returncode != 0 and "a sweep (-m) under torchrun is not supported" in sweep.stderr
    assert not (tmp_path / "sweep").exists()  # refused before Hydra wrote anything


@pytest.mark.slow  # torchrun with two processes, twice
def test_torchrun_resumes_a_run_the_main_process_reads(tmp_path):
    """`torchrun ... -m lozo_exp resume=DIR`: the main process reads the run's config and
    checkpoint and sends them; a ZO run killed in one process continues in two (its steps
    replayed in each), an FT run checkpointed by one process is refused in one paragraph."""
    from test_resume import LONG as STEPS
    from test_resume import kill_at

    status, logged = kill_at(tmp_path / "lozo", 20, signal.SIGKILL, "method=lozo", *STEPS)
    assert status == -signal.SIGKILL and logged < 80
    done = _torchrun(tmp_path, f"resume={tmp_path / 'lozo'}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "lozo" / "results.json").read_text())
    assert results["status"] == "completed" and results["processes"] == 2
    assert len(results["resumed_at"]) == 1 and results["resumed_at"][0] >= 19  # 20: a dev eval
    logged = [json.loads(line)["step"] for line in (tmp_path / "lozo" / "steps.jsonl").open()]
    assert logged == list(range(1, 81))

    kill_at(tmp_path / "ft", 3, signal.SIGKILL, "method=ft", *STEPS)
    refused = _torchrun(tmp_path, f"resume={tmp_path / 'ft'}")
    assert refused.returncode != 0
    assert refused.stderr.count("was checkpointed by 1 process and is resumed by 2") == 1
    assert "lozo_exp/" not in refused.stderr, refused.stderr[-3000:]
