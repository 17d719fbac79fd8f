"""End-to-end RoBERTa-family runs on tiny-roberta from the bundled miniature LM-BFF archive,
the family's paper defaults, and a five-seed multirun of one cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import compose_config, read_metrics, run_cli, run_overrides

from lozo_exp.adapter import available_tasks
from medium_models.kshot import main as build_kshot

TASKS = available_tasks("masked")
FAST = ("model=tiny-roberta", "trainer.max_steps=4", "trainer.eval_steps=2", "method.batch_size=4")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", ["mezo", "lozo", "lozo-m", "ft"])
@pytest.mark.parametrize("task", TASKS)
def test_every_task_and_method_trains_and_tests_with_the_best_dev_state(run_dir, task, method):
    results = run_overrides(run_dir, *FAST, f"task={task}", f"method={method}")
    assert results["status"] == "completed" and results["steps"] == 4
    tests = ["test_matched", "test_mismatched"] if task == "mnli" else ["test"]
    assert list(results["test_sets"]) == tests
    assert results["test"] == results["test_sets"][tests[0]]
    assert all(0 <= s["accuracy"] <= 1 for s in results["test_sets"].values())
    dev = [r for r in read_metrics(run_dir) if r.get("split") == "dev"]
    assert [r["step"] for r in dev] == [2, 4]
    best = max(dev, key=lambda r: r["accuracy"])  # the first of equals, as the runner keeps
    assert results["best_step"] == best["step"]
    assert results["dev"]["accuracy"] == best["accuracy"]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("mezo", dict(batch_size=64, lr=1e-6, eps=1e-3, steps=100_000, eval_steps=10_000)),
        ("mezo-lora", dict(batch_size=64, lr=1e-4, eps=1e-3, steps=100_000, eval_steps=10_000)),
        ("lozo", dict(batch_size=64, lr=1e-7, rank=4, interval=100, steps=100_000)),
        ("lozo-m", dict(batch_size=64, lr=1e-7, rank=4, interval=100, beta=0.9)),
        ("ft", dict(batch_size=8, lr=1e-5, steps=1000, eval_steps=100)),
        ("ft-lora", dict(batch_size=8, lr=1e-4, steps=1000, eval_steps=100)),
    ],
)
def test_roberta_large_defaults_follow_the_paper_scripts(method, expected):
    cfg = compose_config("model=roberta-large", "task=rte", f"method={method}", "task.data_seed=87")
    got = {
        **vars(cfg.method),
        "steps": cfg.trainer.max_steps,
        "eval_steps": cfg.trainer.eval_steps,
    }
    assert {k: got[k] for k in expected} == expected
    assert (cfg.task.k, cfg.task.data_seed, cfg.seed) == (16, 87, 87)  # --seed $SEED


@pytest.mark.slow  # five end-to-end runs in a subprocess
def test_five_seed_multirun_of_one_cell(tmp_path):
    seeds = [13, 21, 42, 87, 100]
    proc = run_cli(
        REPO,
        "-m",
        *FAST,
        *("task=rte", "method=lozo", "trainer.max_steps=2", "trainer.eval_steps=1"),
        "task.data_seed=" + ",".join(map(str, seeds)),
        f"hydra.sweep.dir={tmp_path}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/results.json"))
    assert len(runs) == 5
    data_seeds = []
    for run in runs:
        assert json.loads((run / "results.json").read_text())["status"] == "completed"
        data_seeds.append(yaml.safe_load((run / ".hydra" / "config.yaml").read_text()))
    assert sorted(c["task"]["data_seed"] for c in data_seeds) == seeds


def test_a_run_reads_the_split_directory_named_by_data_dir(run_dir, tmp_path, caplog):
    build_kshot(
        [
            "--task",
            "trec",
            "--k",
            "3",
            "--seed",
            "21",
            "--data-dir",
            str(tmp_path),
            "--source",
            "sample",
        ]
    )
    folder = tmp_path / "k-shot-1k-test" / "trec" / "3-21"
    with caplog.at_level("INFO"):
        results = run_overrides(
            run_dir,
            *FAST,
            "task=trec",
            "method=mezo",
            f"task.data_dir={folder}",
            "task.k=3",
            "task.data_seed=21",
        )
    assert (
        f"k-shot split {folder} (yours, built from bundled miniature LM-BFF archive)" in caplog.text
    )
    assert "data: 18 train, 18 dev; test sets: test 9" in caplog.text
    assert results["status"] == "completed"
