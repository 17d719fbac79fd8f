"""The report's figures (matplotlib, no display needed): loss curves, peak memory, test metric
per task and method, time per step. Every method keeps one colour across figures."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lozo_exp.report import (
    METHOD_ORDER,
    TASK_ORDER,
    Cell,
    Run,
    by_size,
    ordered,
    table_columns,
    table_groups,
    table_title,
)

_PALETTE = {  # the paper's methods first; others get a stable colour from their name
    "zero-shot": "#7f7f7f",
    "icl": "#bcbd22",
    "lp": "#8c564b",
    "mezo": "#1f77b4",
    "mezo-lora": "#17becf",
    "mezo-prefix": "#aec7e8",
    "lozo": "#d62728",
    "lozo-m": "#ff7f0e",
    "ft": "#2ca02c",
    "ft-lora": "#98df8a",
    "ft-prefix": "#9467bd",
}
_SPARE = ("#e377c2", "#c5b0d5", "#f7b6d2", "#c49c94", "#dbdb8d", "#9edae5", "#ffbb78")


def method_color(method: str) -> str:
    return _PALETTE.get(method) or _SPARE[zlib.crc32(method.encode()) % len(_SPARE)]


def _grid(n: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _empty(fig_name: str, message: str) -> Figure:
    fig = Figure(figsize=(6, 2.5), layout="constrained")
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    ax.set_title(fig_name)
    return fig


def _save(fig: Figure, out: Path, name: str) -> None:
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=150)


def _bars(
    ax,
    groups: Sequence[str],
    methods: Sequence[str],
    values: dict[tuple[str, str], float],
    errors: dict[tuple[str, str], float] | None = None,
    paper: dict[tuple[str, str], float] | None = None,
) -> None:
    """Grouped bars: one group per x label, one bar per method; the paper's values as black
    marks on their bars."""
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(groups))
    paper_labelled = False
    for i, method in enumerate(methods):
        pos = x - 0.4 + width * (i + 0.5)
        heights = [values.get((g, method), np.nan) for g in groups]
        err = [errors.get((g, method), np.nan) for g in groups] if errors else None
        ax.bar(pos, heights, width, yerr=err, capsize=2, color=method_color(method), label=method)
        marks = [(paper or {}).get((g, method), np.nan) for g in groups]
        if not np.isnan(marks).all():
            label = None if paper_labelled else "paper"
            ax.scatter(pos, marks, marker="_", s=150, color="black", zorder=3, label=label)
            paper_labelled = True
    tilt = len(groups) > 4
    ax.set_xticks(x, groups, rotation=30 if tilt else 0, ha="right" if tilt else "center")


def loss_curves(runs: Sequence[Run], cells: Sequence[Cell], smooth: int) -> Figure:
    """Training loss against step per method, one panel per (model, k, task): the mean over the
    chosen setting's seeds, smoothed by a moving average."""
    by_dir = {str(r.path): r for r in runs}
    panels: dict[tuple, list[Cell]] = {}
    for cell in cells:
        if any(len(by_dir[d].training) for d in cell.run_dirs):
            panels.setdefault((cell.model, cell.k, cell.task), []).append(cell)
    if not panels:
        return _empty("loss curves", "no training steps logged (evaluation-only runs)")
    fig, axes = _grid(len(panels))
    for ax, ((model, k, task), group) in zip(axes, panels.items(), strict=True):
        for cell in group:
            curves = [by_dir[d].training.set_index("step")["loss"] for d in cell.run_dirs]
            curve = pd.concat(curves, axis=1).mean(axis=1).sort_index()
            window = smooth or max(1, len(curve) // 20)
            curve = curve.rolling(window, min_periods=1).mean()
            ax.plot(curve.index, curve.values, color=method_color(cell.method), label=cell.method)
        non_diff = any(by_dir[d].config.get("task.non_diff") for c in group for d in c.run_dirs)
        ax.set_title(f"{model} · {task} (k={k})")
        ax.set_xlabel("step (optimizer updates)")
        ax.set_ylabel("training loss (−F1)" if non_diff else "training loss (nats/token)")
        ax.legend(fontsize="small")
    return fig


def memory(table: pd.DataFrame) -> Figure:
    """Peak memory per model and method; the papers' values (hatched) beside, where the runs are
    the memory preset's; "does not fit" where a run ran out of memory."""
    shown = table[table["peak_gib"].notna() | table["note"].notna() | table["paper_gb"].notna()]
    if not len(shown):
        return _empty("peak memory", "no completed run reported its peak memory")
    models = by_size(shown["model"])
    methods = ordered(set(shown["method"]), METHOD_ORDER)
    per_method = 2 if shown["paper_gb"].notna().any() else 1
    width = 0.8 / (len(methods) * per_method)
    x = np.arange(len(models))
    fig = Figure(
        figsize=(max(6.0, 1.2 * len(models) * len(methods) ** 0.5), 4), layout="constrained"
    )
    ax = fig.subplots()
    for i, method in enumerate(methods):
        rows = shown[shown["method"] == method].set_index("model").reindex(models)
        pos = x - 0.4 + width * (per_method * i + 0.5)
        color = method_color(method)
        ax.bar(pos, rows["peak_gib"], width, color=color, label=method)
        for where, note in zip(pos, rows["note"], strict=True):
            if isinstance(note, str):
                ax.text(
                    where,
                    0.02,
                    note,
                    transform=ax.get_xaxis_transform(),
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize="x-small",
                )
        if per_method == 2:
            label = "paper (hatched)" if i == 0 else None
            ax.bar(
                pos + width,
                rows["paper_gb"],
                width,
                color=color,
                alpha=0.4,
                hatch="//",
                edgecolor="black",
                label=label,
            )
    heights = pd.concat([shown["peak_gib"], shown["paper_gb"]]).astype(float).dropna()
    if len(heights) and heights.max() > 30 * heights[heights > 0].min():
        ax.set_yscale("log")
    ax.set_xticks(x, models)
    ax.set_xlabel("model")
    ax.set_ylabel("peak memory (GiB; papers: GB)" if per_method == 2 else "peak memory (GiB)")
    ax.set_title("Peak memory (GPU allocated; CPU runs: resident)")
    ax.legend(fontsize="small", ncols=2)
    return fig


def accuracy(cells: Sequence[Cell]) -> Figure:
    """Test metric per task (grouped bars per method, error bars: std over seeds; black marks:
    the paper's numbers), one panel per (model, k)."""
    groups = table_groups([c for c in cells if not math.isnan(c.mean)])
    if not groups:
        return _empty("accuracy", "no completed run with a test metric")
    fig, axes = _grid(len(groups), width=6.5, height=3.6)
    fig.set_size_inches(min(fig.get_size_inches()[0], 13), fig.get_size_inches()[1])
    for ax, ((model, k), group) in zip(axes, groups.items(), strict=True):
        tasks = [t for t, s in table_columns(group) if s is None]
        methods = ordered({c.method for c in group}, METHOD_ORDER)
        _bars(
            ax,
            tasks,
            methods,
            {(c.task, c.method): c.mean for c in group},
            {(c.task, c.method): c.std for c in group},
            {(c.task, c.method): c.paper for c in group},
        )
        metrics = sorted({c.metric for c in group if c.metric})
        ax.set_ylabel(f"test {' / '.join(metrics)} (%)")
        ax.set_xlabel("task")
        ax.set_title(table_title(model, k, group))
        ax.legend(fontsize="small", ncols=2)
    return fig


def step_time(frame: pd.DataFrame) -> Figure:
    """Mean time per training step (median over runs) per task and method, one panel per model."""
    timed = frame.dropna(subset=["step_time_s"])
    if not len(timed):
        return _empty("time per step", "no training steps logged (evaluation-only runs)")
    models = list(dict.fromkeys(timed["model"]))
    fig, axes = _grid(len(models), width=5.5, height=3.4)
    for ax, model in zip(axes, models, strict=True):
        runs = timed[timed["model"] == model]
        family = runs["family"].iloc[0]
        tasks = ordered(set(runs["task"]), TASK_ORDER.get(family, ()))
        methods = ordered(set(runs["method"]), METHOD_ORDER)
        ms = runs.groupby(["task", "method"])["step_time_s"].median() * 1000
        _bars(ax, tasks, methods, ms.to_dict())
        ax.set_ylabel("time per step (ms)")
        ax.set_xlabel("task")
        ax.set_title(model)
        ax.legend(fontsize="small", ncols=2)
    return fig


def draw_all(
    runs: Sequence[Run],
    frame: pd.DataFrame,
    cells: Sequence[Cell],
    memory_table: pd.DataFrame,
    out: Path,
    smooth: int = 0,
) -> None:
    _save(loss_curves(runs, cells, smooth), out, "loss_curves")
    _save(memory(memory_table), out, "memory")
    _save(accuracy(cells), out, "accuracy")
    _save(step_time(frame), out, "step_time")
