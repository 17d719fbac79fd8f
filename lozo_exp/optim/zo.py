"""Two-point (SPSA) zeroth-order optimizers: the shared step and MeZO.

A step perturbs the weights in place along a random direction d, evaluates the loss at θ+εd
and θ−εd, restores θ and moves along d scaled by the slope g = (loss1 − loss2) / 2ε. The
direction is never stored: every draw is a pure function of (seed, step, tensor index, kind),
so the update regenerates exactly the perturbation's draws (the published LOZO code does not on
V-refresh steps), memory stays at one direction-sized temporary per tensor, and the global RNG
is never touched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lozo_exp.optim import kernels

Factors = tuple[Tensor, Tensor | None]
"""Direction of one tensor: (z, None) means d = z; (U, V) means d = U·Vᵀ on its m×n view."""

Draw = tuple[Tensor, tuple[int, ...], int, str]
"""A keyed draw: (tensor whose dtype and device it takes, shape, tensor index, kind)."""

Params = Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]]

NO_DECAY = ("bias", "layer_norm", "layernorm")
_KINDS = {"z": 1, "U": 2, "V": 3}
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=64)
def _step_key(seed: int, step: int) -> int:
    """The hash of (seed, step), shared by every draw of a step (hundreds of tensors)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def draw_key(seed: int, step: int, index: int, kind: str) -> int:
    """64-bit generator seed; neighbouring (seed, step, index) tuples give unrelated streams."""
    h = _splitmix64(_step_key(seed, step) ^ (index & _MASK64))
    return _splitmix64(h ^ _KINDS[kind])


def default_param_groups(
    named_params: Iterable[tuple[str, Tensor]], weight_decay: float
) -> list[dict[str, Any]]:
    """Trainable params split into a decayed group and a no-decay group (bias / LayerNorm).

    Names are matched case-insensitively so HF RoBERTa's ``LayerNorm.weight`` is caught too.
    """
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _require(ok: bool, name: str, value: object, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


class ZeroOrderOptimizer(Optimizer):
    """Two-point SPSA step shared by all estimators.

    Subclasses define the direction through two hooks: ``_factors`` (draw this step's direction
    factors of tensors) and ``_prepare_update`` (the step direction D of the update
    θ ← θ − lr·(D + wd·θ); default D = g·d). Applying factors is separate (``_add_direction``,
    ``_perturb``) so a fast engine can evaluate the perturbation as a side path instead.
    """

    def __init__(
        self, params: Params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0
    ) -> None:
        _require(eps > 0, "eps", eps, "> 0")
        _require(isinstance(seed, int), "seed", seed, "an int")
        params = list(params)
        if params and isinstance(params[0], tuple):
            params = default_param_groups(params, weight_decay)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.eps = eps
        self.seed = seed
        self.step_count = 0
        self.projected_grad: float | None = None
        self.last_losses: tuple[float, float] | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        # This step's drawn factors, kept by an engine that reuses them (None: draw on demand).
        self._draws: dict[int, Factors] | None = None
        # Runs the steps when set (``use_engine``); None: the plain path.
        self.engine: Any = None

    def use_engine(self, engine: Any) -> Any:
        """Run this optimizer's steps with ``engine`` (``engine.step(closure)``); returns it."""
        self.engine = engine
        return engine

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        _require(group["lr"] >= 0, "lr", group["lr"], ">= 0")
        _require(group["weight_decay"] >= 0, "weight_decay", group["weight_decay"], ">= 0")
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Tensor | float] | None = None) -> Tensor | float:
        """One SPSA step. ``closure`` returns the loss at the current weights (no backward).

        Returns loss1, the loss at θ+εd (what the published code logs as training loss).
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        with torch.no_grad():
            run = self._plain_step if self.engine is None else self.engine.step
            loss1 = run(closure)
        self.step_count += 1
        return loss1

    def _plain_step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        """The reference path: perturb, evaluate, perturb, evaluate, restore, update, in place."""
        self._perturb(self.eps)
        loss1 = closure()
        self._perturb(-2 * self.eps)
        loss2 = closure()
        self._perturb(self.eps)
        g = self._slope(loss1, loss2)
        if g is not None:
            self._update(g)
        return loss1

    def _slope(self, loss1: Tensor | float, loss2: Tensor | float) -> float | None:
        """Record the losses and g = (loss1 − loss2) / 2ε; None when g is not finite (a NaN or
        inf loss must not poison the weights)."""
        self.last_losses = (float(loss1), float(loss2))
        self.projected_grad = (self.last_losses[0] - self.last_losses[1]) / (2 * self.eps)
        return self.projected_grad if math.isfinite(self.projected_grad) else None

    # -- hooks ------------------------------------------------------------------------------

    def _factors(self, entries: list[tuple[int, Tensor]], step: int) -> list[Factors]:
        """The direction factors of each (index, tensor) at ``step``; pure functions of the keys
        (so an engine may draw the next step's while the GPU is busy). Drawn together, so that
        on CUDA a few launches make the draws of all tensors."""
        raise NotImplementedError

    def _prepare_update(
        self, entries: list[tuple[int, Tensor]]
    ) -> tuple[list[Factors], Callable[[float], None]]:
        """The step direction D of the update of each (index, tensor) (plain ZO-SGD: g·d), in two
        parts: what g does not change is done now, and the returned ``finish(g)`` writes D into
        the returned tensors and updates per-param state. So an engine can plan the update while
        the GPU still evaluates the loss, and a skipped step (g not finite) changes no state.
        Batched: a step's hundreds of tensors cost a few launches.

        ``finish`` may scale the drawn factors in place: the update is their last use in a step.
        """
        directions = [self._direction(i, p) for i, p in entries]
        scaled = [a for a, _ in directions]

        def finish(g: float) -> None:
            if scaled:
                torch._foreach_mul_(scaled, g)

        return directions, finish

    def _perturb(self, scale: float) -> None:
        """θ += scale·d for every tensor (override to perturb on a side path instead)."""
        for i, _, p in self._indexed_params():
            self._add_direction(p, *self._direction(i, p), scale)

    def _update(self, g: float) -> None:
        """θ ← θ − lr·(D + wd·θ) with each param group's lr and weight decay; one tensor at a
        time, so one direction-sized temporary."""
        for i, group, p in self._indexed_params():
            ((a, b),), finish = self._prepare_update([(i, p)])
            finish(g)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            self._add_direction(p, a, b, -group["lr"])

    # -- helpers ----------------------------------------------------------------------------

    def _direction(self, index: int, p: Tensor) -> Factors:
        """This step's factors of tensor ``index``: the engine's kept draw, or a fresh one."""
        if self._draws is None:
            return self._factors([(index, p)], self.step_count)[0]
        if index not in self._draws:
            self._draws[index] = self._factors([(index, p)], self.step_count)[0]
        return self._draws[index]

    @staticmethod
    def _add_direction(
        p: Tensor, a: Tensor, b: Tensor | None, alpha: float, beta: float = 1.0
    ) -> None:
        """p ← beta·p + alpha·d in one in-place pass; a low-rank d = a·bᵀ is not materialised
        for contiguous p."""
        if b is None:
            if beta != 1.0:
                p.mul_(beta)
            p.add_(a, alpha=alpha)
        elif p.is_contiguous():
            kernels.lowrank_add_(p.view(a.size(0), -1), a, b, alpha, beta)
        else:
            p.mul_(beta).add_((a @ b.T).view(p.shape), alpha=alpha)

    @staticmethod
    def _plan_add_directions(
        ps: list[Tensor], factors: list[Factors], alphas: list[float], betas: list[float]
    ) -> Callable[[], None]:
        """``_add_direction`` for many tensors, returned as a function that applies them (the
        factors are read then, not now); the low-rank ones of one dtype, device and rank go
        through one kernel launch, planned now."""
        groups: dict[tuple, tuple[list, list, list, list]] = {}
        singles = []
        for p, (a, b), alpha, beta in zip(ps, factors, alphas, betas, strict=True):
            if b is None or not p.is_contiguous():
                singles.append((p, a, b, alpha, beta))
                continue
            group = groups.setdefault((p.dtype, p.device, a.size(1)), ([], [], [], []))
            w = p if p.dim() == 2 else p.view(a.size(0), -1)
            for items, x in zip(group, (w, (a, b), alpha, beta), strict=True):
                items.append(x)
        launches = [kernels.plan_lowrank_add_many(*group) for group in groups.values()]

        def apply() -> None:
            for single in singles:
                ZeroOrderOptimizer._add_direction(*single)
            for launch in launches:
                launch()

        return apply

    def _indexed_params(self) -> Iterator[tuple[int, dict[str, Any], Tensor]]:
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    def _randn(self, draws: list[Draw], step: int) -> list[Tensor]:
        """N(0, 1) draws in each tensor's dtype and device, keyed by (seed, step, index, kind).

        On CUDA with Triton they are Triton's Philox (so a fused pass can regenerate them), made
        in one launch per dtype; elsewhere one generator per device is re-seeded per draw: the
        same as a fresh per-tensor generator, without allocating one each time.
        """
        out: list[Tensor | None] = [None] * len(draws)
        batches: dict[tuple[torch.dtype, torch.device], list[tuple[int, int]]] = {}
        for k, (p, shape, index, kind) in enumerate(draws):
            key = draw_key(self.seed, step, index, kind)
            if kernels.available(p.device):
                batches.setdefault((p.dtype, p.device), []).append((k, key))
                continue
            gen = self._generators.get(p.device)
            if gen is None:
                gen = self._generators[p.device] = torch.Generator(p.device)
            gen.manual_seed(key)
            out[k] = torch.randn(shape, generator=gen, dtype=p.dtype, device=p.device)
        for (dtype, device), batch in batches.items():
            shapes = [draws[k][1] for k, _ in batch]
            keys = [key for _, key in batch]
            if len(batch) == 1:  # the plain path's one-at-a-time draws: no tables to send
                out[batch[0][0]] = kernels.normal(shapes[0], keys[0], dtype, device)
                continue
            zs = kernels.normal_many(shapes, keys, dtype, device)
            for (k, _), z in zip(batch, zs, strict=True):
                out[k] = z
        return out  # type: ignore[return-value]

    def _key(self, index: int, kind: str) -> int:
        """The key of this step's draw ``kind`` of tensor ``index``."""
        return draw_key(self.seed, self.step_count, index, kind)

    # -- exact resume -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo"] = {"step": self.step_count, "seed": self.seed}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo")
        super().load_state_dict(state_dict)
        self.step_count, self.seed = zo["step"], zo["seed"]


class MeZO(ZeroOrderOptimizer):
    """ZO-SGD with a full Gaussian direction z per tensor (Malladi et al., 2023)."""

    def _factors(self, entries: list[tuple[int, Tensor]], step: int) -> list[Factors]:
        zs = self._randn([(p, tuple(p.shape), i, "z") for i, p in entries], step)
        return [(z, None) for z in zs]
