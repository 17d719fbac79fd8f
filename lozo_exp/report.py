"""`lozo-exp report RUN_DIR... --out DIR`: a directory of runs in, the paper's tables and figures
out.

A run is a directory holding `.hydra/config.yaml` and the runner's `results.json` and/or
`metrics.jsonl` (without results.json it is still running, was killed, or stopped before
training). Each run is one row of `runs.csv`. A table cell (model, k, task, method) follows the
papers' protocol: a *setting* is one value of the cell's hyperparameters (the config keys whose
values differ between its runs, and the keys set on the command line); the setting with the best
mean dev metric over its seeds is chosen, and the cell reports the mean ± std over those seeds of
its test metric, in points (×100), beside the paper's number (`results/paper/reported.csv`). With
one seed per setting (the OPT tables) this is best-by-dev per task; over the five data seeds of
the RoBERTa tables it is best mean dev. `--select per-seed` picks the best setting for each seed
instead, as LM-BFF's `tools/gather_result.py` does. Failed, diverged, missing and unfinished runs
are named in their cell, never averaged in; a setting missing a seed is chosen only when no
setting has them all (the cell then says "partial").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf

from lozo_exp import cli
from lozo_exp.config import ConfigError
from lozo_exp.tracking import Progress, flatten

log = logging.getLogger("lozo_exp.report")

SCALE = 100.0  # metrics are fractions; tables show points, like the papers
CELL = ["model", "k", "task", "method"]
SEED_KEYS = ("seed", "task.data_seed", "task.train_set_seed")
# Config keys that name the cell, or never change a result.
NOT_HYPERPARAMETERS = ("model.name", "task.name", "method.name", "task.k", "task.num_train")
BOOKKEEPING_PREFIXES = ("logger.", "trainer.device", "trainer.progress_every_s")
# fmt: off
TASK_ORDER = {  # the papers' column order
    "causal": ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad",
               "drop"),
    "masked": ("sst2", "sst5", "snli", "mnli", "rte", "trec"),
}
METHOD_ORDER = ("zero-shot", "icl", "lp", "mezo", "mezo-lora", "mezo-prefix", "lozo", "lozo-m",
                "ft", "ft-lora", "ft-prefix")
PAPER_COLUMNS = ["model", "k", "task", "method", "metric", "value", "std", "setting", "source",
                 "confidence"]
PAPER_MEMORY_COLUMNS = ["model", "method", "memory_gb", "gpus", "note", "source", "confidence"]
# fmt: on
SELECTIONS = ("mean-dev", "per-seed")
CONFIDENCE_RANK = {"high": 0, "medium": 1, "low-medium": 2, "low": 3}


class ReportError(ConfigError):
    """Bad input to the report, said in one paragraph."""


def paper_dir() -> Path:
    """The papers' numbers: inside an installed package (`lozo_exp/paper`), else the checkout's
    `results/paper/`."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "paper", package.parent / "results" / "paper"):
        if (candidate / "reported.csv").is_file():
            return candidate
    return package.parent / "results" / "paper"  # read_paper says it is missing


# ----------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # .hydra/config.yaml, flattened: {"method.lr": 1e-6, ...}
    overrides: list[str]  # the command line's overrides (.hydra/overrides.yaml)
    results: dict[str, Any]  # results.json ({} while the run has none)
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl

    @property
    def override_keys(self) -> list[str]:
        """Config keys set on the command line (group choices like `method=lozo` included)."""
        return [o.split("=", 1)[0].lstrip("+~") for o in self.overrides if "=" in o]

    @cached_property
    def training(self) -> pd.DataFrame:
        """Training records (step, loss, lr, step_time_s, mem_peak_mb, ...)."""
        rows = [r for r in self.records if "split" not in r and "loss" in r]
        return pd.DataFrame(rows, columns=None if rows else ["step", "loss"])


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a line cut off by a killed run is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _yaml(path: Path) -> Any:
    """A YAML file as Python objects (libyaml's parser when present: 10× faster than
    OmegaConf.load, which matters for thousands of runs)."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_run(path: Path) -> Run | None:
    """The run in `path`, or None when its config is not a training run's (e.g. a benchmark)
    or cannot be read."""
    try:
        tree = _yaml(path / ".hydra" / "config.yaml")
        if "${" in json.dumps(tree, default=str):  # interpolations (e.g. the RoBERTa recipe's seed)
            tree = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except Exception as err:  # a half-written or hand-edited file: say so, read the others
        log.warning("skipping %s: its .hydra/config.yaml cannot be read (%s)", path, err)
        return None
    config = flatten(tree) if isinstance(tree, dict) else {}
    if not all(k in config for k in ("model.name", "task.name", "method.name")):
        return None
    read = {".hydra/overrides.yaml": _yaml, "results.json": lambda f: json.loads(f.read_text())}
    found: dict[str, Any] = {}
    for name, parse in read.items():
        try:
            found[name] = parse(path / name) if (path / name).is_file() else None
        except Exception as err:  # as for the config: say so, read the others
            log.warning("skipping %s: its %s cannot be read (%s)", path, name, err)
            return None
    overrides = [str(o) for o in found[".hydra/overrides.yaml"] or []]
    results = found["results.json"] or {}
    return Run(path, config, overrides, results, _json_lines(path / "metrics.jsonl"))


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Every run directory under `paths` (each may itself be a run)."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ReportError(
            f"{', '.join(missing)} does not exist: give the directories that hold the runs "
            f"(e.g. multirun/ or outputs/, or one run's directory)"
        )
    found = {cfg.parent.parent for p in paths for cfg in p.rglob(".hydra/config.yaml")}
    return sorted(found)


def read_runs(paths: Sequence[Path], progress_every_s: float = 5.0) -> list[Run]:
    dirs = find_runs(paths)
    progress = Progress("runs read", len(dirs), progress_every_s)
    runs = []
    for i, d in enumerate(dirs, 1):
        run = read_run(d)
        if run is not None:
            runs.append(run)
        progress.update(i)
    if not runs:
        raise ReportError(
            f"found no runs under {', '.join(map(str, paths))}: a run directory holds "
            f".hydra/config.yaml with results.json or metrics.jsonl, as `python -m lozo_exp` "
            f"writes them under outputs/ and multirun/; point the report at those directories"
        )
    return runs


# ----------------------------------------------------------------------------- runs.csv


def run_row(run: Run) -> dict[str, Any]:
    """One row of runs.csv: identity, seeds, status, metrics, cost (not the hyperparameters)."""
    c, r = run.config, run.results
    family = c.get("model.family")
    final = next((x for x in reversed(run.records) if x.get("split") == "final"), {})
    train = run.training
    metric = r.get("metric")
    row: dict[str, Any] = {
        "run_dir": str(run.path),
        "model": c["model.name"],
        "family": family,
        "task": c["task.name"],
        "method": c["method.name"],
        # k: examples per label for masked LMs (LM-BFF), training examples for causal LMs
        "k": c.get("task.k") if family == "masked" else c.get("task.num_train"),
        "seed": c.get("seed"),
        "data_seed": c.get("task.data_seed") if family == "masked" else None,
        "train_set_seed": c.get("task.train_set_seed") if family == "causal" else None,
        "status": r.get("status") or final.get("status") or "incomplete",
        "metric": metric,
    }
    dev = r.get("dev") or {}
    test_sets = r.get("test_sets") or {}
    first = next(iter(test_sets.values()), r.get("test") or {})
    row["dev"] = dev.get(metric)
    row["test"] = first.get(metric)
    row["test_sets"] = " ".join(test_sets)
    row.update({f"dev_{k}": v for k, v in dev.items()})
    for name, scores in test_sets.items():
        row.update({f"{name}_{k}": v for k, v in scores.items()})
    steps = int(train["step"].max()) if len(train) else 0
    peak = train["mem_peak_mb"].max() if "mem_peak_mb" in train else None
    row.update(
        steps=r.get("steps", steps),
        best_step=r.get("best_step"),
        wall_time_s=r.get("wall_time_s"),
        peak_mem_mb=r.get("peak_mem_mb", final.get("peak_mem_mb", peak)),
        step_time_s=train["step_time_s"].mean() if "step_time_s" in train else None,
        last_loss=train["loss"].iloc[-1] if len(train) else None,
        error=r.get("error"),
    )
    return row


def hyperparameter_keys(runs: Sequence[Run], cells: pd.DataFrame) -> list[str]:
    """Config keys that vary within a cell (model, k, task, method) or were set on the command
    line: the settings a sweep compares. Seeds and the keys naming the cell are left out."""
    configs = pd.DataFrame([r.config for r in runs])
    keys = {k for r in runs for k in r.override_keys if k in configs}
    for _, idx in cells.astype(str).groupby(CELL).groups.items():
        group = configs.loc[idx].astype(str)  # a key absent from some runs reads "nan"
        keys.update(group.columns[group.nunique() > 1])
    skip = (*SEED_KEYS, *NOT_HYPERPARAMETERS)
    return sorted(k for k in keys if k not in skip and not k.startswith(BOOKKEEPING_PREFIXES))


def runs_frame(runs: Sequence[Run]) -> tuple[pd.DataFrame, list[str]]:
    """The runs as one DataFrame (one row per run) and its hyperparameter columns."""
    frame = pd.DataFrame([run_row(r) for r in runs])
    keys = hyperparameter_keys(runs, frame[CELL])
    frame = pd.concat(
        [frame, pd.DataFrame([[r.config.get(k) for k in keys] for r in runs], columns=keys)], axis=1
    )
    for column in ("seed", "data_seed", "train_set_seed", "k", "steps", "best_step"):
        frame[column] = pd.to_numeric(frame[column]).astype("Int64")
    first = ["run_dir", *CELL, "family", *keys, "seed", "data_seed", "train_set_seed", "status"]
    return frame[first + [c for c in frame.columns if c not in first]], keys


# ----------------------------------------------------------------------------- the protocol


@dataclass
class Cell:
    """One table cell: the chosen setting's test metric over seeds, and what went wrong."""

    model: str
    k: Any
    task: str
    method: str
    family: str | None
    metric: str | None
    mean: float = math.nan  # points (×100)
    std: float = math.nan  # over seeds, ddof=0 (numpy's, as LM-BFF's gather_result.py)
    n: int = 0  # seeds averaged
    setting: str = ""  # the chosen hyperparameters, "key=value ..."
    tests: dict[str, float] = field(default_factory=dict)  # mean per test set (points)
    notes: list[str] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)  # the runs averaged
    paper: float = math.nan
    paper_std: float = math.nan
    paper_source: str = ""
    paper_confidence: str = ""

    @property
    def diff(self) -> float:
        return self.mean - self.paper


def _label(row: pd.Series, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={row[k]}" for k in keys)


def _problems(runs: pd.DataFrame) -> list[str]:
    """What the cell's numbers leave out: runs not completed, seeds a setting lacks, re-runs."""
    notes = [f"{n} {status}" for status, n in runs["status"].value_counts().items()]
    notes = [note for note in notes if not note.endswith(" completed")]
    seeds = set(runs["seed_id"])
    missing = sum(len(seeds - set(g["seed_id"])) for _, g in runs.groupby("setting"))
    if missing:
        notes.append(f"{missing} missing")
    done = runs[runs["status"] == "completed"]
    reruns = len(done) - len(done.drop_duplicates(["setting", "seed_id"]))
    if reruns:
        notes.append(f"{reruns} re-run{'s' if reruns > 1 else ''} (newest kept)")
    return notes


def select_cell(runs: pd.DataFrame, keys: Sequence[str], select: str = "mean-dev") -> Cell:
    """Apply the protocol to the runs of one cell (see the module docstring)."""
    first = runs.iloc[0]
    metric = runs["metric"].dropna().iloc[0] if runs["metric"].notna().any() else None
    cell = Cell(first["model"], first["k"], first["task"], first["method"], first["family"], metric)
    seeds = runs[["seed", "data_seed", "train_set_seed"]].astype("string").fillna("-")
    seed_id = seeds.agg("/".join, axis=1)
    runs = runs.assign(seed_id=seed_id, setting=runs.apply(_label, axis=1, keys=keys))
    cell.notes = _problems(runs)
    # Completed runs with a dev metric; of several runs of one seed and setting, the newest.
    done = runs[(runs["status"] == "completed") & runs["dev"].astype(float).notna()]
    done = done.sort_values("run_dir").drop_duplicates(["setting", "seed_id"], keep="last")
    if not len(done):
        return cell
    if select == "per-seed":  # LM-BFF's gather_result.py: each seed's best setting
        chosen = done.sort_values("dev", ascending=False, kind="stable").drop_duplicates("seed_id")
        cell.setting = "best per seed"
    else:
        seeds = set(runs["seed_id"])
        settings = done.groupby("setting", sort=True)
        complete = [name for name, g in settings if set(g["seed_id"]) == seeds]
        if not complete:
            cell.notes.append("partial")
        dev = settings["dev"].mean()
        cell.setting = dev[complete or dev.index].idxmax()  # the first of equals
        chosen = done[done["setting"] == cell.setting]
    chosen = chosen.sort_values("seed_id")
    test = chosen["test"].astype(float) * SCALE
    cell.mean, cell.n = float(test.mean()), len(test)
    cell.std = float(np.std(test)) if len(test) > 1 else math.nan
    cell.run_dirs = list(chosen["run_dir"])
    for name in str(chosen["test_sets"].iloc[0]).split():  # MNLI: matched, mismatched
        cell.tests[name] = float(chosen[f"{name}_{metric}"].astype(float).mean() * SCALE)
    return cell


def select_cells(frame: pd.DataFrame, keys: list[str], select: str = "mean-dev") -> list[Cell]:
    cells = []
    for _, runs in frame.groupby(CELL, dropna=False, sort=False):
        varying = [k for k in keys if runs[k].astype(str).nunique() > 1]
        cells.append(select_cell(runs, varying, select))
    return cells


# ----------------------------------------------------------------------------- paper numbers


def read_paper(paper_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The papers' reported numbers (`reported.csv`) and memory (`reported-memory.csv`)."""
    numbers, memory = paper_dir / "reported.csv", paper_dir / "reported-memory.csv"
    if not numbers.is_file() or not memory.is_file():
        log.warning("no paper numbers in %s: the report shows reproduced numbers only", paper_dir)
        return pd.DataFrame(columns=PAPER_COLUMNS), pd.DataFrame(columns=PAPER_MEMORY_COLUMNS)
    return pd.read_csv(numbers), pd.read_csv(memory)


def join_paper(cells: Iterable[Cell], paper: pd.DataFrame) -> None:
    """Set each cell's paper number: same model, task, method and metric, and the same k (a
    blank k, e.g. zero-shot, matches any); of several sources, the most confident."""
    main = paper[paper["setting"].isna()].copy()
    main["rank"] = main["confidence"].map(CONFIDENCE_RANK).fillna(len(CONFIDENCE_RANK))
    main = main.sort_values("rank", kind="stable")
    for cell in cells:
        hit = main[
            (main["model"] == cell.model)
            & (main["task"] == cell.task)
            & (main["method"] == cell.method)
            & (main["metric"] == cell.metric)
            & (main["k"].isna() | (main["k"] == _number(cell.k)))
        ]
        if len(hit):
            best = hit.iloc[0]
            cell.paper, cell.paper_std = float(best["value"]), float(best["std"])
            cell.paper_source, cell.paper_confidence = best["source"], best["confidence"]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- tables


def ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in order if v in values] + sorted(values - set(order))


def by_size(models: Iterable[str]) -> list[str]:
    """Model names smallest first where they end in a size (`opt-1.3b` before `opt-13b`)."""

    def key(name: str) -> tuple[str, float, str]:
        found = re.search(r"^(.*?)-?(\d+(?:\.\d+)?)([mb])$", name)
        if not found:
            return name, math.inf, name
        family, number, unit = found.groups()
        return family, float(number) * (1e6 if unit == "m" else 1e9), name

    return sorted(set(models), key=key)


def table_groups(cells: Sequence[Cell]) -> dict[tuple[str, Any], list[Cell]]:
    """Cells per table: one table per (model, k)."""
    groups: dict[tuple[str, Any], list[Cell]] = {}
    for model in by_size(c.model for c in cells):  # smallest model first
        for cell in cells:
            if cell.model == model:
                groups.setdefault((cell.model, cell.k), []).append(cell)
    return groups


def table_columns(cells: Sequence[Cell]) -> list[tuple[str, str | None]]:
    """(task, test set) columns: each task's first test set, then any further ones (MNLI)."""
    family = next((c.family for c in cells if c.family), "causal")
    columns: list[tuple[str, str | None]] = []
    for task in ordered({c.task for c in cells}, TASK_ORDER.get(family, ())):
        columns.append((task, None))
        extra = {s for c in cells if c.task == task for s in list(c.tests)[1:]}
        columns += [(task, s) for s in sorted(extra)]
    return columns


def _fmt(x: float, signed: bool = False) -> str:
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def cell_text(cell: Cell | None, test_set: str | None = None, tex: bool = False) -> str:
    """`91.2 ± 0.4 (paper 91.4, -0.2) [1 diverged]` for a cell's first test set; further test
    sets (MNLI mismatched) show the mean only. A cell without runs says "missing"."""
    pm, minus, dash = (r"$\pm$", "$-$", "---") if tex else ("±", "-", "—")
    if cell is None:
        return "missing"
    if test_set is not None:
        return _fmt(cell.tests[test_set]) if test_set in cell.tests else dash
    text = dash if math.isnan(cell.mean) else _fmt(cell.mean)
    if cell.n > 1:
        text += f" {pm} {_fmt(cell.std)}"
    if not math.isnan(cell.paper):
        # the difference of the numbers as printed, so that the cell adds up
        diff = round(cell.mean, 1) - cell.paper
        text += f" (paper {_fmt(cell.paper)}"
        text += ")" if math.isnan(diff) else f", {_fmt(diff, signed=True)})".replace("-", minus)
    if cell.notes:
        text += f" [{'; '.join(cell.notes)}]"
    return text


def table_title(model: str, k: Any, cells: Sequence[Cell]) -> str:
    family = next((c.family for c in cells if c.family), None)
    what = "examples per label" if family == "masked" else "training examples"
    return f"{model}, k={k} ({what})"


def wide_tables(cells: Sequence[Cell], tex: bool = False) -> dict[str, pd.DataFrame]:
    """Per (model, k): methods as rows, tasks as columns, cells as text."""
    tables = {}
    for (model, k), group in table_groups(cells).items():
        columns = table_columns(group)
        by = {(c.method, c.task): c for c in group}
        methods = ordered({c.method for c in group}, METHOD_ORDER)
        rows = {m: [cell_text(by.get((m, t)), s, tex) for t, s in columns] for m in methods}
        names = [t if s is None else f"{t} ({s})" for t, s in columns]
        frame = pd.DataFrame.from_dict(rows, "index", columns=names).rename_axis("method")
        tables[table_title(model, k, group)] = frame
    return tables


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table, the index as the first column."""
    head = [frame.index.name or "", *frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(i), *row]) + " |" for i, row in frame.iterrows()]
    return "\n".join(lines)


def cells_frame(cells: Sequence[Cell]) -> pd.DataFrame:
    """Tidy: one row per cell, with the chosen setting and the paper's source."""
    rows = []
    for c in cells:
        rows.append(
            {
                "model": c.model,
                "k": c.k,
                "task": c.task,
                "method": c.method,
                "metric": c.metric,
                "value": c.mean,
                "std": c.std,
                "n_seeds": c.n,
                "setting": c.setting,
                **{f"value_{name}": v for name, v in c.tests.items()},
                "paper": c.paper,
                "paper_std": c.paper_std,
                "diff": c.diff,
                "paper_source": c.paper_source,
                "paper_confidence": c.paper_confidence,
                "notes": "; ".join(c.notes),
                "runs": " ".join(c.run_dirs),
            }
        )
    return pd.DataFrame(rows)


def table_csv(cells: Sequence[Cell]) -> pd.DataFrame:
    """Methods as rows (per model and k); per task the mean, std, paper value, diff and notes."""
    tidy = cells_frame(cells).rename(columns={"value": "mean"})
    values = ["mean", "std", "paper", "diff", "notes"]
    wide = tidy.set_index(["model", "k", "method", "task"])[values].unstack("task")
    tasks = list(dict.fromkeys(tidy["task"]))
    wide = wide.reindex(columns=[(v, t) for t in tasks for v in values])
    wide.columns = [task if what == "mean" else f"{task}_{what}" for what, task in wide.columns]
    wide = wide.reset_index()
    size = wide["model"].map({m: i for i, m in enumerate(by_size(wide["model"]))})
    rank = wide["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}).fillna(len(METHOD_ORDER))
    order = ["size", "k", "rank", "method"]
    return wide.assign(size=size, rank=rank).sort_values(order).drop(columns=["size", "rank"])


def write_tables(cells: Sequence[Cell], out: Path) -> None:
    legend = (
        "Cells: test metric in points, mean ± std over seeds (numpy std, ddof=0) of the setting "
        "with the best mean dev metric; (paper value, reproduced − paper); [runs that failed, "
        "diverged, are missing or unfinished]. Chosen settings and paper sources: cells.csv."
    )
    parts = ["# Reproduced results", "", legend]
    for title, frame in wide_tables(cells).items():
        parts += ["", f"## {title}", "", markdown(frame)]
    (out / "table.md").write_text("\n".join(parts) + "\n")
    tex = []
    for title, frame in wide_tables(cells, tex=True).items():
        frame = frame.rename(columns=lambda c: c.replace("_", r"\_")).reset_index(names="method")
        latex = frame.to_latex(
            index=False, escape=False, column_format="l" + "c" * (frame.shape[1] - 1)
        )
        tex.append(f"% {title}\n{latex}")
    (out / "table.tex").write_text("\n".join(tex))
    table_csv(cells).round(4).to_csv(out / "table.csv", index=False)
    cells_frame(cells).round(4).to_csv(out / "cells.csv", index=False)


# ----------------------------------------------------------------------------- memory table


def is_memory_run(run: Run) -> bool:
    """A run of the memory preset (`+experiment=memory`), comparable to the papers' tables."""
    return any(o.lstrip("+") == "experiment=memory" for o in run.overrides)


def _does_not_fit(errors: pd.Series) -> str | None:
    """'does not fit on one 139.8 GiB GPU' when a run ran out of GPU memory."""
    for error in errors.dropna().astype(str):
        if "out of memory" in error.lower() or "OutOfMemoryError" in error:
            total = pd.Series([error]).str.extract(r"total capacity of ([\d.]+ \w+)")[0][0]
            return f"does not fit on one {total} GPU" if isinstance(total, str) else "out of memory"
    return None


def memory_frame(
    frame: pd.DataFrame, paper_memory: pd.DataFrame, memory_runs: bool
) -> pd.DataFrame:
    """Peak memory per model and method (the maximum over completed runs, GiB), what ran out of
    memory, and, when the runs are the memory preset's (batch 1, MultiRC-length inputs, like
    MeZO's Table 22), the papers' values."""
    rows = []
    for (model, method), runs in frame.groupby(["model", "method"], sort=False):
        done = runs[runs["status"] == "completed"]
        paper = paper_memory[(paper_memory["model"] == model) & (paper_memory["method"] == method)]
        paper = paper.iloc[0] if memory_runs and len(paper) else pd.Series(dtype=object)
        rows.append(
            {
                "model": model,
                "method": method,
                "peak_gib": done["peak_mem_mb"].astype(float).max() / 1024,
                "runs": len(runs),
                "note": _does_not_fit(runs["error"]),
                "paper_gb": paper.get("memory_gb", math.nan),
                "paper_gpus": paper.get("gpus", math.nan),
                "paper_source": paper.get("source", ""),
            }
        )
    return pd.DataFrame(rows)


def memory_text(row: pd.Series) -> str:
    """`25.1 GiB (paper 26 GB)`, `does not fit on one 139.8 GiB GPU (paper 316 GB on 4 GPUs)`."""
    if isinstance(row["note"], str):
        text = row["note"]
    else:
        text = "—" if math.isnan(row["peak_gib"]) else f"{row['peak_gib']:.1f} GiB"
    if not pd.isna(row["paper_gpus"]):
        paper = "—" if pd.isna(row["paper_gb"]) else f"{row['paper_gb']:g} GB"
        gpus = "" if row["paper_gpus"] == 1 else f" on {int(row['paper_gpus'])} GPUs"
        text += f" (paper {paper}{gpus})"
    return text


def write_memory(memory: pd.DataFrame, out: Path) -> None:
    memory.to_csv(out / "memory.csv", index=False)
    wide = memory.assign(text=memory.apply(memory_text, axis=1))
    wide = wide.pivot(index="model", columns="method", values="text")
    wide = wide.loc[by_size(memory["model"]), ordered(wide.columns, METHOD_ORDER)].fillna("not run")
    (out / "memory.md").write_text(
        "# Peak memory\n\nPeak GPU memory allocated (CPU runs: the peak resident memory), the "
        "maximum over the completed runs of a model and method; the papers' values beside it "
        "for runs of the memory preset (`+experiment=memory`).\n\n" + markdown(wide) + "\n"
    )


# ----------------------------------------------------------------------------- command line


def report(
    paths: Sequence[Path],
    out: Path,
    paper: Path | None = None,
    select: str = "mean-dev",
    smooth: int = 0,
) -> pd.DataFrame:
    """Read the runs under `paths`; write runs.csv, the tables, the memory table and figures."""
    if select not in SELECTIONS:
        raise ReportError(f"select={select!r} is not one of {', '.join(SELECTIONS)}")
    if smooth < 0:
        raise ReportError(f"--smooth {smooth}: give a window of logged points >= 1 (0: auto)")
    try:  # matplotlib is an optional extra: say so before any work
        from lozo_exp import figures
    except ImportError as err:
        raise ReportError(
            f"the report draws its figures with matplotlib, which cannot be imported ({err}): "
            f"pip install 'lozo-exp[figures]'"
        ) from err

    cli.register()  # the resolvers the runs' configs name (e.g. ${lozo_exp.asset:...})
    runs = read_runs(paths)
    frame, keys = runs_frame(runs)
    log.info("%d runs; hyperparameters: %s", len(frame), ", ".join(keys) or "none varied")
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "runs.csv", index=False)
    paper_numbers, paper_memory = read_paper(paper or paper_dir())
    cells = select_cells(frame, keys, select)
    join_paper(cells, paper_numbers)
    write_tables(cells, out)
    memory = memory_frame(frame, paper_memory, all(is_memory_run(r) for r in runs))
    write_memory(memory, out)
    figures.draw_all(runs, frame, cells, memory, out, smooth)
    return frame


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lozo-exp report",
        description="Turn run directories into runs.csv, the paper's tables and figures.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="directories holding runs")
    parser.add_argument("--out", type=Path, required=True, help="where the report goes")
    parser.add_argument(
        "--paper",
        type=Path,
        default=None,
        help="the papers' numbers (reported.csv, reported-memory.csv); default: results/paper",
    )
    parser.add_argument(
        "--select",
        choices=SELECTIONS,
        default="mean-dev",
        help="one setting per cell by mean dev over seeds (default), or the "
        "best setting of each seed (LM-BFF's gather_result.py)",
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=0,
        help="loss curves: moving average over this many logged points "
        "(default: a twentieth of the curve)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logs")
    args = parser.parse_args(argv)
    cli.start(args.verbose)
    try:
        report(args.runs, args.out, args.paper, args.select, args.smooth)
    except ReportError as err:
        cli.fail(err)
    print(
        f"Report in {args.out}: runs.csv, cells.csv, table.md/.csv/.tex, memory.md/.csv, "
        f"loss_curves, memory, accuracy and step_time (.png and .pdf)"
    )


if __name__ == "__main__":
    main()
