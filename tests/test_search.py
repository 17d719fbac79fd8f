"""Optuna searches (`+search=lozo`, Hydra's Optuna sweeper): trials maximise the dev metric the
train job returns; a job without one is a failed trial and the search goes on."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import yaml
from conftest import run_cli
from hydra.errors import MissingConfigException

from lozo_exp import cli

PLUGIN = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
NO_PLUGIN = (
    "the Optuna sweeper is not installed: pip install 'lozo-exp[optuna]' && "
    "pip install --no-deps hydra-optuna-sweeper"
)


def test_a_missing_sweeper_plugin_says_how_to_install_it():
    err = MissingConfigException("", missing_cfg_file="hydra/sweeper/optuna", options=["basic"])
    message = cli.describe(err)
    assert message.startswith("hydra/sweeper=optuna is not an option of hydra/sweeper; its ")
    assert "pip install --no-deps hydra-optuna-sweeper" in message


@pytest.mark.skipif(not PLUGIN, reason=NO_PLUGIN)
def test_the_search_preset_composes():
    cfg = cli.compose("config", ["+search=lozo"])
    assert cfg.method.name == "lozo"
    assert cli.compose("config", ["+search=lozo", "method=lozo-m"]).method.name == "lozo-m"


@pytest.mark.slow  # a 4-trial search of 2-step LOZO runs in a subprocess
@pytest.mark.skipif(not PLUGIN, reason=NO_PLUGIN)
def test_an_optuna_search_maximises_the_dev_metric_and_skips_failed_trials(tmp_path):
    optuna = pytest.importorskip("optuna")
    done = run_cli(
        tmp_path,
        "-m",
        "+search=lozo",
        "method.rank=choice(0,1)",  # rank 0 is rejected: those trials have no dev metric
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.storage=sqlite:///study.db",
        "hydra.sweeper.study_name=test",
        "trainer.max_steps=2",
        "trainer.eval_steps=1",
        "hydra.sweep.dir=search",
    )
    assert done.returncode == 1, done.stderr  # rejected jobs fail the sweep, after all 4 ran
    assert re.search(r"Sweep search: 4 jobs \(\d completed, \d rejected\)", done.stdout)
    jobs = {}
    for path in (tmp_path / "search").glob("*/results.json"):
        jobs[int(path.parent.name.split("_")[0])] = json.loads(path.read_text())
    assert sorted(jobs) == [0, 1, 2, 3]
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'study.db'}")
    completed = {}
    for trial in study.trials:
        job = jobs[trial.number]
        method = job["method_config"]
        assert job["method"] == "lozo" and trial.params == {
            f"method.{k}": method[k] for k in ("lr", "eps", "rank", "interval")
        }
        assert 1e-7 <= method["lr"] <= 1e-5 and 1e-4 <= method["eps"] <= 1e-2  # the preset's
        assert method["interval"] in (50, 100, 200) and method["rank"] in (0, 1)
        if method["rank"] == 0:
            assert job["status"] == "rejected" and trial.state == optuna.trial.TrialState.FAIL
        else:
            assert job["status"] == "completed" and trial.value == job["dev"][job["metric"]]
            completed[trial.number] = trial.value
    assert 0 < len(completed) < 4  # both kinds of trial happened (the sampler is seeded)
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(completed.values())
    assert best["best_params"]["method.rank"] == 1


@pytest.mark.slow  # a 2-trial search whose jobs are all rejected, in a subprocess
@pytest.mark.skipif(not PLUGIN, reason=NO_PLUGIN)
def test_a_search_in_which_no_trial_completed_ends_in_one_paragraph(tmp_path):
    pytest.importorskip("optuna")
    done = run_cli(
        tmp_path, "-m", "+search=lozo", "method.rank=0", "hydra.sweeper.n_trials=2",
        "trainer.max_steps=2", "hydra.sweep.dir=search",
    )  # fmt: skip
    assert done.returncode == 1
    assert "no trial of the search completed" in done.stderr
    assert "Traceback" not in done.stderr
    statuses = [
        json.loads(p.read_text())["status"] for p in (tmp_path / "search").glob("*/results.json")
    ]
    assert statuses == ["rejected", "rejected"]
