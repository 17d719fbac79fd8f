"""Zeroth-order methods: MeZO, LOZO, LOZO-M (`lozo_exp.optim`) and MeZO-LoRA.

Forwards run in eval mode (dropout off) without autograd; the fast engine runs the steps unless
`method.engine=plain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lozo_exp import distributed
from lozo_exp.config import RunConfig, choices, failing
from lozo_exp.methods.base import LossFn, Method, TrainingConfig, register
from lozo_exp.methods.lora import LoRAConfig, LoRAMethod
from lozo_exp.optim import (
    LOZO,
    LOZOM,
    FastEngine,
    MeZO,
    Placement,
    ZeroOrderOptimizer,
    default_param_groups,
)

ENGINES = ("fast", "plain")


@dataclass
class MeZOConfig(TrainingConfig):
    name: str = "mezo"
    gradient_free: ClassVar[bool] = True
    eps: float = 1e-3  # perturbation scale
    # "fast" (side path / fused passes, lozo_exp.optim.engine) or "plain" (the in-place
    # reference path); both compute the same losses and updates.
    engine: str = "fast"

    def check(self, run: RunConfig) -> list[str]:
        return super().check(run) + failing(
            [
                (self.eps > 0, f"method.eps={self.eps} must be > 0"),
                (
                    self.engine in ENGINES,
                    f"method.engine={self.engine!r} is not one of {choices(ENGINES)}",
                ),
            ]
        )


@dataclass
class LOZOConfig(MeZOConfig):
    name: str = "lozo"
    rank: int = 2  # r of the perturbation U V^T
    interval: int = 50  # ν: steps between V refreshes

    def check(self, run: RunConfig) -> list[str]:
        return super().check(run) + failing(
            [
                (self.rank >= 1, f"method.rank={self.rank} must be a positive integer"),
                (
                    self.interval >= 1,
                    f"method.interval={self.interval} must be a positive integer",
                ),
            ]
        )


@dataclass
class LOZOMConfig(LOZOConfig):
    name: str = "lozo-m"
    beta: float = 0.9  # momentum, kept in the low-rank factor space

    def check(self, run: RunConfig) -> list[str]:
        return super().check(run) + failing(
            [(0 <= self.beta < 1, f"method.beta={self.beta} must lie in [0, 1)")]
        )


@dataclass
class MeZOLoRAConfig(LoRAConfig, MeZOConfig):
    name: str = "mezo-lora"


@register
class MeZOMethod(Method):
    config = MeZOConfig
    replayable = True  # a step is its two losses, its lr and (fast engine) its placement

    def __init__(self, run: RunConfig):
        super().__init__(run)
        self.placement: Placement | None = None  # the last step's, logged where it changes

    def common(self, seed: int) -> dict[str, Any]:
        """The arguments every zeroth-order optimizer takes."""
        c = self.cfg
        return dict(lr=c.lr, eps=c.eps, weight_decay=c.weight_decay, seed=seed)

    def make_optimizer(self, groups: list[dict[str, Any]], seed: int) -> ZeroOrderOptimizer:
        return MeZO(groups, **self.common(seed))

    def build_optimizer(self, model: nn.Module, seed: int) -> ZeroOrderOptimizer:
        groups = default_param_groups(model.named_parameters(), self.cfg.weight_decay)
        opt = self.make_optimizer(groups, seed)
        if self.cfg.engine == "fast":
            # "auto" places a perturbation by the tokens of this process's shard; across
            # processes every one must write the same weights, so it stays on the side path.
            placement = "side" if distributed.world_size() > 1 else "auto"
            opt.use_engine(FastEngine(opt, model, placement))
        return opt

    def step(
        self, optimizer: ZeroOrderOptimizer, loss_fn: LossFn
    ) -> tuple[torch.Tensor, dict[str, float]]:
        def closure() -> torch.Tensor:
            with torch.inference_mode():
                return loss_fn()

        loss = optimizer.step(closure)
        return loss, {"projected_grad": optimizer.projected_grad}

    def step_record(self, optimizer: ZeroOrderOptimizer) -> dict[str, Any]:
        """The second loss (the first is the step's logged loss; g is recomputed from both
        bit-identically) and, where it changed, the matrices the engine moved in place."""
        record: dict[str, Any] = {"loss2": optimizer.last_losses[1]}
        placement = optimizer.last_placement()
        if placement != self.placement:
            record["in_place"] = None if placement is None else [list(x) for x in placement]
            self.placement = placement
        return record

    def replay_step(self, optimizer: ZeroOrderOptimizer, record: dict[str, Any]) -> None:
        if "in_place" in record:
            in_place = record["in_place"]
            self.placement = None if in_place is None else Placement(*map(tuple, in_place))
        optimizer.replay_step(record["loss"], record["loss2"], self.placement)


@register
class LOZOMethod(MeZOMethod):
    config = LOZOConfig

    def make_optimizer(self, groups: list[dict[str, Any]], seed: int) -> ZeroOrderOptimizer:
        return LOZO(groups, rank=self.cfg.rank, interval=self.cfg.interval, **self.common(seed))


@register
class LOZOMMethod(MeZOMethod):
    config = LOZOMConfig

    def make_optimizer(self, groups: list[dict[str, Any]], seed: int) -> ZeroOrderOptimizer:
        c = self.cfg
        return LOZOM(groups, rank=c.rank, interval=c.interval, beta=c.beta, **self.common(seed))


@register
class MeZOLoRAMethod(LoRAMethod, MeZOMethod):
    config = MeZOLoRAConfig
