"""Experiment presets (`conf/experiment/`), the grids sweeper that runs them, the SLURM and
local-process launchers, and the memory preset's pieces. Every preset's jobs are listed as
Hydra's sweeper lists them and composed without running (a representative per method here,
all of them in the slow tier); the slow tier also runs the smoke grid end to end, in-process
and as separate processes with one job failing."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import pytest
from conftest import CONF, REPORT_FIGURES, run_cli
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lozo_exp import cli, report
from lozo_exp.config import RunConfig, validate
from lozo_exp.models import stand_in_tokenizer

PAPER = pd.read_csv(report.paper_dir() / "reported.csv")
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
OPT_SIZES = ["opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"]


def sweep_config(name: str, *args: str) -> DictConfig:
    """The config of `lozo-exp -m +experiment=NAME ARGS` with Hydra's own (the sweeper's)."""
    cli.register()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra.compose("config", [f"+experiment={name}", *args], return_hydra_config=True)


def grids_sweeper(grids: dict | None, params: dict | None = None):
    """A GridsSweeper (its class as Hydra's plugin scan left it)."""
    cli.register()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cls = get_class("hydra_plugins.lozo_exp_grid_sweeper.grids.GridsSweeper")
    return cls(max_batch_size=None, params=params, grids=grids)


def jobs_of(sweeper, *arguments: str) -> list[list[str]]:
    """What `sweep(arguments)` launches: the shared params, then the command line's."""
    params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
    return sweeper.job_overrides(OverridesParser.create().parse_overrides([*params, *arguments]))


@functools.cache
def preset_jobs(name: str) -> tuple[tuple[str, ...], ...]:
    """Each job's overrides in `lozo-exp -m +experiment=NAME`, in launch order."""
    sweeper = sweep_config(name).hydra.sweeper
    assert sweeper._target_.endswith("GridsSweeper")
    settings = OmegaConf.to_container(sweeper)
    jobs = jobs_of(grids_sweeper(settings["grids"], settings["params"]), f"+experiment={name}")
    return tuple(tuple(job) for job in jobs)


def compose_jobs(jobs) -> list[RunConfig]:
    """Each job's typed, validated config, composed as the job would compose it."""
    cli.register()
    configs = []
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for job in jobs:
            cfg = cli.to_object(hydra.compose("config", list(job)))
            validate(cfg)
            configs.append(cfg)
    return configs


def values(job, key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in job if o.split("=", 1)[0] == key), None)


def lr(job) -> float | None:
    value = values(job, "method.lr")
    return None if value is None else float(value)


def methods(jobs) -> Counter:
    return Counter(values(job, "method") for job in jobs)


# -- the grids sweeper -----------------------------------------------------------------------

GRIDS = {
    "zero-shot": {"method": "zero-shot"},
    "mezo": {"method": "mezo", "method.lr": "1e-6,1e-7"},
    "lozo": {"method": "lozo", "method.lr": "1e-6,1e-7", "method.rank": "1,2"},
}


def test_grids_are_a_union_of_products_crossed_with_the_shared_params():
    jobs = jobs_of(grids_sweeper(GRIDS, {"task": "sst2,rte"}))
    assert len(jobs) == 2 * (1 + 2 + 4)
    assert jobs[:4] == [
        ["task=sst2", "method=zero-shot"],
        ["task=sst2", "method=mezo", "method.lr=1e-06"],  # values as Hydra prints them
        ["task=sst2", "method=mezo", "method.lr=1e-07"],
        ["task=sst2", "method=lozo", "method.lr=1e-06", "method.rank=1"],
    ]
    assert jobs[7] == ["task=rte", "method=zero-shot"]  # shared values outermost
    assert not [job for job in jobs if "method=mezo" in job and any("rank" in o for o in job)]


def test_the_command_line_narrows_grid_keys_and_replaces_the_others():
    sweeper = grids_sweeper(GRIDS, {"task": "sst2,rte"})
    assert jobs_of(sweeper, "method=lozo", "task=sst2") == [
        ["task=sst2", "method=lozo", "method.lr=1e-06", "method.rank=1"],
        ["task=sst2", "method=lozo", "method.lr=1e-06", "method.rank=2"],
        ["task=sst2", "method=lozo", "method.lr=1e-07", "method.rank=1"],
        ["task=sst2", "method=lozo", "method.lr=1e-07", "method.rank=2"],
    ]
    # Values compare as values (1.0e-06 is 1e-6); grids without the key stay whole.
    narrowed = jobs_of(sweeper, "method.lr=1.0e-06", "task=rte", "+seed=3,4")
    assert Counter(values(j, "method") for j in narrowed) == {"zero-shot": 2, "mezo": 2, "lozo": 4}
    assert {values(j, "method.lr") for j in narrowed} == {None, "1e-06"}
    assert narrowed[0] == ["task=rte", "+seed=3", "method=zero-shot"]
    assert jobs_of(sweeper, "method=mezo,lozo", "method.rank=2", "task=sst2") == [
        ["task=sst2", "method=mezo", "method.lr=1e-06"],  # MeZO has no rank: not narrowed
        ["task=sst2", "method=mezo", "method.lr=1e-07"],
        ["task=sst2", "method=lozo", "method.lr=1e-06", "method.rank=2"],
        ["task=sst2", "method=lozo", "method.lr=1e-07", "method.rank=2"],
    ]


def test_a_command_line_that_leaves_no_job_says_what_the_grids_hold():
    with pytest.raises(HydraException, match=r"no job left: method=ft matches none") as err:
        jobs_of(grids_sweeper(GRIDS), "method=ft")
    assert "mezo: method=mezo method.lr=1e-06,1e-07" in str(err.value)


def test_null_grids_drop_out_duplicates_run_once_and_no_grids_is_one_product():
    grids = {**GRIDS, "lozo": None, "again": {"method": "mezo", "method.lr": "1e-7,1e-5"}}
    jobs = jobs_of(grids_sweeper(grids))
    assert jobs == [
        ["method=zero-shot"],
        ["method=mezo", "method.lr=1e-06"],
        ["method=mezo", "method.lr=1e-07"],
        ["method=mezo", "method.lr=1e-05"],
    ]
    # YAML values that are not strings become override text (numbers, booleans, null).
    typed = jobs_of(grids_sweeper({"g": {"method.lr": 1e-6, "model.random_init": True}}))
    parsed = OverridesParser.create().parse_overrides(typed[0])
    assert [(o.key_or_group, o.value()) for o in parsed] == [
        ("method.lr", 1e-6),
        ("model.random_init", True),
    ]
    assert jobs_of(grids_sweeper(None, {"seed": "0,1"}), "method=mezo,lozo") == [
        ["seed=0", "method=mezo"],
        ["seed=0", "method=lozo"],
        ["seed=1", "method=mezo"],
        ["seed=1", "method=lozo"],
    ]


# -- the presets -----------------------------------------------------------------------------


def test_there_is_a_preset_per_paper_table_and_figure():
    assert {
        "opt13b",
        "opt30b",
        "opt66b",
        "roberta_k16",
        "roberta_k512",
        "lozo_ablation",
        "memory",
        "smoke_grid",
    } <= set(PRESETS)


def test_opt13b_is_the_11_task_table_with_the_published_grids():
    jobs = preset_jobs("opt13b")
    assert len(jobs) == 275 and sweep_config("opt13b").model.name == "opt-13b"
    tasks = Counter(values(job, "task") for job in jobs)
    assert set(tasks) == set(PAPER[PAPER["model"] == "opt-13b"]["task"]) and set(
        tasks.values()
    ) == {25}
    assert methods(jobs) == {
        "zero-shot": 11,
        "icl": 11,
        "mezo": 22,
        "mezo-lora": 22,
        "lozo": 88,
        "lozo-m": 88,
        "ft": 33,
    }
    lozo = [job for job in jobs if values(job, "method") == "lozo" and values(job, "task") == "rte"]
    assert {(lr(j), values(j, "method.rank"), values(j, "method.interval")) for j in lozo} == {
        (lr, r, i) for lr in (1e-6, 1e-7) for r in ("1", "2") for i in ("50", "100")
    }
    assert {lr(j) for j in jobs if values(j, "method") == "mezo-lora"} == {1e-4, 5e-5}


@pytest.mark.parametrize("name, model", [("opt30b", "opt-30b"), ("opt66b", "opt-66b")])
def test_opt30b_and_opt66b_run_the_tasks_the_papers_report_at_that_size(name, model):
    jobs = preset_jobs(name)
    assert sweep_config(name).model.name == model  # what hydra/launcher=slurm sizes for
    reported = PAPER[(PAPER["model"] == model) & (PAPER["k"].isna() | (PAPER["k"] == 1000))]
    assert {values(job, "task") for job in jobs} == set(reported["task"])
    assert methods(jobs) == {"zero-shot": 6, "icl": 6, "mezo": 12, "lozo": 48, "lozo-m": 48}


@pytest.mark.parametrize("k", [16, 512])
def test_roberta_presets_run_six_tasks_times_five_data_seeds(k):
    jobs = preset_jobs(f"roberta_k{k}")
    assert len(jobs) == 330 and {values(job, "task.k") for job in jobs} == {str(k)}
    assert sweep_config(f"roberta_k{k}").model.name == "roberta-large"
    cells = Counter((values(job, "task"), values(job, "method")) for job in jobs)
    roberta = PAPER[PAPER["model"] == "roberta-large"]
    assert {task for task, _ in cells} == set(roberta["task"])
    assert Counter(values(job, "task.data_seed") for job in jobs) == {
        s: 66 for s in ("13", "21", "42", "87", "100")
    }
    assert {lr(j) for j in jobs if values(j, "method") == "mezo"} == {1e-7, 1e-6, 1e-5}


def test_the_ablation_runs_the_rank_and_interval_points_the_paper_reports():
    jobs = preset_jobs("lozo_ablation")
    settings = {
        f"method.rank={values(j, 'method.rank')} method.interval={values(j, 'method.interval')}"
        for j in jobs
    }
    reported = PAPER[(PAPER["model"] == "opt-1.3b") & (PAPER["metric"] == "accuracy")]
    assert len(jobs) == 11 and settings == set(reported["setting"])
    config = sweep_config("lozo_ablation")
    assert (config.model.name, config.task.name) == ("opt-1.3b", "sst2")


def test_the_memory_preset_measures_table_22_with_the_published_dtypes():
    jobs = preset_jobs("memory")
    assert len(jobs) == 6 * 7 and all("+experiment=memory" in job for job in jobs)  # the report
    assert [values(job, "model") for job in jobs[::7]] == OPT_SIZES
    assert methods(jobs) == {
        m: 6 for m in ("zero-shot", "icl", "mezo", "lozo", "lozo-m", "ft-lora", "ft")
    }
    configs = {c.method.name: c for c in compose_jobs(jobs[:7])}
    for name, cfg in configs.items():
        assert cfg.model.random_init and cfg.task.name == "multirc"
        assert cfg.trainer.max_steps == 3 and cfg.trainer.eval_batch_size == 1
        assert getattr(cfg.method, "batch_size", 1) == 1
        backprop = name in ("ft", "ft-lora")
        assert cfg.model.dtype == ("float32" if backprop else "float16"), name
        assert cfg.trainer.amp == ("fp16" if backprop else "off"), name
    # MultiRC-length inputs (MeZO Table 22: about 400 tokens), enough to fill ICL's context.
    tokenizer = stand_in_tokenizer("causal")
    from large_models.tasks.multirc import TASK

    cfg = configs["icl"]
    rows = [json.loads(line) for line in Path(cfg.task.data_files.train).read_text().splitlines()]
    lengths = [len(tokenizer(TASK.render(row).context).input_ids) for row in rows]
    assert 350 <= np.mean(lengths) <= 450 and min(lengths) >= 300
    assert len(rows) * min(lengths) >= 2 * cfg.model.max_length  # ICL's pool: the whole file
    assert Path(cfg.task.data_files.validation).is_file()


def test_the_smoke_grid_is_two_zo_methods_by_two_seeds_by_two_learning_rates():
    jobs = preset_jobs("smoke_grid")
    assert methods(jobs) == {"mezo": 4, "lozo": 4}
    assert Counter((values(j, "seed"), lr(j)) for j in jobs) == {
        (s, lr): 2 for s in ("0", "1") for lr in (1e-3, 1e-2)
    }
    assert {c.model.name for c in compose_jobs(jobs)} == {"tiny-opt"}


@pytest.mark.parametrize("name", PRESETS)
def test_each_presets_jobs_compose_one_per_method(name):
    """One job of each method (and key set) of the preset, composed as the job composes it."""
    jobs = preset_jobs(name)
    shapes = {}
    for job in jobs:
        shapes.setdefault((values(job, "method"), tuple(o.split("=")[0] for o in job)), job)
    configs = compose_jobs(shapes.values())
    assert {c.method.name for c in configs} == set(methods(jobs)) - {None}


@pytest.mark.slow  # ~1300 jobs
@pytest.mark.parametrize("name", PRESETS)
def test_every_job_of_every_preset_composes(name):
    jobs = preset_jobs(name)
    configs = compose_jobs(jobs)
    for job, cfg in zip(jobs, configs, strict=True):
        assert values(job, "method") in (None, cfg.method.name)
        if lr(job) is not None:
            assert cfg.method.lr == lr(job)


# -- launchers -------------------------------------------------------------------------------


def test_slurm_jobs_get_the_models_resources_and_can_be_requeued(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit

    srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor wants srun on the PATH
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LOZO_EXP_PARTITION", "gpu-long")
    config = sweep_config("opt66b", "hydra/launcher=slurm")
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(config)
    params = OmegaConf.to_container(config.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("submitit_launcher.SlurmLauncher")
    # As hydra_submitit_launcher's BaseSubmititLauncher.launch hands them to submitit.
    executor = submitit.AutoExecutor(
        folder=tmp_path / "submitit",
        cluster="slurm",
        slurm_max_num_timeout=params["max_num_timeout"],
    )
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes"}
    base |= {"name", "stderr_to_stdout"}
    executor.update_parameters(
        **{
            k if k in base else f"slurm_{k}": v
            for k, v in params.items()
            if k not in ("submitit_folder", "_target_", "max_num_timeout")
        }
    )
    sbatch = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in (
        "--gpus-per-node=1",
        "--time=2880",  # conf/hydra/launcher/resources/opt-66b.yaml
        "--mem=192GB",
        "--partition=gpu-long",
        "--signal=USR2@300",  # time to checkpoint before the time limit or a preemption
        "--job-name=lozo-exp",
    ):
        assert f"#SBATCH {line}\n" in sbatch, line
    assert executor._executor.max_num_timeout == 3  # requeued after a time-out, three times
    small = OmegaConf.to_container(
        sweep_config("smoke_grid", "hydra/launcher=slurm").hydra.launcher, resolve=True
    )
    assert (small["timeout_min"], small["gpus_per_node"]) == (240, 1)  # no resources file


def test_every_paper_model_has_slurm_resources():
    resources = {p.stem for p in (CONF / "hydra" / "launcher" / "resources").glob("*.yaml")}
    assert resources == {"opt-125m", *OPT_SIZES, "roberta-large"}
    assert resources <= {p.stem for p in (CONF / "model").glob("*.yaml")}
    timeouts = [
        OmegaConf.load(CONF / "hydra" / "launcher" / "resources" / f"{m}.yaml").timeout_min
        for m in ["opt-125m", *OPT_SIZES]
    ]
    assert timeouts == sorted(timeouts)  # larger models get more time


def test_a_launcher_without_its_plugin_names_the_extra_to_install():
    hint = "come with Hydra's submitit plugin: pip install 'lozo-exp[slurm]'; README: Launching)"
    extended = MissingConfigException("", missing_cfg_file="hydra/launcher/submitit_slurm")
    assert cli.describe(extended).startswith("hydra/launcher/submitit_slurm cannot be loaded (")
    chosen = MissingConfigException(
        "", missing_cfg_file="hydra/launcher/submitit_local", options=["basic", "slurm"]
    )
    assert cli.describe(chosen).startswith(
        "hydra/launcher=submitit_local is not an option of hydra/launcher; its options are: "
        "basic, slurm (SLURM and local-process launchers"
    )
    assert cli.describe(extended).endswith(hint) and cli.describe(chosen).endswith(hint)


# -- command line ------------------------------------------------------------------------------


def test_a_preset_narrowed_to_nothing_stops_before_anything_is_written(tmp_path):
    done = run_cli(tmp_path, "-m", "+experiment=smoke_grid", "method=ft")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        "lozo-exp: no job left: method=ft matches none of the sweep's grids (mezo:" in done.stderr
    )
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # (the claimed sweep dir: empty)


@pytest.mark.slow  # Hydra composes every job before launching any
def test_a_grid_with_a_meaningless_combination_stops_before_any_job(tmp_path):
    bad = "+hydra.sweeper.grids.bad={method: mezo, method.rank: 2}"  # MeZO has no rank
    done = run_cli(tmp_path, "-m", "+experiment=smoke_grid", bad)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "method.rank is not a key of method mezo" in done.stderr
    assert not list(tmp_path.glob("multirun/*/*/*/results.json"))


def run_report(sweep: Path, out: Path) -> pd.DataFrame:
    done = run_cli(sweep.parent, "report", str(sweep), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert all((out / f).is_file() for f in ("table.md", "table.csv", "table.tex", "cells.csv"))
    for name in REPORT_FIGURES:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    return pd.read_csv(out / "runs.csv")


@pytest.mark.slow  # 8 tiny runs, then the report
def test_the_smoke_grid_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli(tmp_path, "-m", "+experiment=smoke_grid", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr
    assert f"Sweep {sweep}: 8 jobs (8 completed)" in done.stdout
    runs = run_report(sweep, tmp_path / "report")
    assert len(runs) == 8 and set(runs["status"]) == {"completed"}
    assert Counter(zip(runs["method"], runs["method.lr"], strict=True)) == {
        (m, lr): 2 for m in ("mezo", "lozo") for lr in (1e-3, 1e-2)
    }
    cells = pd.read_csv(tmp_path / "report" / "cells.csv").set_index("method")
    for method, group in runs.groupby("method"):  # best mean dev over the two seeds
        dev = group.groupby("method.lr")["dev"].mean()
        best = group[group["method.lr"] == dev.idxmax()]
        assert cells.loc[method, "value"] == pytest.approx(100 * best["test"].mean(), abs=1e-4)
        assert cells.loc[method, "n_seeds"] == 2


@pytest.mark.slow  # 5 tiny runs as separate processes
def test_submitit_local_runs_each_job_in_its_own_process_and_a_failure_stays_its_own(tmp_path):
    """The smoke grid at seed 0 plus two bad jobs: a value the model cannot be built with (64
    hidden units in 3 heads: fails when the model is built) and a device that does not exist
    (refused before the run starts)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    crash = "+hydra.sweeper.grids.crash={method: mezo, model.arch.num_attention_heads: 3}"
    bad = "+hydra.sweeper.grids.bad={method: lozo, trainer.device: 'cuda:99'}"
    done = run_cli(
        tmp_path,
        "-m",
        "+experiment=smoke_grid",
        "hydra/launcher=submitit_local",
        "seed=0",
        crash,
        bad,
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 1  # the sweep summary: a job failed
    assert f"Sweep {sweep}: 6 jobs (4 completed, 1 failed, 1 rejected)" in done.stdout
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 6  # one process per job
    runs = run_report(sweep, tmp_path / "report").set_index("status")
    assert runs.index.value_counts().to_dict() == {"completed": 4, "failed": 1, "rejected": 1}
    assert "num_heads" in runs.loc["failed", "error"]  # transformers' own message
    assert "cuda:99" in runs.loc["rejected", "error"]
    assert runs.loc["completed", "test"].notna().all()
    cells = pd.read_csv(tmp_path / "report" / "cells.csv").set_index("method")
    assert cells.loc["mezo", "notes"] == "1 failed" and cells.loc["lozo", "notes"] == "1 rejected"
