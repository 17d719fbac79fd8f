"""`python -m lozo_exp.report`: synthetic run directories written as the runner writes them, the
protocol checked against hand-computed cells, and (slow tier) a real sweep end to end."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CONF, REPORT_FIGURES, run_cli
from omegaconf import DictConfig, OmegaConf

from lozo_exp import cli, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def approx(x: float) -> object:
    """The CSVs keep four decimals (of a point)."""
    return pytest.approx(x, abs=1e-4)


@functools.cache
def composed(*groups: str) -> DictConfig:
    """The config Hydra composes for these group choices, interpolations kept (as it saves it)."""
    return cli.compose("config", groups)


def write_run(
    root: Path,
    name: str,
    overrides: list[str],
    status: str | None = "completed",
    dev: float | None = None,
    tests: dict[str, float] | None = None,
    losses: tuple[float, ...] = (0.7, 0.6, 0.5, 0.4),
    peak_mem_mb: float = 2048.0,
    error: str | None = None,
) -> Path:
    """A run directory as `python -m lozo_exp` leaves it: `.hydra/config.yaml` and
    `overrides.yaml`, metrics.jsonl and (unless `status` is None: a run still going)
    results.json."""
    groups = [o for o in overrides if "." not in o.split("=")[0] and not o.startswith("seed=")]
    dict_cfg = composed(*groups).copy()
    for override in overrides:
        if override not in groups:  # the typed schema converts and checks the value
            OmegaConf.update(dict_cfg, *override.split("="))
    cfg = OmegaConf.to_object(dict_cfg)
    out = root / name
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(dict_cfg))
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    records: list[dict[str, Any]] = [
        {"step": 10 * (i + 1), "loss": loss, "lr": 1e-6, "step_time_s": 0.25, "mem_peak_mb": 900.0}
        for i, loss in enumerate(losses)
    ]
    if dev is not None:
        records.append({"step": 10 * len(losses), "split": "dev", "accuracy": dev})
    if status is not None:
        records.append({"step": 10 * len(losses), "split": "final", "status": status})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status is None:
        return out
    metric = "f1" if cfg.task.name in ("squad", "drop") else "accuracy"
    results: dict[str, Any] = {
        "model": cfg.model.name,
        "task": cfg.task.name,
        "method": cfg.method.name,
        "metric": metric,
        "seed": cfg.seed,
        "status": status,
    }
    if status == "completed":
        test_sets = {k: {metric: v} for k, v in (tests or {}).items()}
        first = next(iter(test_sets.values()))
        results.update(dev={metric: dev}, test=first, test_sets=test_sets)
    else:
        results["error"] = error or f"{status}: synthetic"
    results.update(steps=10 * len(losses), best_step=10, wall_time_s=12.5, peak_mem_mb=peak_mem_mb)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return out


def opt(task: str, method: str, lr: float, seed: int = 0) -> list[str]:
    return ["model=opt-13b", f"task={task}", f"method={method}", f"method.lr={lr}", f"seed={seed}"]


def roberta(task: str, lr: float, data_seed: int) -> list[str]:
    return [
        "model=roberta-large",
        f"task={task}",
        "method=mezo",
        f"method.lr={lr}",
        f"task.data_seed={data_seed}",
    ]


# RoBERTa SST-2, MeZO: (lr, data seed) -> (dev, test). lr 1e-6 has the best mean dev (0.85 vs
# 0.8167), but lr 1e-7 has the best dev on seed 13.
ROBERTA_SST2 = {
    (1e-6, 13): (0.90, 0.91),
    (1e-6, 21): (0.80, 0.88),
    (1e-6, 42): (0.85, 0.90),
    (1e-7, 13): (0.95, 0.80),
    (1e-7, 21): (0.70, 0.70),
    (1e-7, 42): (0.80, 0.75),
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """OPT-13B and RoBERTa-large cells, with a failed, a diverged, an unfinished and a missing
    run, a missing cell (LOZO on RTE) and MNLI's two test sets."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "o1", opt("sst2", "mezo", 1e-6), dev=0.90, tests={"test": 0.91})
    write_run(root, "o2", opt("sst2", "mezo", 1e-7), dev=0.85, tests={"test": 0.95})
    write_run(root, "o3", opt("sst2", "lozo", 1e-6), dev=0.92, tests={"test": 0.93})
    write_run(root, "o4", opt("sst2", "lozo", 1e-5), status="diverged", losses=(0.7, math.inf))
    write_run(root, "o5", opt("sst2", "lozo", 1e-7), status=None)  # still running
    write_run(root, "o6", opt("rte", "mezo", 1e-6), dev=0.60, tests={"test": 0.62})
    write_run(root, "o6b", opt("rte", "mezo", 1e-6), dev=0.60, tests={"test": 0.64})  # re-run
    write_run(root, "o7", opt("rte", "mezo", 1e-7), status="failed")
    write_run(
        root,
        "o8",
        ["model=opt-13b", "task=sst2", "method=zero-shot"],
        dev=0.55,
        tests={"test": 0.58},
        losses=(),
    )
    for (lr, seed), (dev, test) in ROBERTA_SST2.items():
        write_run(
            root, f"r-sst2-{lr}-{seed}", roberta("sst2", lr, seed), dev=dev, tests={"test": test}
        )
    for seed, dev, matched, mismatched in [
        (13, 0.6, 0.60, 0.62),
        (21, 0.5, 0.56, 0.58),
        (42, 0.55, 0.58, 0.61),
    ]:
        write_run(
            root,
            f"r-mnli-a-{seed}",
            roberta("mnli", 1e-6, seed),
            dev=dev,
            tests={"test_matched": matched, "test_mismatched": mismatched},
        )
    for seed in (13, 21):  # better mean dev, but seed 42 is missing: not chosen
        write_run(
            root,
            f"r-mnli-b-{seed}",
            roberta("mnli", 1e-7, seed),
            dev=0.99,
            tests={"test_matched": 0.1, "test_mismatched": 0.1},
        )
    # RTE: each lr has one seed, so no setting is complete: the best is taken, marked partial.
    write_run(root, "r-rte-a", roberta("rte", 1e-6, 13), dev=0.7, tests={"test": 0.7})
    write_run(root, "r-rte-b", roberta("rte", 1e-7, 21), dev=0.6, tests={"test": 0.6})
    return root


@pytest.fixture(scope="module")
def out(sweep, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    report.report([sweep], out)
    return out


def cells(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "cells.csv").set_index(["model", "task", "method"])


def test_opt_cells_take_the_best_lr_by_dev_and_name_what_went_wrong(out):
    c = cells(out)
    mezo = c.loc[("opt-13b", "sst2", "mezo")]
    assert mezo["value"] == approx(91.0) and mezo["setting"] == "method.lr=1e-06"
    assert mezo["paper"] == 91.4 and mezo["diff"] == approx(-0.4)
    assert mezo["paper_source"] == "MeZO paper (arXiv 2305.17333) Table 1"  # not the low note
    lozo = c.loc[("opt-13b", "sst2", "lozo")]
    assert lozo["value"] == approx(93.0) and lozo["setting"] == "method.lr=1e-06"
    assert set(lozo["notes"].split("; ")) == {"1 diverged", "1 incomplete"}
    assert lozo["paper"] == 91.7 and lozo["paper_confidence"] == "low"
    rte = c.loc[("opt-13b", "rte", "mezo")]
    assert rte["value"] == approx(64.0)  # the newest of two runs of one seed
    assert rte["notes"] == "1 failed; 1 re-run (newest kept)"
    zero_shot = c.loc[("opt-13b", "sst2", "zero-shot")]  # the paper's blank k matches any k
    assert zero_shot["value"] == approx(58.0) and zero_shot["paper"] == 58.8


def test_roberta_cells_take_the_best_mean_dev_over_data_seeds(out):
    c = cells(out)
    sst2 = c.loc[("roberta-large", "sst2", "mezo")]
    tests = [91.0, 88.0, 90.0]  # lr 1e-6, seeds 13, 21, 42
    assert sst2["value"] == approx(np.mean(tests))
    assert sst2["std"] == approx(np.std(tests))  # ddof=0, as LM-BFF
    assert sst2["n_seeds"] == 3 and sst2["setting"] == "method.lr=1e-06"
    assert sst2["paper"] == 90.5 and sst2["diff"] == approx(np.mean(tests) - 90.5)
    mnli = c.loc[("roberta-large", "mnli", "mezo")]
    assert mnli["value"] == approx(np.mean([60, 56, 58]))  # matched: the first test set
    assert mnli["value_test_mismatched"] == approx(np.mean([62, 58, 61]))
    assert mnli["notes"] == "1 missing" and mnli["setting"] == "method.lr=1e-06"
    assert mnli["paper"] == 58.7  # Table 18 (high) over the LOZO figure's 56.7 (low-medium)
    rte = c.loc[("roberta-large", "rte", "mezo")]
    assert rte["value"] == approx(70.0) and rte["notes"] == "2 missing; partial"


def test_per_seed_selection_is_lm_bff_gather_result(sweep):
    frame, keys = report.runs_frame(report.read_runs([sweep]))
    by = {(c.model, c.task, c.method): c for c in report.select_cells(frame, keys, "per-seed")}
    sst2 = by[("roberta-large", "sst2", "mezo")]
    assert sst2.mean == approx(np.mean([80.0, 88.0, 90.0]))  # seed 13 takes lr 1e-7


def test_tables_show_paper_numbers_differences_and_holes(out):
    md = (out / "table.md").read_text()
    assert "## opt-13b, k=1000 (training examples)" in md
    assert "## roberta-large, k=16 (examples per label)" in md
    opt_table = md.split("## roberta-large")[0]
    lines = {line.split(" | ")[0]: line for line in opt_table.splitlines() if line[:2] == "| "}
    assert (
        "| 91.0 (paper 91.4, -0.4) | 64.0 (paper 66.1, -2.1) [1 failed; 1 re-run (newest kept)] |"
        in lines["| mezo"]
    )
    assert "93.0 (paper 91.7, +1.3) [1 diverged; 1 incomplete] | missing |" in lines["| lozo"]
    assert "89.7 ± 1.2 (paper 90.5, -0.8)" in md
    assert "mnli (test_mismatched)" in md and "60.3" in md
    wide = pd.read_csv(out / "table.csv")
    row = wide[(wide["model"] == "opt-13b") & (wide["method"] == "mezo")].iloc[0]
    assert row["sst2"] == approx(91.0) and row["rte_paper"] == 66.1
    assert row["rte_notes"] == "1 failed; 1 re-run (newest kept)"
    assert len(wide) == 4  # opt-13b: zero-shot, mezo, lozo; roberta-large: mezo
    tex = (out / "table.tex").read_text()
    assert r"\begin{tabular}" in tex and r"89.7 $\pm$ 1.2 (paper 90.5, $-$0.8)" in tex


def test_runs_csv_has_one_row_per_run_with_settings_seeds_and_metrics(out, sweep):
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == len([p for p in sweep.iterdir() if p.is_dir()]) == 22
    for column in [
        "model",
        "k",
        "task",
        "method",
        "method.lr",
        "seed",
        "data_seed",
        "train_set_seed",
        "status",
        "dev",
        "test",
        "test_matched_accuracy",
        "test_mismatched_accuracy",
        "steps",
        "wall_time_s",
        "peak_mem_mb",
    ]:
        assert column in runs.columns, column
    assert "task.data_seed" not in runs.columns and "logger.wandb" not in runs.columns
    assert runs["status"].value_counts().to_dict() == {
        "completed": 19,
        "diverged": 1,
        "incomplete": 1,
        "failed": 1,
    }
    roberta = runs[runs["model"] == "roberta-large"]
    assert set(roberta["data_seed"]) == {13, 21, 42} and set(roberta["k"]) == {16}
    assert (roberta["seed"] == roberta["data_seed"]).all()  # the recipe's seed = data seed
    assert set(runs[runs["model"] == "opt-13b"]["k"]) == {1000}


def test_figures_are_real_images(out):
    from matplotlib import image

    for name in REPORT_FIGURES:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        assert png.stat().st_size > 10_000, name
        pixels = image.imread(png)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200, name
        assert pixels.std() > 0.01, name  # not a blank canvas
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name


def test_memory_table_says_when_a_model_does_not_fit(tmp_path):
    oom = (
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        "capacity of 139.81 GiB of which 1.2 GiB is free."
    )
    overrides = ["+experiment=memory"]
    runs = tmp_path / "runs"
    write_run(
        runs,
        "a",
        ["model=opt-13b", "method=mezo"],
        dev=0.5,
        tests={"test": 0.5},
        peak_mem_mb=25 * 1024,
    )
    write_run(runs, "b", ["model=opt-13b", "method=ft"], status="failed", error=oom)
    write_run(
        runs, "c", ["model=opt-2.7b", "method=mezo"], dev=0.5, tests={"test": 0.5}, peak_mem_mb=5120
    )
    for d in ("a", "b", "c"):  # as the memory preset's runs
        path = runs / d / ".hydra" / "overrides.yaml"
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) + overrides))
    report.report([runs], tmp_path / "out")
    md = (tmp_path / "out" / "memory.md").read_text()
    assert "25.0 GiB (paper 26 GB)" in md
    assert "does not fit on one 139.81 GiB GPU (paper 316 GB on 4 GPUs)" in md
    assert md.index("| opt-2.7b |") < md.index("| opt-13b |")  # by size, not by name


def test_tables_list_models_smallest_first(tmp_path):
    big = write_run(tmp_path, "a", opt("sst2", "lozo", 1e-6), dev=0.9, tests={"test": 0.9})
    small = ["model=opt-1.3b", *opt("sst2", "lozo", 1e-6)[1:]]
    write_run(tmp_path, "b", small, dev=0.8, tests={"test": 0.8})
    report.report([big.parent], tmp_path / "out")
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.index("opt-1.3b, k=") < md.index("opt-13b, k=")  # not by name, not by run order
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(table["model"]) == ["opt-1.3b", "opt-13b"]


def test_a_single_run_is_a_report(tmp_path):
    run = write_run(tmp_path, "only", opt("sst2", "lozo", 1e-6), dev=0.9, tests={"test": 0.9})
    report.report([run], tmp_path / "out")
    assert "90.0 (paper 91.7, -1.7)" in (tmp_path / "out" / "table.md").read_text()
    assert all((tmp_path / "out" / f"{n}.png").is_file() for n in REPORT_FIGURES)


@pytest.mark.parametrize(
    ("name", "text"),
    [("results.json", "{bad"), (".hydra/overrides.yaml", "[unclosed")],
)
def test_a_run_with_an_unreadable_file_is_skipped_with_a_warning(tmp_path, caplog, name, text):
    """A hand-edited or half-copied file loses its run, not the report of the others."""
    good = write_run(tmp_path, "good", opt("sst2", "lozo", 1e-6), dev=0.9, tests={"test": 0.9})
    bad = write_run(tmp_path, "bad", opt("sst2", "lozo", 1e-7), dev=0.8, tests={"test": 0.8})
    (bad / name).write_text(text)
    assert [run.path for run in report.read_runs([tmp_path])] == [good]
    assert f"skipping {bad}: its {name} cannot be read" in caplog.text


def test_no_runs_and_missing_paths_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli(None, "report", tmp_path / "empty", "--out", tmp_path / "out")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "lozo-exp: found no runs under" in done.stderr and ".hydra/config.yaml" in done.stderr
    missing = re.escape(f"{tmp_path / 'nowhere'} does not exist: ")
    with pytest.raises(report.ReportError, match=missing):
        report.report([tmp_path / "empty", tmp_path / "nowhere"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_real_sweep_end_to_end(tmp_path):
    """Two ZO methods × two seeds of real tiny runs, then the report on their directory."""
    sweep = run_cli(
        tmp_path,
        "-m",
        "method=mezo,lozo",
        "seed=0,1",
        "trainer.max_steps=10",
        "trainer.eval_steps=5",
    )
    assert sweep.returncode == 0, sweep.stderr
    done = run_cli(None, "report", tmp_path / "multirun", "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "report"
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"completed"}
    results = {
        (r["method"], r["seed"]): r
        for r in (json.loads(Path(d, "results.json").read_text()) for d in runs["run_dir"])
    }
    c = cells(out)
    for method in ("mezo", "lozo"):  # one setting, two seeds: mean ± std of their test metric
        tests = [100 * results[(method, s)]["test"]["accuracy"] for s in (0, 1)]
        assert c.loc[("tiny-opt", "sst2", method), "value"] == approx(np.mean(tests))
        assert c.loc[("tiny-opt", "sst2", method), "std"] == approx(np.std(tests))
    assert "## tiny-opt, k=32 (training examples)" in (out / "table.md").read_text()
    assert (out / "table.tex").is_file() and (out / "table.csv").is_file()
    for name in REPORT_FIGURES:
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE


def test_the_papers_numbers_use_the_suites_names():
    """reported.csv joins on the suite's model/task/method names; one value per cell and source."""
    paper, memory = report.read_paper(report.paper_dir())
    names = {g: {p.stem for p in (CONF / g).glob("*.yaml")} for g in ("model", "task", "method")}
    not_in_suite = {"lp", "mezo-prefix", "ft-prefix", "mezo-m", "mezo-adam"}
    assert set(paper["model"]) <= names["model"] and set(paper["task"]) <= names["task"]
    assert set(paper["method"]) <= names["method"] | not_in_suite
    assert set(memory["model"].dropna()) <= names["model"]
    assert set(memory["method"]) <= names["method"] | not_in_suite
    key = ["model", "k", "task", "method", "metric", "setting", "source"]
    assert not paper.duplicated(key).any()
    accuracy = paper[paper["metric"] != "train_loss"]
    assert accuracy["value"].between(0, 100).all() and paper["value"].notna().all()
    assert set(paper["confidence"]) | set(memory["confidence"]) <= set(report.CONFIDENCE_RANK)
    assert set(paper["k"].dropna()) == {16, 512, 1000}
    table1 = paper[paper["source"] == "MeZO paper (arXiv 2305.17333) Table 1"]
    assert len(table1) == 7 * 11  # 7 methods × 11 tasks, no blanks
    opt66 = paper[(paper["model"] == "opt-66b") & (paper["method"] == "mezo")]
    assert "squad" not in set(opt66["task"])  # not found in the source: absent, not invented


def test_each_method_keeps_one_colour():
    from lozo_exp.figures import method_color

    colours = [method_color(m) for m in report.METHOD_ORDER]
    assert len(set(colours)) == len(colours)
    assert method_color("mezo-adam") == method_color("mezo-adam") not in colours
