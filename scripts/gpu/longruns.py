"""The GPU measurements of issue 13 (long runs), run by scripts/gpu/longruns.sh.

- startup: OPT-13B and OPT-30B with random weights through the runner (`python -m lozo_exp`, a
  few LOZO steps): time from the command to the first step and peak host memory.
- big: OPT-66B through the runner, LOZO and MeZO, a few dozen steps and one dev evaluation:
  time to the first step, step time, GPU and host memory, and the size of its checkpoint.
- exactness: OPT-1.3B (fast engine) runs of LOZO, LOZO-M, MeZO and FT killed with SIGKILL once
  step 23 is logged, resumed with `lozo-exp resume=DIR`, against uninterrupted runs: are the
  losses, dev/test metrics, step logs and final weights bit-identical?
- replay: how long resuming a ZO run replays per 1k steps on OPT-13B (a synthetic log of
  losses, replayed by `lozo_exp.checkpoint.replay` on a model the runner built).

Every number comes from the runner's own files (results.json, metrics.jsonl, train.log) or its
replay function. Each part writes one JSON with its commands into --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TIMINGS = {"step_time_s", "mem_peak_mb", "eval_time_s", "peak_mem_mb"}
SAME = ("status", "dev", "test_sets", "steps", "best_step")


def log(message: str) -> None:
    print(f"[longruns {time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    cuda = device != "cpu" and torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "lozo_exp", *overrides]


def shown(overrides: list[str]) -> str:
    """The command as a user types it (the run directory left out)."""
    return "python -m lozo_exp " + shlex.join(o for o in overrides if not o.startswith("hydra."))


def run_overrides(model: str, method: str, device: str, extra: list[str]) -> list[str]:
    ft = ["trainer.epochs=null"] if method.startswith("ft") else []
    return [
        f"model={model}",
        "model.random_init=true",
        "task=sst2",
        "task.source=sample",
        "task.num_dev=16",
        f"method={method}",
        f"trainer.device={device}",
        *ft,
        *extra,
    ]


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a run directory says about speed and memory."""
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["step_time_s"] for r in records if "step_time_s" in r]
    text = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    params = re.search(r"loaded \S+ \(.*?([\d.]+)M parameters", text)
    size = sum(
        (run_dir / f).stat().st_size
        for f in ("checkpoint.json", "steps.jsonl")
        if (run_dir / f).exists()
    )
    return {
        "status": results["status"],
        "steps": results["steps"],
        "params_millions": float(params.group(1)) if params else None,
        "startup_s": results.get("startup_s"),
        "wall_time_s": results["wall_time_s"],
        "peak_host_rss_mb": results.get("peak_host_rss_mb"),
        "peak_mem_mb": results["peak_mem_mb"],
        "step_time_s_first_record": train[0] if train else None,
        "step_time_s_median_after_first": statistics.median(train[1:]) if train[1:] else None,
        "eval_time_s": [r["eval_time_s"] for r in records if r.get("split") == "dev"],
        "checkpoint_bytes": size,  # checkpoint.json + steps.jsonl: a ZO run's whole state
        "dev": results.get("dev"),
    }


def timed_run(run_dir: Path, overrides: list[str], timeout: int) -> dict[str, Any]:
    full = [f"hydra.run.dir={run_dir}", *overrides]
    log(f"running {shown(full)}")
    start = time.perf_counter()
    done = subprocess.run(command(full), capture_output=True, text=True, timeout=timeout)
    record: dict[str, Any] = {
        "command": shown(full),
        "exit_status": done.returncode,
        "command_wall_s": time.perf_counter() - start,
    }
    if done.returncode != 0:
        record["stderr_tail"] = done.stderr[-3000:]
        log(f"exit status {done.returncode}: {done.stderr[-1500:]}")
    if (run_dir / "results.json").exists():
        record |= read_run(run_dir)
    log(f"  -> {json.dumps({k: v for k, v in record.items() if k != 'stderr_tail'})}")
    return record


def startup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs = []
    for model in args.startup_models:
        extra = [
            f"trainer.max_steps={args.startup_steps}",
            "trainer.log_steps=1",
            f"trainer.eval_steps={args.startup_steps}",
        ]
        overrides = run_overrides(model, "lozo", args.device, extra)
        runs.append({"model": model, **timed_run(work / f"startup-{model}", overrides, 900)})
    return {
        "what": "random-init models through the runner: command to first step, host memory",
        "runs": runs,
    }


def big(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs = []
    for method in ("lozo", "mezo"):
        extra = [
            f"trainer.max_steps={args.big_steps}",
            f"trainer.eval_steps={args.big_steps}",
            f"trainer.log_steps={args.big_log_steps}",
        ]
        overrides = run_overrides(args.big_model, method, args.device, extra)
        run_dir = work / f"big-{method}"
        runs.append(
            {"model": args.big_model, "method": method, **timed_run(run_dir, overrides, 1200)}
        )
    return {
        "what": f"{args.big_model} (random init) end to end through the runner",
        "runs": runs,
    }


# -- exactness --------------------------------------------------------------------------------


def comparable(run_dir: Path) -> dict[str, Any]:
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = (run_dir / "final.safetensors").read_bytes()
    return {
        "metrics": [{k: v for k, v in r.items() if k not in TIMINGS} for r in records],
        "results": {k: results.get(k) for k in SAME},
        "steps": (run_dir / "steps.jsonl").read_text(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }


def exactness(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Uninterrupted and to-be-killed runs of every method at once (the GPU has room), then
    the resumes at once. A second uninterrupted run of each --control method says whether the
    method's steps themselves repeat bit for bit on the device (FT's backward has atomic adds on
    CUDA), apart from any resume."""
    extra = [
        f"trainer.max_steps={args.exact_steps}",
        "trainer.eval_steps=20",
        "trainer.log_steps=5",
        f"trainer.checkpoint_steps={args.exact_checkpoint_steps}",
        "trainer.save_final=true",
    ]
    procs, cases = {}, {}
    for method in args.exact_methods:
        overrides = run_overrides(args.exact_model, method, args.device, extra)
        cases[method] = overrides
        for kind in ("whole", "killed", *(["control"] if method in args.control else [])):
            full = [f"hydra.run.dir={work / f'{kind}-{method}'}", *overrides]
            procs[kind, method] = subprocess.Popen(
                command(full), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
    log(f"started {len(procs)} runs of {args.exact_model}: {', '.join(args.exact_methods)}")
    killed_at: dict[str, int] = {}
    deadline = time.monotonic() + 900
    while len(killed_at) < len(cases) and time.monotonic() < deadline:
        for method in cases:
            proc, steps = procs["killed", method], work / f"killed-{method}" / "steps.jsonl"
            if method in killed_at or proc.poll() is not None:
                killed_at.setdefault(method, -1)  # finished (or failed) before the kill
                continue
            if steps.exists() and steps.read_text().count("\n") >= args.kill_at:
                proc.send_signal(signal.SIGKILL)
                killed_at[method] = steps.read_text().count("\n")
        time.sleep(0.005)
    for proc in procs.values():
        proc.wait(timeout=900)
    log(f"killed at logged steps {killed_at}; resuming")
    resumes = {
        m: subprocess.Popen(
            command([f"resume={work / f'killed-{m}'}"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in cases
    }
    verdicts = []
    for method, proc in resumes.items():
        _, err = proc.communicate(timeout=900)
        entry: dict[str, Any] = {
            "method": method,
            "command": shown(cases[method]),
            "resume": f"python -m lozo_exp resume=RUN_DIR (exit status {proc.returncode})",
            "uninterrupted_exit_status": procs["whole", method].returncode,
            "killed_exit_status": procs["killed", method].returncode,
            "steps_logged_when_killed": killed_at.get(method),
        }
        try:
            a, b = comparable(work / f"killed-{method}"), comparable(work / f"whole-{method}")
            resumed = json.loads((work / f"killed-{method}" / "results.json").read_text())
            entry["resumed_at"] = resumed.get("resumed_at")
            entry["same"] = {k: a[k] == b[k] for k in a}
            entry["bit_identical"] = all(entry["same"].values())
            if method in args.control:
                c = comparable(work / f"control-{method}")
                entry["two_uninterrupted_runs_identical"] = {k: c[k] == b[k] for k in c}
        except (OSError, ValueError, KeyError) as error:
            entry["bit_identical"] = False
            entry["error"] = f"{type(error).__name__}: {error}; resume stderr: {err[-2000:]}"
        verdicts.append(entry)
        log(f"  {method}: {json.dumps(entry)}")
    return {
        "what": "runs killed with SIGKILL and resumed vs uninterrupted runs (fast engine)",
        "verdict": "bit-identical" if all(v["bit_identical"] for v in verdicts) else "DIFFERENT",
        "runs": verdicts,
    }


# -- replay -----------------------------------------------------------------------------------


def replay_time(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from lozo_exp import cli
    from lozo_exp.checkpoint import replay
    from lozo_exp.methods import build_method
    from lozo_exp.optim import LOZO, FastEngine
    from lozo_exp.runner import Runner, RunState
    from lozo_exp.tracking import synchronize

    overrides = run_overrides(args.replay_model, "lozo", args.device, [])
    cfg = cli.run_config(overrides)
    runner = Runner(cfg, work / "replay")  # builds the model on the device, as a run does
    model, device = runner.state.model, runner.device
    gen = torch.Generator().manual_seed(0)
    noise = 0.7 + 0.01 * torch.randn(args.replay_steps + args.replay_warmup, 2, generator=gen)
    records = [
        {"step": k + 1, "loss": a, "loss2": b, "lr": 1e-7}
        for k, (a, b) in enumerate(noise.double().tolist())
    ]

    # LOZO with every covered matrix in place: one real step under placement="in_place".
    opt = LOZO(model.named_parameters(), lr=1e-7, rank=2, interval=50, seed=1)
    opt.use_engine(FastEngine(opt, model, placement="in_place"))
    ids = torch.randint(4, 1000, (2, 16), device=device)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    in_place = [list(x) for x in opt.last_placement()]

    def timed(state: RunState, what: str, first: dict[str, Any]) -> dict[str, Any]:
        steps = [{**records[0], **first}, *records[1:]]
        replay(state, steps[: args.replay_warmup], every_s=60)  # compiles, caches
        synchronize(device)
        start = time.perf_counter()
        replay(state, steps[args.replay_warmup :], every_s=60)
        synchronize(device)
        seconds = time.perf_counter() - start
        per_step = seconds / args.replay_steps
        log(f"  {what}: {1e3 * per_step:.2f} ms per step")
        return {
            "what": what,
            "steps": args.replay_steps,
            "seconds": seconds,
            "ms_per_step": 1e3 * per_step,
            "s_per_1k_steps": 1e3 * per_step,
        }

    results = []
    for method, what, first in (
        ("lozo", "LOZO, side path (short inputs: the OPT runs at batch 16)", {}),
        ("lozo", "LOZO, every covered matrix in place (long inputs)", {"in_place": [*in_place]}),
        ("lozo-m", "LOZO-M, side path", {}),
        ("mezo", "MeZO (fused passes)", {}),
    ):
        method_cfg = cli.run_config(run_overrides(args.replay_model, method, args.device, []))
        built = build_method(method_cfg)
        built.prepare_model(model)
        optimizer = built.build_optimizer(model, cfg.seed)
        results.append(timed(RunState(model, optimizer, cfg.seed, built), what, first))
        del optimizer
    n = sum(p.numel() for p in model.parameters())
    return {
        "what": "replaying a logged ZO run (resume), per 1k steps, on the model the runner built",
        "model": args.replay_model,
        "params": n,
        "dtype": cfg.model.dtype,
        "warmup_steps": args.replay_warmup,
        "command": f"python scripts/gpu/longruns.py --parts replay --replay-model "
        f"{args.replay_model} --replay-steps {args.replay_steps} --device {args.device}",
        "replays": results,
    }


PARTS = {"startup": startup, "big": big, "exactness": exactness, "replay": replay_time}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--startup-models", nargs="+", default=["opt-13b", "opt-30b"])
    p.add_argument("--startup-steps", type=int, default=4)
    p.add_argument("--big-model", default="opt-66b")
    p.add_argument("--big-steps", type=int, default=30)
    p.add_argument("--big-log-steps", type=int, default=5)
    p.add_argument("--exact-model", default="opt-1.3b")
    p.add_argument("--exact-methods", nargs="+", default=["lozo", "lozo-m", "mezo", "ft"])
    p.add_argument("--exact-steps", type=int, default=60)
    p.add_argument("--kill-at", type=int, default=23)
    # FT of OPT-1.3B writes 15 GB (fp32 weights and AdamW moments) per checkpoint
    p.add_argument("--exact-checkpoint-steps", type=int, default=7)
    p.add_argument("--control", nargs="*", default=["ft"])
    p.add_argument("--replay-model", default="opt-13b")
    p.add_argument("--replay-steps", type=int, default=200)
    p.add_argument("--replay-warmup", type=int, default=10)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    for part in args.parts:
        with tempfile.TemporaryDirectory(prefix=f"longruns-{part}-") as tmp:
            log(f"== {part}")
            start = time.perf_counter()
            try:
                report = PARTS[part](args, Path(tmp))
            except Exception as err:  # keep the other parts' numbers
                report = {"error": f"{type(err).__name__}: {err}"}
                log(f"{part} failed: {report['error']}")
            report |= {"env": env, "part_wall_s": time.perf_counter() - start}
            path = args.out / f"longruns_{part}.json"
            path.write_text(json.dumps(report, indent=2, default=_finite) + "\n")
            log(f"wrote {path} ({report['part_wall_s']:.0f} s)")


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


if __name__ == "__main__":
    main()
