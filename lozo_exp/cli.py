"""How every lozo-exp command starts: find `conf/`, compose a config, go offline when the hub
is unreachable, set up logging, and end a bad setting with one readable paragraph (exit status 1)
before anything is written. Nothing here runs at import time; the commands call it:

- Hydra apps (`train`, `bench`): `run_hydra(task_function, config_name, argv)`;
- argparse commands (`kshot`, `eval-bench`, `report`): `start(verbose)`, then `compose(...)` for
  a config, and `fail(err)` for a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lozo_exp import outputs
from lozo_exp.config import RUNTIME_KEYS, ConfigError, RunConfig, check_overrides, register_configs

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's job logging
# Config options that a Hydra plugin brings, and how to install it.
PLUGINS = {
    "hydra/sweeper/optuna": (
        " (optuna comes with Hydra's Optuna sweeper: pip install 'lozo-exp[optuna]' && pip "
        "install --no-deps hydra-optuna-sweeper; README: Hyperparameter search)"
    ),
    **dict.fromkeys(
        ("hydra/launcher/submitit_slurm", "hydra/launcher/submitit_local"),
        " (SLURM and local-process launchers, hydra/launcher=slurm among them, come with "
        "Hydra's submitit plugin: pip install 'lozo-exp[slurm]'; README: Launching)",
    ),
}


def config_dir() -> Path:
    """The `conf/` of the code being run: the copy inside an installed package
    (`lozo_exp/conf`), else the checkout's top-level `conf/` (never another checkout's)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(f"found no conf/config.yaml in {package} or next to it")


def go_offline_if_hub_unreachable() -> None:
    """Without this, every hub lookup on an offline machine retries for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"


def set_verbosity(verbose: bool) -> None:
    """Library progress bars (datasets' "Generating train split" on every run) only when
    verbose (`hydra.verbose=true`, or a command's `--verbose`)."""
    if verbose:
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets loads
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["datasets"].disable_progress_bars()


def start(verbose: bool = False) -> None:
    """Set up an argparse command: offline when needed, console logging, quiet libraries."""
    go_offline_if_hub_unreachable()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    set_verbosity(verbose)


def asset(name: str) -> str:
    """`${lozo_exp.asset:NAME}`: the path of a file shipped with the package in its assets/."""
    return str(Path(__file__).resolve().parent / "assets" / name)


def expose_checkout_plugins() -> None:
    """Run from a checkout, its `hydra_plugins/` (the grids sweeper) must be on `sys.path`:
    an editable install's import hook serves it to `import`, but Hydra lists plugins with
    `pkgutil`, which cannot see through that hook."""
    root = Path(__file__).resolve().parent.parent
    if (root / "hydra_plugins").is_dir() and str(root) not in sys.path:
        sys.path.append(str(root))


def torchrun_processes() -> int:
    """How many processes torchrun started for this run (1 outside torchrun): read from its
    environment, before torch is imported."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def register() -> None:
    """The run schemas (ConfigStore), the resolvers `conf/` uses, the checkout's plugins."""
    expose_checkout_plugins()
    register_configs()
    outputs.register_resolvers()
    OmegaConf.register_new_resolver("lozo_exp.asset", asset, replace=True)


# -- config errors as one paragraph ----------------------------------------------------------


def _node_label(path: str, node: Any) -> str:
    """`method mezo`, `trainer`, or `the config` (the root)."""
    if not path:
        return "the config"
    name = node.get("name") if isinstance(node, DictConfig) else None
    return f"{path} {name}" if isinstance(name, str) else path


def _not_a_key(full_key: str, node: Any, keys: Sequence[str], open_node: bool) -> str:
    path = full_key.rpartition(".")[0]
    text = f"{full_key} is not a key of {_node_label(path, node)}; its keys are: {', '.join(keys)}"
    return text + (f" (add a new one with +{full_key}=VALUE)" if open_node else "")


def _schema_keys(schema: Any) -> list[str] | None:
    if not dataclasses.is_dataclass(schema):
        return None
    return [f.name for f in dataclasses.fields(schema)]


def describe(err: BaseException) -> str:
    """One paragraph for a bad setting: for an unknown key, the key and the keys its node
    accepts; for an unknown option, the group's options; else the library's message, joined."""
    if isinstance(err, ConfigError):
        return str(err)
    missing = err.missing_cfg_file if isinstance(err, MissingConfigException) else None
    if missing in PLUGINS and not err.options:  # ours extends it (hydra/launcher=slurm)
        return f"{missing} cannot be loaded{PLUGINS[missing]}"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, choice = err.missing_cfg_file.rpartition("/")
        options = ", ".join(err.options)
        hint = PLUGINS.get(err.missing_cfg_file, "")
        return f"{group}={choice} is not an option of {group}; its options are: {options}{hint}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {err.message.splitlines()[0]}"
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and full_key:
        node = cause.parent_node
        schema_keys = _schema_keys(cause.object_type)
        keys = schema_keys or (list(node.keys()) if isinstance(node, DictConfig) else [])
        return _not_a_key(full_key, node, keys, open_node=schema_keys is None)
    if isinstance(cause, OmegaConfBaseException) and full_key:
        return f"{full_key}: {str(cause.msg).splitlines()[0]}"
    return " ".join(str(err).split())


def check_keys(cfg: DictConfig, skip: Sequence[str] = (), path: str = "") -> None:
    """Every key of a typed node is a field of its schema: Hydra lets `+trainer.foo=1` add a
    key to a typed node, which would then be silently ignored."""
    fields = _schema_keys(OmegaConf.get_type(cfg))
    for key, value in cfg.items_ex(resolve=False):
        full_key = f"{path}{key}"
        if full_key in skip:
            continue
        if fields is not None and key not in fields:
            raise ConfigError(_not_a_key(full_key, cfg, fields, open_node=False))
        if isinstance(value, DictConfig):
            check_keys(value, skip, f"{full_key}.")


@contextmanager
def config_errors() -> Iterator[None]:
    """Hydra's and OmegaConf's composition errors, raised as one-paragraph ConfigErrors."""
    try:
        yield
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(describe(err)) from err


def fail(err: BaseException | str) -> NoReturn:
    """End the command: one paragraph on stderr, exit status 1."""
    message = describe(err) if isinstance(err, BaseException) else err
    print(f"\nlozo-exp: {message}", file=sys.stderr)
    raise SystemExit(1)


# -- composing -------------------------------------------------------------------------------


def compose(config_name: str = "config", overrides: Sequence[str] = ()) -> DictConfig:
    """The config `lozo-exp <overrides>` would run (Hydra's Compose API over `config_dir()`);
    a bad override raises ConfigError. Schemas of other configs (e.g. `bench`) are registered
    by their module before this is called."""
    register()
    with (
        config_errors(),
        hydra.initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"),
    ):
        cfg = hydra.compose(config_name=config_name, overrides=list(overrides))
    check_keys(cfg)
    return cfg


def run_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The typed config `lozo-exp train <overrides>` runs (values not yet validated; a task key
    the model's family does not read is refused here)."""
    cfg = to_object(compose("config", overrides))
    check_overrides(cfg, overrides)
    return cfg


def stored_run_config(run_dir: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The typed config the run in `run_dir` ran with (its `.hydra/config.yaml`, as Hydra
    saved it), with `overrides` of RUNTIME_KEYS only: a resumed run computes what it did."""
    from lozo_exp.methods import METHODS

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"resume={run_dir}: there is no {path}, where a run directory keeps the config it "
            f"ran with (is {run_dir} a run directory?)"
        )
    stored = OmegaConf.load(path)
    with config_errors():
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    for override in parsed:
        key = override.key_or_group
        allowed = any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)
        if allowed and key != "logger":  # keys, not the logger group (logger.wandb=true)
            OmegaConf.update(stored, key, override.value(), merge=True)
            continue
        node = OmegaConf.select(stored, key)
        now = node.get("name", "...") if isinstance(node, DictConfig) else node
        raise ConfigError(
            f"resume={run_dir} continues that run with the config it ran with ({path}), where "
            f"{key}={now}: {override.input_line} would change it. Only these keys may be given "
            f"with resume: {', '.join(k + ('.*' if k == 'logger' else '') for k in RUNTIME_KEYS)}"
        )
    name = OmegaConf.select(stored, "method.name")
    if name not in METHODS:
        raise ConfigError(f"{path}: method.name={name!r} is not one of {', '.join(METHODS)}")
    schema = OmegaConf.structured(RunConfig(method=METHODS[name].config()))
    with config_errors():
        typed = OmegaConf.merge(schema, stored)
    return to_object(typed)


def to_object(cfg: DictConfig) -> Any:
    """The typed object of a composed config (a job's config), or a ConfigError."""
    check_keys(cfg)
    with config_errors():
        return OmegaConf.to_object(cfg)


OPTUNA_NOTHING_COMPLETED = "No trials are completed yet."  # the Optuna sweeper's last word then


def run_hydra(
    task_function: Callable[[DictConfig], Any],
    config_name: str,
    argv: Sequence[str] | None = None,
) -> None:
    """Run `task_function` as the Hydra app of `conf/<config_name>.yaml` with Hydra's command
    line `argv` (default: the process's): overrides, `-m`, `--cfg job`, `--help`, ..."""
    go_offline_if_hub_unreachable()
    register()
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    saved_argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors instead of printing
    try:
        app(task_function)()
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        if full_error == "1":
            raise
        fail(err)
    except ValueError as err:
        if full_error == "1" or str(err) != OPTUNA_NOTHING_COMPLETED:
            raise
        fail(
            "no trial of the search completed: every job failed, was rejected or diverged (the "
            "job lines above say why, and each job's results.json in the sweep directory), so "
            "there is no best setting; fix the setting the jobs share, or the search ranges"
        )
    finally:
        sys.argv = saved_argv
        if full_error is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
        GlobalHydra.instance().clear()


class StartGuard(Callback):
    """Before Hydra writes anything (`.hydra/`, a sweep's `multirun.yaml`), ends the command
    when the config has keys its schema lacks, or claims the run or sweep directory
    (`outputs.claim_run_dir`: refused when it holds a run or another run uses it; a sweep's
    existing job directories are checked too). Listed under `hydra.callbacks` in
    `conf/config.yaml`."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # the directory may use ${hydra:...}
        self._check(config, Path(config.hydra.run.dir), [], "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if torchrun_processes() > 1:
            fail(
                "a sweep (-m) under torchrun is not supported: torchrun runs one run across its "
                "processes; to run a sweep's jobs in parallel, each on its own GPUs, use "
                "hydra/launcher=gpus_local (hydra.launcher.gpus_per_job=N for data-parallel jobs)"
            )
        HydraConfig.instance().set_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        self._check(config, sweep_dir, list(outputs.job_dirs(sweep_dir)), "hydra.sweep.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        outputs.release_run_dir(Path(config.hydra.run.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        outputs.release_run_dir(Path(config.hydra.sweep.dir))

    @staticmethod
    def _check(config: DictConfig, claim: Path, jobs: list[Path], setting: str) -> None:
        # Hydra turns an Exception raised by a callback into a warning: `fail` exits instead.
        try:
            check_keys(config, skip=("hydra",))
            outputs.claim_run_dir(claim, setting)
            for directory in jobs:
                outputs.check_output_dir(directory, setting)
        except ConfigError as err:
            outputs.release_run_dir(claim)
            fail(err)
