"""Where a run's numbers go: W&B (read back from its offline run files), TensorBoard (read back
from its event files), the loggers together, and per-job peak memory."""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_config, read_metrics, run_cli

from lozo_exp import tracking
from lozo_exp.config import ConfigError, LoggerConfig, validate
from lozo_exp.runner import Runner

FAST = ("trainer.max_steps=6", "trainer.eval_steps=3", "trainer.log_steps=2")


# -- reading the loggers' files back ---------------------------------------------------------


@dataclass
class WandbRun:
    """What an offline W&B run recorded, as its .wandb transaction log holds it."""

    run: dict[str, Any] = field(default_factory=dict)  # name, group, tags, project, entity, config
    history: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> row (no `_` keys)
    summary: dict[str, Any] = field(default_factory=dict)  # the last value of each key
    exit_code: int | None = None


def _wandb_records(log_file: Path) -> list[dict[str, Any]]:
    """The records of a .wandb file, by wandb's own reader: `wandb leet inspect --json`
    (wandb >= 0.2x), else the `wandb.sdk.internal.datastore` of older versions."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 0:
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    try:
        from google.protobuf.json_format import MessageToDict
        from wandb.proto import wandb_internal_pb2
        from wandb.sdk.internal import datastore
    except ImportError:
        pytest.skip(f"this wandb has no reader for its .wandb files ({done.stderr.strip()[:200]})")
    store = datastore.DataStore()
    store.open_for_scan(str(log_file))
    records = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        body = MessageToDict(getattr(record, kind), preserving_proto_field_name=True)
        items = {"history": "item", "summary": "update", "config": "update"}
        if kind in items:  # [{key, value_json}] -> {key: value}, as wandb leet prints them
            pairs = body.get(items[kind], [])
            body[items[kind]] = {p["key"]: json.loads(p["value_json"]) for p in pairs}
        if kind == "run":
            pairs = body.get("config", {}).get("update", [])
            body["config"] = {"update": {p["key"]: json.loads(p["value_json"]) for p in pairs}}
        records.append({"type": kind, kind: body})
    return records


def read_wandb(run_dir: Path) -> WandbRun:
    [log_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = WandbRun()
    for record in _wandb_records(log_file):
        kind, body = record["type"], record.get(record["type"], {})
        if kind == "run":
            out.run = {
                "name": body.get("display_name"),
                "group": body.get("run_group"),
                "tags": body.get("tags", []),
                "project": body.get("project"),
                "entity": body.get("entity"),
                "config": body.get("config", {}).get("update", {}),
            }
        elif kind == "history":
            row = {k: v for k, v in body["item"].items() if not k.startswith("_")}
            out.history.setdefault(int(body["item"]["_step"]), {}).update(row)
        elif kind == "summary":
            out.summary.update(body.get("update", {}))
        elif kind == "exit":
            out.exit_code = int(body.get("exit_code", 0))
    return out


def read_tensorboard(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, Any]]:
    """Scalars by tag as (step, value), and the hyperparameters of the HParams view."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return scalars, hparams


# -- a run with every logger -----------------------------------------------------------------


def expected_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The names a metrics.jsonl record's numbers get in W&B and TensorBoard."""
    if record.get("split") == "dev":
        renamed = {"dev_loss": "loss"}
        return {
            f"dev/{renamed.get(k, k)}": v for k, v in record.items() if k not in ("step", "split")
        }
    return {f"train/{k}": v for k, v in record.items() if k != "step"}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """LOZO with W&B and TensorBoard (`logger=[wandb,tensorboard]`), two test sets (as MNLI),
    and dev evaluations whose best (step 3) is not the last (step 6)."""
    root = tmp_path_factory.mktemp("logged")
    cfg = compose_config(
        "logger=[wandb,tensorboard]",
        "logger.project=zo-study",
        "logger.entity=my-team",
        "logger.group=lr-grid",
        "logger.tags=[lozo,smoke]",
        "method=lozo",
        *FAST,
    )
    run_dir = root / "runs" / "first"
    run_dir.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        runner = Runner(cfg, run_dir)
        rows = runner.splits.test["test"]
        runner.splits.test = {"test_matched": rows[:12], "test_mismatched": rows[12:]}
        accuracy = iter([0.75, 0.25])
        real_evaluate = runner.adapter.evaluate

        def evaluate(rows, batch_size):
            if rows is runner.splits.dev:
                return {"accuracy": next(accuracy)}
            return real_evaluate(rows, batch_size)

        mp.setattr(runner.adapter, "evaluate", evaluate)
        results = runner.run()
    return run_dir, results


def test_wandb_gets_every_record_by_step_and_no_split(logged_run):
    run_dir, _ = logged_run
    run = read_wandb(run_dir)
    expected: dict[int, dict[str, float]] = {}
    for record in read_metrics(run_dir):
        if record.get("split") != "final":  # its numbers are in the summary
            expected.setdefault(record["step"], {}).update(expected_scalars(record))
    assert run.history == expected
    assert sorted(run.history) == [2, 3, 4, 6]
    assert {"train/loss", "train/lr", "train/mem_peak_mb", "dev/accuracy"} <= set(run.history[6])
    assert set(run.history[3]) == {"dev/accuracy", "dev/loss", "dev/eval_time_s"}
    assert run.history[3]["dev/accuracy"] == 0.75 and run.history[6]["dev/accuracy"] == 0.25
    assert not any("split" in key or "status" in key for row in run.history.values() for key in row)


def test_wandb_summary_holds_the_selected_dev_and_every_test_set(logged_run):
    run_dir, results = logged_run
    run = read_wandb(run_dir)
    assert results["best_step"] == 3 and results["dev"]["accuracy"] == 0.75
    assert run.summary["dev/accuracy"] == 0.75  # the selected evaluation, not the last (0.25)
    assert run.summary["dev/loss"] == results["dev"]["dev_loss"]
    for name in ("test_matched", "test_mismatched"):
        assert run.summary[f"test/{name}/accuracy"] == results["test_sets"][name]["accuracy"]
    assert (run.summary["status"], run.summary["best_step"], run.summary["steps"]) == (
        "completed",
        3,
        6,
    )
    assert run.summary["peak_mem_mb"] == results["peak_mem_mb"] and run.exit_code == 0


def test_wandb_run_uses_the_logger_keys_and_is_named_by_its_directory(logged_run):
    run_dir, _ = logged_run
    run = read_wandb(run_dir).run
    assert (run["name"], run["group"], run["tags"]) == ("runs/first", "lr-grid", ["lozo", "smoke"])
    assert (run["project"], run["entity"]) == ("zo-study", "my-team")
    assert run["config"]["method"]["name"] == "lozo" and run["config"]["trainer"]["max_steps"] == 6


def test_tensorboard_gets_the_same_scalars_and_the_run_summary(logged_run):
    run_dir, results = logged_run
    scalars, hparams = read_tensorboard(run_dir)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir):
        if record.get("split") != "final":
            for key, value in expected_scalars(record).items():
                expected.setdefault(key, []).append((record["step"], value))
    series = {k: v for k, v in scalars.items() if k.startswith(("train/", "dev/"))}
    assert series.keys() == expected.keys()
    for key, points in expected.items():
        assert series[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in points], key
    assert scalars["best_dev/accuracy"] == [(6, 0.75)]  # the selected evaluation, at the end
    for name in ("test_matched", "test_mismatched"):
        value = results["test_sets"][name]["accuracy"]
        assert scalars[f"test/{name}/accuracy"] == [(6, pytest.approx(value))]
    assert hparams["method.name"] == "lozo" and hparams["method.rank"] == 2
    assert hparams["trainer.max_steps"] == 6 and not any(k.startswith("logger.") for k in hparams)


@pytest.mark.slow  # two sweeps of two zero-shot jobs each, in subprocesses
def test_runs_of_a_sweep_share_a_group_and_names_are_unique_across_sweeps(tmp_path):
    for sweep, group in (("a", []), ("b", ["logger.group=my-study"])):
        args = [
            "-m",
            "method=zero-shot",
            "seed=0,1",
            "logger=wandb",
            f"hydra.sweep.dir=sweeps/{sweep}",
        ]
        done = run_cli(tmp_path, *args, *group)
        assert done.returncode == 0, done.stderr
    runs = {
        job.relative_to(tmp_path).as_posix(): read_wandb(job).run
        for job in (tmp_path / "sweeps").glob("*/*")
        if job.is_dir()
    }
    assert sorted(runs) == [
        f"sweeps/{s}/{n}_method=zero-shot,seed={n}" for s in ("a", "b") for n in (0, 1)
    ]
    assert all(run["name"] == name for name, run in runs.items())  # unique: job names repeat
    groups = {name: run["group"] for name, run in runs.items()}
    assert [groups[n] for n in sorted(groups)] == ["sweeps/a"] * 2 + ["my-study"] * 2


# -- choosing loggers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, wandb, tensorboard",
    [
        ([], False, False),
        (["logger=wandb"], True, False),
        (["logger=tensorboard"], False, True),
        (["logger=[wandb,tensorboard]"], True, True),
        (["logger.wandb=true", "logger.tensorboard=true"], True, True),
        (["logger=tensorboard", "logger.wandb=true"], True, True),
    ],
)
def test_loggers_compose(overrides, wandb, tensorboard):
    logger = compose_config(*overrides).logger
    assert (logger.wandb, logger.tensorboard) == (wandb, tensorboard)


def test_only_the_chosen_loggers_write(tmp_path):
    log = tracking.MetricsLog(tmp_path, LoggerConfig(tensorboard=True), "t", {"seed": 0})
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 1, "split": "dev", "accuracy": 0.5, "dev_loss": 0.7})
    log.close({"status": "completed", "dev": {"accuracy": 0.5}, "test_sets": {"test": {"f1": 1}}})
    assert not (tmp_path / "wandb").exists()
    scalars, _ = read_tensorboard(tmp_path)
    assert scalars["train/loss"] == [(1, 0.5)] and scalars["dev/loss"] == [(1, pytest.approx(0.7))]
    assert scalars["test/test/f1"] == [(1, 1.0)] and "split" not in json.dumps(list(scalars))
    assert [
        json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [1, 1]


def test_logger_settings_are_checked_before_a_model_loads(monkeypatch):
    with pytest.raises(ConfigError, match=r"logger\.mode='onlin' is not one of offline, online"):
        validate(compose_config("logger=wandb", "logger.mode=onlin"))
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "tensorboard" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(
        ConfigError, match=r"logger\.tensorboard=true needs the tensorboard package"
    ):
        validate(compose_config("logger=tensorboard"))
    validate(compose_config("logger=wandb"))  # the other logger is unaffected


# -- memory ----------------------------------------------------------------------------------


@pytest.mark.skipif(not tracking.PROC_CLEAR_REFS.exists(), reason="needs Linux's clear_refs")
def test_two_jobs_in_one_process_report_their_own_peak_memory(tmp_path, monkeypatch):
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = Runner(compose_config("method=zero-shot"), tmp_path / "first")
    real_evaluate = first.adapter.evaluate

    def evaluate_with_a_big_temporary(rows, batch_size):
        block = torch.ones(2**27)  # 512 MiB, written, then freed
        del block
        return real_evaluate(rows, batch_size)

    monkeypatch.setattr(first.adapter, "evaluate", evaluate_with_a_big_temporary)
    peak_first = first.run()["peak_mem_mb"]
    peak_second = Runner(compose_config("method=zero-shot"), tmp_path / "second").run()[
        "peak_mem_mb"
    ]
    assert peak_first > peak_second + 400  # the process's lifetime peak would repeat peak_first
    final = [r for r in read_metrics(tmp_path / "second") if r.get("split") == "final"]
    assert final[0]["peak_mem_mb"] == peak_second


@pytest.mark.skipif(not tracking.PROC_CLEAR_REFS.exists(), reason="needs Linux's clear_refs")
def test_reading_the_peak_resets_it():
    tracking.peak_rss_mb()
    block = torch.ones(2**26)  # 256 MiB
    del block
    assert tracking.peak_rss_mb() > tracking.peak_rss_mb() + 200


def test_without_proc_the_peak_is_the_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "PROC_STATUS", tmp_path / "no-such-file")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    peak = tracking.peak_rss_mb()
    assert before <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def test_progress_prints_its_last_line_however_short_the_work(caplog):
    """A run shorter than `every_s` still ends with its 100% line, and only that one."""
    caplog.set_level("INFO", logger=tracking.__name__)
    progress = tracking.Progress("step", 3, every_s=3600)
    for done in (1, 2, 3):
        progress.update(done)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("step 3/3 (100%) | "), lines
