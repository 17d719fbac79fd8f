"""The package and its entry module: where `conf/` is found, what is shipped, imports without
cycles or side effects, config errors as one paragraph."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import lozo_exp
from lozo_exp import cli
from lozo_exp.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lozo_exp", "large_models", "medium_models", "hydra_plugins")


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- packaging -------------------------------------------------------------------------------


def test_config_dir_is_the_one_next_to_the_code_being_run():
    assert Path(cli.__file__).resolve().parents[1] == ROOT  # this checkout's code ...
    assert cli.config_dir() == ROOT / "conf"  # ... reads this checkout's conf/


def test_the_wheel_ships_every_module_and_data_file():
    """pyproject's explicit package list and data globs cover every tracked file."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    shipped: set[Path] = set()
    for package in setuptools["packages"]:
        folder = ROOT / mapped.get(package, package.replace(".", "/"))
        shipped |= set(folder.glob("*.py"))
        for pattern in setuptools["package-data"].get(package, []):
            shipped |= set(folder.glob(pattern))
    tracked = subprocess.run(
        ["git", "ls-files", *PACKAGES, *mapped.values()], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    measured = "results/paper/memory/"  # a measurement's outputs, beside the papers' numbers
    tracked = [f for f in tracked if not f.startswith(measured)]
    assert {ROOT / f for f in tracked} <= {p for p in shipped if p.is_file()}
    inits = [p.parent.relative_to(ROOT) for d in PACKAGES for p in (ROOT / d).rglob("__init__.py")]
    assert {".".join(p.parts) for p in inits} == set(setuptools["packages"]) - set(mapped)
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == {
        "lozo-exp": "lozo_exp.__main__:main"
    }


def test_public_api_is_lazy_and_complete():
    done = python(
        "import sys, lozo_exp; print(lozo_exp.__version__);"
        "print(sorted(m for m in ('torch', 'hydra', 'omegaconf') if m in sys.modules))"
    )
    assert done.stdout.split("\n")[:2] == [lozo_exp.__version__, "[]"], done.stderr
    for name in lozo_exp.__all__:
        assert getattr(lozo_exp, name) is not None
    assert set(lozo_exp.__all__) - {"__version__"} == set(lozo_exp._API)
    assert lozo_exp.RunConfig is RunConfig and lozo_exp.run_config is cli.run_config
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = lozo_exp.nope


# -- imports: no cycles, no side effects -----------------------------------------------------


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _prefixes(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(path: Path, name: str, modules: dict[str, Path], top_level: bool) -> set[str]:
    """Project modules `path` imports (at import time only, if `top_level`) and the packages
    each import initialises on the way, except the module's own packages (already initialised
    when it runs; importing a name defined in one of them still counts)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    targets: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert not node.level, f"{name}: relative import"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in modules else node.module)
    found = set()
    for target in targets:
        while target and target not in modules:  # `import a.b` of a non-project or data name
            target = target.rpartition(".")[0]
        if target:
            found |= {target} | (_prefixes(target) - _prefixes(name))
    return found - {name}


def test_modules_import_without_cycles():
    modules = _modules()
    graph = {m: _imports(p, m, modules, top_level=True) for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join([*trail, dep])
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_core_never_imports_a_model_family():
    """lozo_exp reaches large_models/medium_models only by name (adapter registry, commands)."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("lozo_exp"):
            deps = _imports(path, name, modules, top_level=False)
            assert not {d for d in deps if not d.startswith("lozo_exp")}, name


def test_importing_the_entry_points_does_nothing():
    code = (
        "import logging, os, lozo_exp.__main__, lozo_exp.cli, lozo_exp.train, lozo_exp.bench, "
        "large_models.eval_bench, medium_models.kshot\n"
        "from hydra.core.config_store import ConfigStore\n"
        "from omegaconf import OmegaConf\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), logging.getLogger().handlers,"
        " sorted(k for k in ConfigStore.instance().repo if 'schema' in k),"
        " OmegaConf.has_resolver('lozo_exp.job_dirname'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip() == "None [] [] False", done.stderr


def test_an_unreachable_hub_switches_the_hf_libraries_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    cli.go_offline_if_hub_unreachable()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("verbose", [False, True])
def test_datasets_progress_bars_show_only_when_verbose(monkeypatch, verbose):
    import datasets

    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    datasets.enable_progress_bars()
    cli.set_verbosity(verbose)
    assert datasets.is_progress_bar_enabled() == verbose
    assert ("HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ) != verbose
    datasets.enable_progress_bars()


# -- config errors ---------------------------------------------------------------------------


def _typed_nodes(schema: type, path: str = "") -> list[tuple[str, list[str]]]:
    """(path, field names) of every dataclass node of a schema, the root first."""
    fields = dataclasses.fields(schema)
    found = [(path, [f.name for f in fields])]
    for f in fields:
        default = f.default_factory() if callable(f.default_factory) else f.default
        if dataclasses.is_dataclass(default):
            found += _typed_nodes(type(default), f"{path}{f.name}.")
    return found


@pytest.mark.parametrize("prefix", ["", "+"])
@pytest.mark.parametrize("path, fields", _typed_nodes(RunConfig), ids=lambda x: str(x))
def test_an_unknown_key_names_the_keys_its_node_accepts(path, fields, prefix):
    if path == "method.":  # the default run's method, mezo, has a schema of its own
        fields = [f.name for f in dataclasses.fields(type(cli.run_config([]).method))]
    with pytest.raises(ConfigError) as err:
        cli.run_config([f"{prefix}{path}bogus_key=1"])
    node = path.rstrip(".") or "the config"
    label = {"model": "model tiny-opt", "task": "task sst2", "method": "method mezo"}
    assert str(err.value) == (
        f"{path}bogus_key is not a key of {label.get(node, node)}; its keys are: "
        + ", ".join(fields)
    )


def test_a_free_form_node_says_how_to_add_a_key():
    with pytest.raises(ConfigError, match=r"\(add a new one with \+model\.arch\.heads=VALUE\)$"):
        cli.run_config(["model.arch.heads=4"])
    assert cli.run_config(["+model.arch.heads=4"]).model.arch["heads"] == 4
