"""Several GPUs (issue 18), measured with the runner itself (`scripts/gpu/multigpu.sh` runs it).

- Data-parallel ZO: LOZO on a random-init model (OPT-13B on the GPU machine) at batch 16 (the
  paper's) and 64, in one process and under `torchrun --nproc_per_node=2`: step time (the
  runner's `step_time_s`, steps after the first log interval), speedup and scaling efficiency
  t1 / (2·t2), and the share of a 2-GPU step spent in its two all-reduces, from the latency of
  `distributed.global_mean` measured alone (`allreduce`, under torchrun). The 1- and 2-process
  losses of the same steps are compared too (fp16: equal up to rounding).
- FT with FSDP on 2 GPUs: the FT recipe (AdamW, fp16 autocast with a loss scaler over float32
  weights, clipping at 1.0) on the largest model of `--ft-models` that completes (tried in
  order), its step time and peak memory; the bytes per GPU the next OPT size would need.
- FT-LoRA with FSDP on SQuAD: the generation path (`synced_gpus`) on 2 GPUs.

Data: the bundled SST-2 / SQuAD samples, their train split repeated to 1,040 rows (batch 64 needs
more than the 48 sample rows; the time of a step does not depend on which rows it holds).

`python scripts/gpu/multigpu.py run --out DIR [--device cpu --model tiny-opt ...]` writes
DIR/multigpu.json (every command, its exit status, the numbers). `allreduce` is its helper.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "lozo_exp" / "samples"
TRAIN_ROWS = 1040
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Bytes per parameter of full FT with AdamW over float32 weights: weights, gradients, two moments.
FT_BYTES_PER_PARAM = 16
OPT_SIZES = {  # parameters (the published configs), for the size after the largest that fits
    "opt-125m": 125e6,
    "opt-350m": 331e6,
    "opt-1.3b": 1.3e9,
    "opt-2.7b": 2.7e9,
    "opt-6.7b": 6.7e9,
    "opt-13b": 12.9e9,
    "opt-30b": 30.0e9,
    "opt-66b": 66.0e9,
}


def write_data(task: str, folder: Path) -> list[str]:
    """The task's sample with its train split repeated to TRAIN_ROWS rows: data_files overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = (SAMPLES / task / "train.jsonl").read_text().splitlines()
    train = folder / f"{task}-train.jsonl"
    train.write_text("\n".join(rows[i % len(rows)] for i in range(TRAIN_ROWS)) + "\n")
    validation = SAMPLES / task / "validation.jsonl"
    return [
        "task.source=hub",
        f"task.data_files.train={train}",
        f"task.data_files.validation={validation}",
    ]


class Runs:
    """Runs commands one after another, printing each, and keeps what each one did."""

    def __init__(self, work: Path, timeout_s: int) -> None:
        self.work, self.timeout_s = work, timeout_s
        self.commands: list[dict[str, Any]] = []

    def lozo_exp(self, name: str, args: list[str], processes: int = 1) -> dict[str, Any]:
        """`python -m lozo_exp ARGS` (under torchrun if `processes` > 1) into its own run
        directory: its results.json's status and the step times of its metrics.jsonl."""
        run_dir = self.work / name
        start = [sys.executable, "-m", "lozo_exp"]
        if processes > 1:
            start = [*TORCHRUN, f"--nproc_per_node={processes}", "-m", "lozo_exp"]
        self.shell(name, [*start, *args, f"hydra.run.dir={run_dir}"])
        try:
            results = json.loads((run_dir / "results.json").read_text())
        except OSError:
            results = {}
        return {
            "name": name,
            "status": results.get("status", "missing"),
            "error": results.get("error"),
            "processes": results.get("processes"),
            "peak_mem_mb_rank0": results.get("peak_mem_mb"),
            "test": results.get("test"),
            **step_times(run_dir),
        }

    def shell(self, name: str, command: list[str]) -> int:
        text = shlex.join(command).replace(sys.executable, "python")
        print(f"\n== {name}: {text}", flush=True)
        started = time.perf_counter()
        try:
            code = subprocess.run(command, timeout=self.timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = -1
        seconds = round(time.perf_counter() - started, 1)
        print(f"== {name}: exit status {code} after {seconds} s", flush=True)
        self.commands.append(
            {"name": name, "command": text, "exit_status": code, "wall_s": seconds}
        )
        return code


def step_times(run_dir: Path) -> dict[str, Any]:
    """Mean step time over the logged intervals after the first (warm-up), and the losses."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return {}
    logged = [r for r in map(json.loads, lines) if "loss" in r]
    if not logged:
        return {}
    timed = logged[1:] or logged
    return {
        "step_time_s": statistics.fmean(r["step_time_s"] for r in timed),
        "steps_timed": timed[-1]["step"] - (logged[0]["step"] if len(logged) > 1 else 0),
        "losses": [r["loss"] for r in logged],
        "mem_peak_mb": max(r["mem_peak_mb"] for r in logged),
    }


def common(model: str, data: list[str], steps: int, device: str) -> list[str]:
    """A short run on a random-init model: `steps` steps logged in thirds, one evaluation."""
    return [
        f"model={model}",
        "model.random_init=true",
        *data,
        "task.num_train=1000",
        "task.num_dev=16",
        "task.num_eval=16",
        "trainer.epochs=null",
        f"trainer.max_steps={steps}",
        f"trainer.eval_steps={steps}",
        f"trainer.log_steps={max(1, steps // 3)}",
        "trainer.eval_batch_size=16",
        f"trainer.device={device}",
        "trainer.checkpoint_minutes=null",  # step times without checkpoint writes (step 0's)
    ]


def scaling(zo_runs: list[dict[str, Any]], allreduce_s: float | None) -> list[dict[str, Any]]:
    """Per batch: 1- vs 2-GPU step time, speedup, efficiency t1 / (2·t2), the share of a 2-GPU
    step its two all-reduces take, and how far apart the two runs' logged losses are."""
    rows = []
    for batch in sorted({r["batch"] for r in zo_runs}):
        one, two = (
            next(r for r in zo_runs if r["batch"] == batch and r["gpus"] == g) for g in (1, 2)
        )
        t1, t2 = one.get("step_time_s"), two.get("step_time_s")
        if not (t1 and t2):
            continue
        pairs = list(zip(one["losses"], two["losses"], strict=False))
        rows.append(
            {
                "batch": batch,
                "step_time_1gpu_s": t1,
                "step_time_2gpu_s": t2,
                "speedup": t1 / t2,
                "efficiency": t1 / (2 * t2),
                "allreduce_share": 2 * allreduce_s / t2 if allreduce_s else None,
                "loss_max_rel_diff": max(abs(a - b) / abs(a) for a, b in pairs),
            }
        )
    return rows


def next_size(model: str) -> dict[str, Any] | None:
    """The OPT size after `model` and the memory per GPU (of two) its full FT state needs."""
    sizes = list(OPT_SIZES)
    if model not in sizes or model == sizes[-1]:
        return None
    bigger = sizes[sizes.index(model) + 1]
    per_gpu = OPT_SIZES[bigger] * FT_BYTES_PER_PARAM / 2 / 2**30
    return {
        "model": bigger,
        "params": OPT_SIZES[bigger],
        "gib_per_gpu_weights_grads_adamw": per_gpu,
    }


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="multigpu-"))
    runs = Runs(work, args.timeout_s)
    sst2, squad = write_data("sst2", work / "data"), write_data("squad", work / "data")
    started = time.perf_counter()

    zo_runs = []  # data-parallel ZO: 1 vs 2 processes at each batch
    for batch in args.batches:
        for gpus in (1, 2):
            zo = common(args.model, sst2, args.steps, args.device)
            name = f"zo-{gpus}gpu-b{batch}"
            result = runs.lozo_exp(name, [*zo, "method=lozo", f"method.batch_size={batch}"], gpus)
            zo_runs.append({"gpus": gpus, "batch": batch, **result})

    latency = work / "allreduce.json"  # the all-reduce of a step's loss terms, alone
    helper = [__file__, "allreduce", "--device", args.device, "--out", str(latency)]
    runs.shell("allreduce", [*TORCHRUN, "--nproc_per_node=2", *helper])
    allreduce = json.loads(latency.read_text()) if latency.exists() else {}

    ft_tried, largest = [], None  # FT with FSDP on 2 processes: the largest model that runs
    for model in args.ft_models:
        ft = common(model, sst2, args.ft_steps, args.device)
        ft_tried.append(
            {"model": model, **runs.lozo_exp(f"ft-2gpu-{model}", [*ft, "method=ft"], 2)}
        )
        if ft_tried[-1]["status"] == "completed":
            largest = model
            break

    lora = common(args.lora_model, squad, 4, args.device)  # generation in step on both GPUs
    lora_run = runs.lozo_exp("ft-lora-2gpu-squad", [*lora, "method=ft-lora", "task=squad"], 2)

    report = {
        "env": allreduce.pop("env", {"device": args.device}),
        "zo": {
            "model": args.model,
            "method": "lozo",
            "task": "sst2",
            "runs": zo_runs,
            "scaling": scaling(zo_runs, allreduce.get("median_s")),
        },
        "allreduce": allreduce,
        "ft": {
            "recipe": "AdamW, fp16 autocast and loss scaler over float32 weights, gradient norm "
            "clipped at 1.0, batch 8 (conf/hparams/opt/ft.yaml), FSDP2 on 2 processes",
            "tried": ft_tried,
            "largest_that_fits": largest,
            "next_size": next_size(largest) if largest else None,
        },
        "ft_lora_squad": {"model": args.lora_model, **lora_run},
        "commands": runs.commands,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    (out / "multigpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("allreduce", "ft")}, indent=2))
    print(json.dumps(report["zo"]["scaling"], indent=2))
    print(f"JSON: {out / 'multigpu.json'}")


def allreduce(args: argparse.Namespace) -> None:
    """Under torchrun: the latency of `distributed.global_mean` (one all-reduce of a loss and
    its count, as each of a ZO step's two evaluations does), median of `--calls`."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from lozo_exp import distributed

    distributed.init()
    device = distributed.device(args.device)
    loss = torch.tensor(0.5, device=device)
    times = []
    for k in range(args.calls + 20):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        float(distributed.global_mean(loss, 32))  # the loss is read, as the slope reads it
        if k >= 20:
            times.append(time.perf_counter() - start)
    if distributed.is_main():
        cuda = device.type == "cuda"
        env = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "gpus": torch.cuda.device_count(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        }
        record = {
            "median_s": statistics.median(times),
            "p90_s": sorted(times)[int(0.9 * len(times))],
            "calls": len(times),
            "backend": "nccl" if cuda else "gloo",
            "env": env,
        }
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    distributed.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--ft-models", nargs="+", default=["opt-13b", "opt-6.7b"])
    p.add_argument("--ft-steps", type=int, default=6)
    p.add_argument("--lora-model", default="opt-1.3b")
    p.add_argument("--timeout-s", type=int, default=300)
    p = sub.add_parser("allreduce")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    {"run": run, "allreduce": allreduce}[args.command](args)


if __name__ == "__main__":
    main()
