"""What a method is: a typed config (its Hydra schema) and a `Method` that builds the trainable
model and the optimizer and takes one training step. Methods are registered by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lozo_exp import distributed
from lozo_exp.adapter import Adapter
from lozo_exp.config import MethodConfig, RunConfig, failing
from lozo_exp.data import Splits

METHODS: dict[str, type[Method]] = {}
"""Every method by name (its schema's `name`), filled by `@register`."""

LossFn = Callable[[], torch.Tensor]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` the method named by its schema's default `name`."""
    name = cls.config.name
    if name in METHODS:
        raise ValueError(f"two methods are named {name!r}: {METHODS[name]} and {cls}")
    METHODS[name] = cls
    return cls


@dataclass
class TrainingConfig(MethodConfig):
    """Keys of every method that trains."""

    lr: float = 1e-6
    batch_size: int = 16
    weight_decay: float = 0.0  # not on biases and LayerNorm weights

    def check(self, run: RunConfig) -> list[str]:
        return super().check(run) + failing(
            [
                (self.lr >= 0, f"method.lr={self.lr} must be >= 0"),
                (self.weight_decay >= 0, f"method.weight_decay={self.weight_decay} must be >= 0"),
                (
                    self.batch_size >= 1,
                    f"method.batch_size={self.batch_size} must be a positive integer",
                ),
            ]
        )


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """HF Trainer's schedules as a pure function of the step (a resumed run needs no scheduler
    state): linear warmup from 0, then constant or linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


class Method:
    """One method of a run: which parameters train, what updates them, and one step.

    Subclasses set `config` (their schema) and register with `@register`; an evaluation-only
    method sets `trains = False` and needs nothing else.
    """

    config: ClassVar[type[MethodConfig]]
    trains: ClassVar[bool] = True
    replayable: ClassVar[bool] = False
    """Whether a logged step can be taken again from its record alone (`replay_step`): a run is
    then its base weights and its step log, and its checkpoints hold no weights."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.cfg: Any = run.method

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Choose the trainable parameters (freeze, wrap with adapters); set train/eval mode."""
        model.train(False)
        return model

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Spread the prepared model over the run's processes (torchrun): by default every
        process keeps the whole model, starting from the main process's weights."""
        distributed.broadcast_module(model)
        return model

    def prepare_adapter(self, adapter: Adapter, splits: Splits) -> None:
        """Set what the method changes in how examples are presented (e.g. ICL's
        `adapter.context_prefix`), once the adapter and the splits exist."""

    def build_optimizer(self, model: nn.Module, seed: int) -> torch.optim.Optimizer | None:
        return None

    def memory_floor(self, n_params: int, bytes_per_param: int) -> tuple[int, str]:
        """Bytes this method keeps on the device for a model of `n_params` parameters stored
        in `bytes_per_param` bytes each, before any activation (a lower bound on its peak
        memory), and what they hold."""
        return n_params * bytes_per_param, "the weights"

    def learning_rate(self, step: int, total_steps: int) -> float:
        return self.cfg.lr * lr_factor(self.run.trainer.lr_schedule, step, total_steps)

    def step(
        self, optimizer: torch.optim.Optimizer, loss_fn: LossFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One training step on the batch `loss_fn` evaluates: its loss and extra values to
        log (e.g. the projected gradient, the gradient norm)."""
        raise NotImplementedError(f"method {self.cfg.name} does not train")

    def step_record(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What the step log keeps of the step just taken, beside its loss and lr, so that
        `replay_step` can take it again (JSON values)."""
        return {}

    def replay_step(self, optimizer: torch.optim.Optimizer, record: dict[str, Any]) -> None:
        """Take the logged step `record` again (its lr already set) without the model."""
        raise NotImplementedError(f"method {self.cfg.name} cannot replay its steps")

    def state_dict(self) -> dict[str, Any]:
        """Step state the method keeps outside the optimizer (e.g. a loss scaler)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
