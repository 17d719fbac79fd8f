"""Typed config schemas, registered in Hydra's ConfigStore.

Every YAML under `conf/` is merged onto these dataclasses, so an unknown key or a value of the
wrong type fails when Hydra composes the config, before anything is loaded. `validate` then
checks values (ranges, combinations) and raises `ConfigError` with one readable paragraph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

FAMILIES = ("causal", "masked")
DTYPES = ("float32", "float16", "bfloat16", "float64")
ZO_METHODS = ("mezo", "mezo-lora", "lozo", "lozo-m")
ENGINES = ("fast", "plain")
TRAIN_METHODS = (*ZO_METHODS, "ft", "ft-lora")
EVAL_METHODS = ("zero-shot", "icl")
METHODS = (*TRAIN_METHODS, *EVAL_METHODS)
DATA_SOURCES = ("hub", "sample")
LR_SCHEDULES = ("constant", "linear")


class ConfigError(ValueError):
    """A bad setting, reported as one paragraph before any expensive work starts."""


@dataclass
class ModelConfig:
    name: str = MISSING
    hub_id: str | None = None  # checkpoint on the hub or a local directory; None: tiny models
    family: str = MISSING  # "causal" (OPT) or "masked" (RoBERTa): selects the adapter
    dtype: str = "float32"
    random_init: bool = False  # build from the architecture config with random weights
    # Architecture used when the hub config cannot be read offline (and by the tiny models).
    arch: dict[str, Any] = field(default_factory=dict)
    max_length: int = 2048
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


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
    name: str = MISSING
    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    rank: int = 2  # LOZO rank r
    interval: int = 50  # LOZO step interval ν between V refreshes
    beta: float = 0.9  # LOZO-M momentum
    lora_r: int = 8
    lora_alpha: int = 16
    batch_size: int = 16
    num_demos: int = 32  # ICL: demonstrations taken from the training sample
    # ZO step engine: "fast" (side path / fused passes, lozo_exp.optim.engine) or "plain"
    # (in-place reference path); both compute the same losses and updates.
    engine: str = "fast"


@dataclass
class TrainerConfig:
    max_steps: int = 20000
    eval_steps: int = 4000
    log_steps: int = 10
    eval_batch_size: int = 8
    progress_every_s: float = 30.0  # at most one progress line per this many seconds
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    # "constant" (the ZO scripts) or "linear" decay to 0 over max_steps (HF Trainer's default,
    # which the published FT scripts use).
    lr_schedule: str = "constant"


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "lozo-exp"
    mode: str = "offline"  # wandb mode: offline unless the user says online


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(values)


def validate(cfg: RunConfig) -> None:
    """Check values that a schema cannot; raise ConfigError naming the value and the choices."""
    m, t, mo, tr = cfg.method, cfg.task, cfg.model, cfg.trainer
    checks: list[tuple[bool, str]] = [
        (mo.family in FAMILIES, f"model.family={mo.family!r} is not one of {_choices(FAMILIES)}"),
        (mo.dtype in DTYPES, f"model.dtype={mo.dtype!r} is not one of {_choices(DTYPES)}"),
        (m.name in METHODS, f"method.name={m.name!r} is not one of {_choices(METHODS)}"),
        (m.lr >= 0, f"method.lr={m.lr} must be >= 0"),
        (m.eps > 0, f"method.eps={m.eps} must be > 0"),
        (m.weight_decay >= 0, f"method.weight_decay={m.weight_decay} must be >= 0"),
        (m.rank >= 1, f"method.rank={m.rank} must be a positive integer"),
        (m.interval >= 1, f"method.interval={m.interval} must be a positive integer"),
        (0 <= m.beta < 1, f"method.beta={m.beta} must lie in [0, 1)"),
        (m.engine in ENGINES, f"method.engine={m.engine!r} is not one of {_choices(ENGINES)}"),
        (m.batch_size >= 1, f"method.batch_size={m.batch_size} must be a positive integer"),
        (m.lora_r >= 1, f"method.lora_r={m.lora_r} must be a positive integer"),
        (m.num_demos >= 0, f"method.num_demos={m.num_demos} must be >= 0"),
        (
            m.name != "icl" or mo.family == "causal",
            f"method.name=icl (in-context learning) needs a causal model; model.family is "
            f"{mo.family!r}",
        ),
        (
            not t.non_diff or (m.name in ZO_METHODS and mo.family == "causal"),
            f"task.non_diff=true (loss = -F1 of greedy generations, which has no gradient) "
            f"needs a zeroth-order method on a causal model ({_choices(ZO_METHODS)}); got "
            f"method.name={m.name!r} with model.family={mo.family!r}",
        ),
        (
            t.source in DATA_SOURCES,
            f"task.source={t.source!r} is not one of {_choices(DATA_SOURCES)}",
        ),
        (t.k >= 1, f"task.k={t.k} must be a positive integer"),
        (t.test_cap >= 1, f"task.test_cap={t.test_cap} must be a positive integer"),
        (
            min(t.num_train, t.num_dev, t.num_eval) >= 1,
            "task.num_train, task.num_dev and task.num_eval must be positive",
        ),
        (tr.max_steps >= 0, f"trainer.max_steps={tr.max_steps} must be >= 0"),
        (tr.eval_steps >= 1, f"trainer.eval_steps={tr.eval_steps} must be a positive integer"),
        (tr.log_steps >= 1, f"trainer.log_steps={tr.log_steps} must be a positive integer"),
        (tr.eval_batch_size >= 1, f"trainer.eval_batch_size={tr.eval_batch_size} must be >= 1"),
        (
            tr.lr_schedule in LR_SCHEDULES,
            f"trainer.lr_schedule={tr.lr_schedule!r} is not one of {_choices(LR_SCHEDULES)}",
        ),
        (mo.max_length >= 8, f"model.max_length={mo.max_length} is too small (>= 8)"),
    ]
    bad = [msg for ok, msg in checks if not ok]
    for split, path in vars(t.data_files).items():
        if path is not None and not Path(path).expanduser().is_file():
            bad.append(f"task.data_files.{split}={path!r} does not exist")
    if bad:
        raise ConfigError("Invalid configuration: " + "; ".join(bad) + ".")
