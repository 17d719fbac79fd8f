"""Typed config schemas, registered in Hydra's ConfigStore.

Every YAML under `conf/` is merged onto these dataclasses, so an unknown key or a value of the
wrong type fails when Hydra composes the config, before anything is loaded. `validate` then
checks values (ranges, combinations) and raises `ConfigError` with one readable paragraph.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import netrc
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

FAMILIES = ("causal", "masked")
DTYPES = ("float32", "float16", "bfloat16", "float64")
DATA_SOURCES = ("hub", "sample")
LR_SCHEDULES = ("constant", "linear")
SELECT_BY = ("loss", "metric")
AMP = ("off", "fp16", "bf16")
WANDB_MODES = ("offline", "online", "disabled")
SEED_RANGE = 2**32  # NumPy's legacy generator (the published sampling) takes seeds in [0, 2**32)
SEED_KEYS = ("train_set_seed", "data_seed")  # task keys; `seed` is checked too
# Task keys that only one family's protocol reads: setting one on a model of the other family
# is an error rather than silently ignored (`check_overrides`).
FAMILY_TASK_KEYS = {
    "causal": ("num_train", "num_dev", "num_eval", "train_set_seed"),
    "masked": ("k", "data_seed", "test_cap", "lmbff_root", "data_dir"),
}
PROTOCOLS = {
    "causal": "the OPT protocol (task.num_train, num_dev and num_eval examples sampled with "
    "task.train_set_seed)",
    "masked": "the LM-BFF k-shot protocol (task.k examples per label, task.data_seed; split "
    "directories task.lmbff_root and task.data_dir; test sets capped at task.test_cap)",
}


RUNTIME_KEYS = (
    "trainer.device",
    "trainer.progress_every_s",
    "trainer.checkpoint_steps",
    "trainer.checkpoint_minutes",
    "trainer.save_final",
    "logger",
)
"""Keys (with the keys under them) that say where and how a run runs, not what it computes: a
resumed run may change them."""


class ConfigError(ValueError):
    """A bad setting, reported as one paragraph before any expensive work starts."""


@dataclass
class ModelConfig:
    name: str = MISSING
    # A hub checkpoint, a local checkpoint directory, or pkg://<module> (an installed package's
    # directory); None: the tiny models (stand-in tokenizer, `arch`).
    hub_id: str | None = None
    # A GGUF file in hub_id's directory, converted once into a checkpoint (lozo_exp.models).
    gguf_file: str | None = None
    # "causal" (OPT, Llama, ...) or "masked" (RoBERTa, BERT, ...): selects the adapter; None:
    # read from the checkpoint's config.
    family: str | None = None
    dtype: str = "float32"
    random_init: bool = False  # build from the architecture config with random weights
    # Architecture used when the hub config cannot be read offline (and by the tiny models).
    arch: dict[str, Any] = field(default_factory=dict)
    max_length: int = 2048
    # Whether the output embeddings (the LM head's vocabulary matrix) share the input embedding
    # matrix. false: the head gets its own copy at load, which trains (and ZO perturbs) apart
    # from the embeddings, as the published RoBERTa prompt model; true: shared; null: as the
    # checkpoint (or architecture) has it.
    tie_word_embeddings: bool | None = None
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Modules that train in full next to the LoRA adapters in the published code of the family
    # (RoBERTa: the LM head; OPT: none): the default of the LoRA methods' `modules_to_save`.
    lora_modules_to_save: list[str] = field(default_factory=list)


@dataclass
class DataFiles:
    """Local files with the hub dataset's columns (parquet, json/jsonl or csv), per split."""

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    validation_matched: str | None = None  # MNLI's two dev sets
    validation_mismatched: str | None = None


@dataclass
class TaskConfig:
    name: str = MISSING
    source: str = "hub"  # "hub" or "sample" (the small bundled sample)
    hub_id: str = MISSING
    hub_config: str | None = None
    # Our split name -> the hub dataset's split name.
    splits: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation"}
    )
    data_files: DataFiles = field(default_factory=DataFiles)  # a given split overrides `source`
    # Causal-LM protocol (MeZO/LOZO OPT experiments): sampled train/dev/eval sets.
    num_train: int = 1000
    num_dev: int = 500
    num_eval: int = 1000
    train_set_seed: int = 0
    # Masked-LM protocol (LM-BFF k-shot): k examples per label for train and for dev.
    k: int = 16
    data_seed: int = 13
    test_cap: int = 1000
    # LM-BFF layout: <lmbff_root>/original/<TASK>/ (the archive, if at hand) and the split
    # <lmbff_root>/k-shot-1k-test/<TASK>/<k>-<data_seed>/, built on first use; `data_dir`
    # names another split directory.
    lmbff_root: str = "data"
    data_dir: str | None = None
    # SQuAD-style tasks, ZO methods only: the loss is -F1 of greedy generations (no gradients).
    non_diff: bool = False


@dataclass
class MethodConfig:
    """Keys every method has. Each method extends it with its own schema (`lozo_exp/methods/`),
    which replaces this one when `method=<name>` is composed, so a key the chosen method does not
    use fails at compose time."""

    name: str = MISSING
    # Zeroth-order methods: only they can train on task.non_diff's loss (-F1 of generations).
    gradient_free: ClassVar[bool] = False
    # Backprop methods: only they use trainer.max_grad_norm and trainer.amp.
    backprop: ClassVar[bool] = False

    def check(self, run: RunConfig) -> list[str]:
        """One message per bad value of this method (or a run setting it cannot serve)."""
        return []


@dataclass
class TrainerConfig:
    # Length of training: exactly one of max_steps and epochs (epochs: max_steps is
    # epochs * ceil(train examples / method.batch_size); the last batch of an epoch may be short).
    max_steps: int | None = 20000
    epochs: int | None = None
    eval_steps: int | None = 4000  # dev evaluation interval; None: at the end of each epoch
    # Which dev evaluation's state is tested: the lowest dev loss (the published OPT code, HF
    # Trainer's load_best_model_at_end) or the best task metric (LM-BFF, the RoBERTa code).
    # Ties: the earlier evaluation wins.
    select_by: str = "metric"
    log_steps: int = 10
    eval_batch_size: int = 8
    progress_every_s: float = 30.0  # at most one progress line per this many seconds
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    # "constant" (the ZO scripts) or "linear" decay to 0 over the run (HF Trainer's default,
    # which the published FT scripts use).
    lr_schedule: str = "constant"
    # Backprop methods only: clip the gradient norm (None: no clipping), and mixed precision
    # (autocast; "fp16" also scales the loss) over float32 master weights.
    max_grad_norm: float | None = None
    amp: str = "off"
    # Checkpoints (`lozo_exp.checkpoint`): every this many steps and this many minutes (null:
    # not by that measure), and after every dev evaluation where a checkpoint holds no weights
    # (zeroth-order methods). Resume with `lozo-exp resume=RUN_DIR`.
    checkpoint_steps: int | None = None
    checkpoint_minutes: float | None = 10.0
    # Write the trainable weights after the last step to final.safetensors (LoRA: the adapter).
    save_final: bool = False


@dataclass
class LoggerConfig:
    """Where a run's records go besides `metrics.jsonl` (always written): Weights & Biases
    and/or TensorBoard (`logger=[wandb,tensorboard]`, or `logger.wandb=true`). `check` is the
    one place its settings are validated."""

    wandb: bool = False
    tensorboard: bool = False  # event files in <run dir>/tensorboard
    # W&B settings.
    mode: str = "offline"  # offline unless the user says online
    project: str = "lozo-exp"
    entity: str | None = None  # None: W&B's default entity
    group: str | None = None  # None: in a sweep, the sweep's directory (its runs share it)
    tags: list[str] = field(default_factory=list)

    def check(self) -> list[str]:
        """One message per bad setting: an unknown W&B mode, a logger whose package is missing."""
        missing = [
            f"logger.{name}=true needs the {package} package, which is not installed: "
            f"pip install {package} (or pip install 'lozo-exp[{name}]')"
            for name, package in (("wandb", "wandb"), ("tensorboard", "tensorboard"))
            if getattr(self, name) and importlib.util.find_spec(package) is None
        ]
        return missing + failing(
            [
                (
                    self.mode in WANDB_MODES,
                    f"logger.mode={self.mode!r} is not one of {choices(WANDB_MODES)}",
                ),
                (
                    not (self.wandb and self.mode == "online") or wandb_credentials() is not None,
                    "logger.mode=online needs W&B credentials, and none were found (no "
                    "WANDB_API_KEY, no netrc entry): run `wandb login` or set WANDB_API_KEY, or "
                    "log offline (logger.mode=offline) and `wandb sync` the run directory later",
                ),
            ]
        )


def wandb_credentials() -> str | None:
    """Where W&B would find an API key (as `wandb login` leaves it), or None: the
    WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE variable, or a netrc entry for the W&B host."""
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(variable):
            return variable
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for name in candidates:
        path = Path(name).expanduser()
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if entry and entry[2]:
            return str(path)
    return None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


def register_configs() -> None:
    """Store the run schema and every method's schema (`<name>_schema`)."""
    from lozo_exp.methods import register_method_schemas

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    register_method_schemas()


def choices(values: Iterable[str]) -> str:
    return ", ".join(values)


def failing(checks: Iterable[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that fail."""
    return [msg for ok, msg in checks if not ok]


def _method_fit(cfg: RunConfig) -> list[str]:
    """Run settings that only some methods can serve, named with the methods that can."""
    from lozo_exp.methods import METHODS

    m, tr = cfg.method, cfg.trainer
    if METHODS.get(m.name, None) is None or not isinstance(m, METHODS[m.name].config):
        return [f"method.name={m.name!r} does not name this method's schema; use method=<name>"]
    zo = [name for name, method in METHODS.items() if method.config.gradient_free]
    backprop = [name for name, method in METHODS.items() if method.config.backprop]
    return failing(
        [
            (
                not cfg.task.non_diff or (m.gradient_free and cfg.model.family == "causal"),
                f"task.non_diff=true (loss = -F1 of greedy generations, which has no gradient) "
                f"needs a zeroth-order method on a causal model ({choices(zo)}); got "
                f"method.name={m.name!r} with model.family={cfg.model.family!r}",
            ),
            (
                m.backprop or (tr.amp == "off" and tr.max_grad_norm is None),
                f"trainer.amp={tr.amp} and trainer.max_grad_norm={tr.max_grad_norm} apply to "
                f"backprop methods ({choices(backprop)}); method {m.name} needs amp=off and "
                f"max_grad_norm=null",
            ),
        ]
    )


def non_finite(node: Any, path: str = "") -> list[str]:
    """Every float of a config that is inf or nan (`method.lr=inf`), by its key."""
    if dataclasses.is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    elif isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        return [bad for i, value in enumerate(node) for bad in non_finite(value, f"{path}[{i}]")]
    else:
        bad = isinstance(node, float) and not math.isfinite(node)
        return [f"{path}={node} is not a finite number"] if bad else []
    prefix = f"{path}." if path else ""
    return [bad for key, value in items for bad in non_finite(value, f"{prefix}{key}")]


def _seeds(cfg: RunConfig) -> list[str]:
    seeds = {"seed": cfg.seed, **{f"task.{k}": getattr(cfg.task, k) for k in SEED_KEYS}}
    return [
        f"{key}={value} must lie in [0, 2**32)"
        for key, value in seeds.items()
        if not 0 <= value < SEED_RANGE
    ]


def check_overrides(cfg: RunConfig, overrides: Iterable[str]) -> None:
    """Raise ConfigError for a task key set on the command line (or in `run_config`'s
    overrides) that the model's family does not read, e.g. task.k on OPT: a recipe may set both
    families' keys, but a key the user sets must take effect. (A model whose family is read
    from its checkpoint is checked once the runner knows it.)"""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    family = cfg.model.family
    if family not in FAMILIES:
        return
    ignored = {
        f"task.{key}": other
        for other in FAMILIES
        if other != family
        for key in FAMILY_TASK_KEYS[other]
    }
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    bad = [
        f"{o.input_line} is not used on a {family} model (model {cfg.model.name}), which "
        f"follows {PROTOCOLS[family]}; {o.key_or_group} belongs to "
        f"{PROTOCOLS[ignored[o.key_or_group]]} of {ignored[o.key_or_group]} models"
        for o in parsed
        if o.key_or_group in ignored and not o.is_delete()
    ]
    if bad:
        raise ConfigError("Invalid configuration: " + "; ".join(bad) + ".")


def validate(cfg: RunConfig) -> None:
    """Check values that a schema cannot; raise ConfigError naming the value and the choices.
    Device and logger settings are checked here too, so they fail before a model loads."""
    from lozo_exp.data import file_problem
    from lozo_exp.tracking import device_problems

    t, mo, tr = cfg.task, cfg.model, cfg.trainer
    bad = failing(
        [
            (
                mo.family in FAMILIES,
                f"model.family={mo.family!r} is not one of {choices(FAMILIES)}",
            ),
            (mo.dtype in DTYPES, f"model.dtype={mo.dtype!r} is not one of {choices(DTYPES)}"),
            (
                t.source in DATA_SOURCES,
                f"task.source={t.source!r} is not one of {choices(DATA_SOURCES)}",
            ),
            (t.k >= 1, f"task.k={t.k} must be a positive integer"),
            (t.test_cap >= 1, f"task.test_cap={t.test_cap} must be a positive integer"),
            (
                min(t.num_train, t.num_dev, t.num_eval) >= 1,
                "task.num_train, task.num_dev and task.num_eval must be positive",
            ),
            (
                (tr.max_steps is None) != (tr.epochs is None),
                f"set exactly one of trainer.max_steps and trainer.epochs (got "
                f"{tr.max_steps} and {tr.epochs}; e.g. trainer.epochs=null trainer.max_steps=100)",
            ),
            (
                tr.max_steps is None or tr.max_steps >= 0,
                f"trainer.max_steps={tr.max_steps} must be >= 0",
            ),
            (
                tr.epochs is None or tr.epochs >= 1,
                f"trainer.epochs={tr.epochs} must be a positive integer",
            ),
            (
                tr.eval_steps is None or tr.eval_steps >= 1,
                f"trainer.eval_steps={tr.eval_steps} must be a positive integer (null: each epoch)",
            ),
            (tr.log_steps >= 1, f"trainer.log_steps={tr.log_steps} must be a positive integer"),
            (tr.eval_batch_size >= 1, f"trainer.eval_batch_size={tr.eval_batch_size} must be >= 1"),
            (
                tr.lr_schedule in LR_SCHEDULES,
                f"trainer.lr_schedule={tr.lr_schedule!r} is not one of {choices(LR_SCHEDULES)}",
            ),
            (
                tr.select_by in SELECT_BY,
                f"trainer.select_by={tr.select_by!r} is not one of {choices(SELECT_BY)}",
            ),
            (tr.amp in AMP, f"trainer.amp={tr.amp!r} is not one of {choices(AMP)}"),
            (
                tr.max_grad_norm is None or tr.max_grad_norm > 0,
                f"trainer.max_grad_norm={tr.max_grad_norm} must be > 0 (or null: no clipping)",
            ),
            (
                tr.checkpoint_steps is None or tr.checkpoint_steps >= 1,
                f"trainer.checkpoint_steps={tr.checkpoint_steps} must be a positive integer (or "
                f"null: not by steps)",
            ),
            (
                tr.checkpoint_minutes is None or tr.checkpoint_minutes > 0,
                f"trainer.checkpoint_minutes={tr.checkpoint_minutes} must be > 0 (or null: not "
                f"by time)",
            ),
            (
                tr.progress_every_s >= 0,
                f"trainer.progress_every_s={tr.progress_every_s} must be >= 0 (0: a line per step)",
            ),
            (mo.max_length >= 8, f"model.max_length={mo.max_length} is too small (>= 8)"),
            (
                t.data_dir is None or mo.family != "causal",
                f"task.data_dir={t.data_dir} is not used on a causal model: it names an LM-BFF "
                f"k-shot split directory (masked models)",
            ),
        ]
    )
    if infinite := non_finite(cfg):  # range checks of an inf or nan would only repeat it
        raise ConfigError("Invalid configuration: " + "; ".join(infinite) + ".")
    bad += _seeds(cfg)
    bad += _method_fit(cfg)
    bad += cfg.method.check(cfg)
    bad += cfg.logger.check()
    for split, path in vars(t.data_files).items():
        if path is not None and (problem := file_problem(Path(path).expanduser())):
            bad.append(f"task.data_files.{split}: {problem}")
    bad += device_problems(tr.device)
    if bad:
        raise ConfigError("Invalid configuration: " + "; ".join(bad) + ".")
