"""Two-point (SPSA) zeroth-order optimizers: the shared step and MeZO.

A step perturbs the weights in place along a random direction d, evaluates the loss at θ+εd
and θ−εd, restores θ and moves along d scaled by the slope g = (loss1 − loss2) / 2ε (the
contract an estimator offers whatever runs its steps: `lozo_exp.optim.estimator`). The
direction is never stored: every draw is a pure function of (seed, step, tensor index, kind),
so the update regenerates exactly the perturbation's draws (the published LOZO code does not on
V-refresh steps), memory stays at one direction-sized temporary per tensor, and the global RNG
is never touched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from lozo_exp.optim import kernels
from lozo_exp.optim.estimator import Entry, Factors, Finish, Placement, StepEngine, add_direction

Draw = tuple[Tensor, tuple[int, ...], int, str]
"""A keyed draw: (tensor whose dtype and device it takes, shape, tensor index, kind)."""

E = TypeVar("E", bound=StepEngine | None)

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


def require(ok: bool, name: str, value: object, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


class ZeroOrderOptimizer(Optimizer):
    """Two-point SPSA step shared by all estimators; implements `Estimator`, the contract with
    whatever runs the steps (this class's plain in-place path, or an engine set by
    ``use_engine``).

    A new estimator subclasses this and overrides ``draw`` (its direction distribution, from
    keyed draws: ``randn`` or `draw_key`); ``prepare_update`` for a step direction D other than
    g·d; ``low_rank`` (with ``v_id``) when matrices move along (U, V) factors. `Estimator`
    (lozo_exp/optim/estimator.py) says what each must guarantee.
    """

    low_rank = False

    def __init__(
        self, params: Params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0
    ) -> None:
        require(eps > 0, "eps", eps, "> 0")
        require(isinstance(seed, int), "seed", seed, "an int")
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
        # Runs the steps when set (``use_engine``); None: the plain path.
        self.engine: StepEngine | None = None

    def use_engine(self, engine: E) -> E:
        """Run this optimizer's steps with ``engine`` (``engine.step(closure)``; None: the plain
        path); returns it."""
        self.engine = engine
        return engine

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **param_group}
        require(group["lr"] >= 0, "lr", group["lr"], ">= 0")
        require(group["weight_decay"] >= 0, "weight_decay", group["weight_decay"], ">= 0")
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

    def replay_step(self, loss1: float, loss2: float, placement: Placement | None = None) -> None:
        """Take again a step that was taken with these losses (``last_losses``) and, on an engine
        that chooses it per step, this ``last_placement``: the same weight passes run, the
        closure returning the logged losses, so weights and state come out bit-identical to the
        step's (nothing is evaluated). A run's weights are its base weights and its steps' log."""
        if self.engine is not None:
            self.engine.replay_placement(placement)
        elif placement is not None and (placement.at_plus or placement.at_minus):
            raise ValueError(f"the plain path moves every tensor in place: {placement} is not")
        losses = iter((loss1, loss2))
        self.step(lambda: next(losses))

    def last_placement(self) -> Placement | None:
        """Where the engine moved matrices in place by its own choice in the last step (None:
        nothing is chosen per step); ``replay_step`` needs it."""
        return None if self.engine is None else self.engine.last_placement()

    def _plain_step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        """The reference path: perturb, evaluate, perturb, evaluate, restore, update, in place,
        one tensor at a time (one direction-sized temporary)."""
        self._perturb(self.eps)
        loss1 = closure()
        self._perturb(-2 * self.eps)
        loss2 = closure()
        self._perturb(self.eps)
        g = self.slope(loss1, loss2)
        if g is not None:
            self._update(g)
        return loss1

    def _perturb(self, scale: float) -> None:
        """θ += scale·d for every tensor."""
        for i, _, p in self.indexed_params():
            add_direction(p, self._draw_one(i, p), scale)

    def _update(self, g: float) -> None:
        """θ ← β·θ − lr·D with each param group's lr and β = 1 − lr·wd."""
        for i, group, p in self.indexed_params():
            (direction,), finish = self.prepare_update([(i, p)], [self._draw_one(i, p)])
            finish(g)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            add_direction(p, direction, -group["lr"])

    def _draw_one(self, index: int, p: Tensor) -> Factors:
        return self.draw([(index, p)], self.step_count)[0]

    # -- the contract with a runner (`Estimator`) -------------------------------------------

    def indexed_params(self) -> list[tuple[int, dict[str, Any], Tensor]]:
        """Every tensor with its index and param group, in a fixed order."""
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        return [(i, group, p) for i, (group, p) in enumerate(params)]

    def draw(self, entries: list[Entry], step: int) -> list[Factors]:
        """The direction factors of each (index, tensor) at ``step``: pure functions of their
        keys. Drawn together, so that on CUDA a few launches make the draws of all tensors."""
        raise NotImplementedError(f"{type(self).__name__} must define draw(entries, step)")

    def draw_id(self, step: int) -> Hashable:
        """What the draws of ``step`` are a function of (a subclass adds its settings)."""
        return (self.seed, step)

    def v_id(self, step: int) -> Hashable:
        """What every matrix's V at ``step`` is a function of: by default, the step's draws."""
        return self.draw_id(step)

    def normal_keys(self, entries: list[Entry], step: int) -> list[int] | None:
        """None: the directions are not promised to be ``kernels.normal`` draws (MeZO's are)."""
        return None

    def prepare_update(
        self, entries: list[Entry], factors: list[Factors]
    ) -> tuple[list[Factors], Finish]:
        """Plain ZO-SGD: D = g·d; ``finish(g)`` scales the drawn factors in place (one
        multi-tensor launch for a step's hundreds of tensors)."""
        scaled = [a for a, _ in factors]

        def finish(g: float) -> None:
            if scaled:
                torch._foreach_mul_(scaled, g)

        return factors, finish

    def slope(self, loss1: Tensor | float, loss2: Tensor | float) -> float | None:
        """Record the losses and g = (loss1 − loss2) / 2ε; None when g is not finite (a NaN or
        inf loss must not poison the weights)."""
        self.last_losses = (float(loss1), float(loss2))
        self.projected_grad = (self.last_losses[0] - self.last_losses[1]) / (2 * self.eps)
        return self.projected_grad if math.isfinite(self.projected_grad) else None

    # -- for subclasses ---------------------------------------------------------------------

    def randn(self, draws: list[Draw], step: int) -> list[Tensor]:
        """N(0, 1) draws in each tensor's dtype and device, keyed by (seed, step, index, kind).

        Where the Triton kernels run (CUDA; the CPU under Triton's interpreter) they are Triton's
        Philox (so a fused pass can regenerate them), made in one launch per dtype; elsewhere one
        generator per device is re-seeded per draw: the same as a fresh per-tensor generator,
        without allocating one each time. ``kind`` is "z", "U" or "V": a tensor's draws of
        different kinds are unrelated.
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

    def draw(self, entries: list[Entry], step: int) -> list[Factors]:
        zs = self.randn([(p, tuple(p.shape), i, "z") for i, p in entries], step)
        return [(z, None) for z in zs]

    def normal_keys(self, entries: list[Entry], step: int) -> list[int] | None:
        """z is the keyed draw `randn` makes, and D = g·z: a pass can regenerate z from its key.
        Not promised by a subclass that draws or updates differently."""
        if type(self).draw is not MeZO.draw:
            return None
        if type(self).prepare_update is not ZeroOrderOptimizer.prepare_update:
            return None
        return [draw_key(self.seed, step, i, "z") for i, _ in entries]
