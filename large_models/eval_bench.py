"""Evaluation throughput of the causal adapter: batched vs one example at a time, same run.

    lozo-exp eval-bench --out bench.json [--tasks boolq,squad] [--rows 64] [--single-rows 16]
        [overrides ...]        (or python -m large_models.eval_bench ...)

Overrides are the usual Hydra ones (`model=opt-1.3b model.random_init=true
trainer.eval_batch_size=16`); the data are the bundled samples (`task.source=sample`, rows
repeated up to `--rows`), so it runs offline. For each task it times `predict` over the rows in
batches of `trainer.eval_batch_size` (candidate scoring, or greedy generation of up to 50 tokens)
and over the first `--single-rows` rows one at a time, and records how often the two agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from large_models.adapter import CausalLMAdapter
from lozo_exp import cli
from lozo_exp.adapter import load_task
from lozo_exp.config import ConfigError, RunConfig, TaskConfig, validate
from lozo_exp.data import load_rows
from lozo_exp.models import load_model, load_tokenizer, resolve_model
from lozo_exp.tracking import resolve_device, synchronize

log = logging.getLogger("eval_bench")


def _compose(overrides: Sequence[str]) -> RunConfig:
    run_cfg: RunConfig = cli.to_object(cli.compose("config", ["task.source=sample", *overrides]))
    run_cfg.model = resolve_model(run_cfg.model)  # a local checkpoint's family from its config
    validate(run_cfg)
    if run_cfg.model.family != "causal":
        raise ConfigError(f"eval_bench measures causal models; model {run_cfg.model.name} is not")
    return run_cfg


def _timed(adapter: CausalLMAdapter, rows: list[dict], batch_size: int) -> tuple[list, float]:
    synchronize(adapter.device)
    start = time.perf_counter()
    predictions = [
        p
        for i in range(0, len(rows), batch_size)
        for p in adapter.predict(rows[i : i + batch_size])
    ]
    synchronize(adapter.device)
    return predictions, time.perf_counter() - start


def bench_task(
    cfg: RunConfig, model, tokenizer, task_cfg: TaskConfig, n_rows: int, n_single: int
) -> dict:
    name = task_cfg.name
    task = load_task("causal", name)
    sample = load_rows(task_cfg, "validation") + load_rows(task_cfg, "train")
    rows = (sample * (n_rows // len(sample) + 1))[:n_rows]
    adapter = CausalLMAdapter(model, tokenizer, task, cfg.model)
    batch_size = cfg.trainer.eval_batch_size
    adapter.predict(rows[:batch_size])  # warm-up (kernels, allocator)
    batched, t_batched = _timed(adapter, rows, batch_size)
    single, t_single = _timed(adapter, rows[:n_single], 1)
    prompt_tokens = [len(tokenizer(adapter.render(r).context)["input_ids"]) for r in rows]
    result = {
        "kind": "generation" if task.generation else "candidate scoring",
        "rows_batched": len(rows),
        "rows_single": n_single,
        "batch_size": batch_size,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "batched_examples_per_s": len(rows) / t_batched,
        "single_examples_per_s": n_single / t_single,
        "agreement": sum(a == b for a, b in zip(batched, single, strict=False)) / n_single,
    }
    result["speedup"] = result["batched_examples_per_s"] / result["single_examples_per_s"]
    log.info("%s: %s", name, json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lozo-exp eval-bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--tasks", default="boolq,squad", help="comma-separated OPT tasks")
    parser.add_argument("--rows", type=int, default=64, help="rows evaluated in batches")
    parser.add_argument("--single-rows", type=int, default=16, help="rows evaluated one by one")
    parser.add_argument("--verbose", action="store_true", help="debug logs, progress bars")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=opt-1.3b")
    args = parser.parse_args(argv)
    cli.start(args.verbose)
    try:
        cfg = _compose(args.overrides)
        task_cfgs = [_compose([f"task={name}"]).task for name in args.tasks.split(",")]
    except ConfigError as err:
        cli.fail(err)
    device = resolve_device(cfg.trainer.device)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, tokenizer, device).eval()
    n_single = min(args.single_rows, args.rows)
    tasks = {t.name: bench_task(cfg, model, tokenizer, t, args.rows, n_single) for t in task_cfgs}
    report = {
        "model": cfg.model.name,
        "random_init": cfg.model.random_init,
        "dtype": cfg.model.dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "max_length": cfg.model.max_length,
        "tasks": tasks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
