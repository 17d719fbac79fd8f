"""The contract between a zeroth-order estimator and whatever runs its steps.

A two-point (SPSA) step perturbs the weights θ by ±ε·d along a random direction d, evaluates the
loss at both points, restores θ and moves it: θ ← β·θ − lr·D, with β = 1 − lr·wd (the param
group's lr and weight decay), the slope g = (loss1 − loss2) / 2ε and the estimator's step
direction D (plain ZO-SGD: D = g·d). An estimator says how d is drawn and what D is; a runner
(`ZeroOrderOptimizer`'s plain in-place path, or `FastEngine`) decides where and when the weights
are written. `Estimator` is everything a runner may use; `ZeroOrderOptimizer` implements it, and a
new estimator subclasses that and overrides ``draw`` (and ``prepare_update`` for a D other than
g·d), without reading a runner's code.

Directions are ``Factors``: (z, None) means d = z, full size; (U, V) means d = U·Vᵀ on the tensor's
m×n view (m = its first dimension). ``add_direction`` and ``plan_add_directions`` apply them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from lozo_exp.optim import kernels

Factors = tuple[Tensor, Tensor | None]
"""The direction of one tensor: (z, None) means d = z; (U, V) means d = U·Vᵀ on its m×n view."""

Entry = tuple[int, Tensor]
"""A tensor and its index among the estimator's tensors (``indexed_params``' order)."""

Finish = Callable[[float], None]
"""``finish(g)``: the part of an update that needs the slope g (``Estimator.prepare_update``)."""


@runtime_checkable
class Estimator(Protocol):
    """What a runner of ZO steps may use of an estimator.

    Draws are pure functions of (seed, step, tensor index, settings), never of a global RNG: a
    runner may make a step's draws ahead of time, replay them, or regenerate them inside a
    kernel, and always gets the same numbers.
    """

    eps: float
    """The perturbation size ε."""
    step_count: int
    """The step being taken (the number of steps taken so far)."""
    param_groups: list[dict[str, Any]]
    """torch's param groups; each holds its tensors' ``lr`` and ``weight_decay``."""
    low_rank: bool
    """Whether every tensor with ≥ 2 dims moves along (U, V) factors (and 1-D ones along a full
    z): then a step's draws are small enough to keep through the step, and a runner may add a
    Linear's perturbation to its output instead of writing it into the weight."""

    def indexed_params(self) -> list[tuple[int, dict[str, Any], Tensor]]:
        """Every tensor with its index and param group, in a fixed order."""
        ...

    def draw(self, entries: list[Entry], step: int) -> list[Factors]:
        """The direction factors of each (index, tensor) at ``step``. Drawn together, so that a
        step's hundreds of draws may cost a few kernel launches. Pure: the same arguments give
        the same numbers (a runner may draw the next step's while the GPU is busy)."""
        ...

    def draw_id(self, step: int) -> Hashable:
        """What the draws of ``step`` are a function of, besides the tensors (seed, step,
        settings): a runner may keep draws made ahead under it."""
        ...

    def v_id(self, step: int) -> Hashable:
        """For a ``low_rank`` estimator: what every matrix's V at ``step`` is a function of
        (with the matrix's index and shape); a runner may keep work derived from V under it."""
        ...

    def normal_keys(self, entries: list[Entry], step: int) -> list[int] | None:
        """Keys k such that each tensor's direction at ``step`` is exactly
        ``kernels.normal(shape, k)`` (where the kernels run) and D = g·d, so a pass may
        regenerate d from its key while it moves θ; None when that does not hold."""
        ...

    def prepare_update(
        self, entries: list[Entry], factors: list[Factors]
    ) -> tuple[list[Factors], Finish]:
        """The step direction D of each (index, tensor), given this step's drawn ``factors``, in
        two parts: what g does not change is done now, and the returned ``finish(g)`` writes D
        into the returned tensors and only then updates per-tensor state. So a runner can plan
        the update while the GPU still evaluates the loss, and a skipped step (g not finite)
        changes no state. ``finish`` may scale ``factors`` in place (the update is their last
        use in a step)."""
        ...

    def slope(self, loss1: Tensor | float, loss2: Tensor | float) -> float | None:
        """Record the losses and return g = (loss1 − loss2) / 2ε, or None when it is not finite
        (a NaN or inf loss must not move the weights). Waits for the losses' values."""
        ...


class Placement(NamedTuple):
    """The matrices (by index) a runner moved in place during one step's evaluation at θ+εd
    (``at_plus``) and during the one at θ−εd (``at_minus``), where it chose that per step (beyond
    those it always moves in place). The weights' bits depend on it: a matrix moved in place
    holds θ−εd when the update folds in its restore."""

    at_plus: tuple[int, ...] = ()
    at_minus: tuple[int, ...] = ()


class StepEngine(Protocol):
    """Runs an optimizer's steps (``ZeroOrderOptimizer.use_engine``), e.g. `FastEngine`.

    A step's weight passes must be a function of (the estimator's draws, the losses, the lrs,
    and ``last_placement``), so that a logged step can be replayed without evaluating the model
    (``ZeroOrderOptimizer.replay_step``) into bit-identical weights."""

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        """One step under ``torch.no_grad``; returns loss1, the loss at θ+εd."""
        ...

    def last_placement(self) -> Placement | None:
        """Where the last step moved matrices in place by its own choice; None when it chooses
        nothing per step."""
        ...

    def replay_placement(self, placement: Placement | None) -> None:
        """Take the next step with ``placement`` instead of choosing it during the evaluations
        (that step is a logged one replayed: its closure does not evaluate the model)."""
        ...


def add_direction(p: Tensor, factors: Factors, alpha: float, beta: float = 1.0) -> None:
    """p ← β·p + α·d in one in-place pass; a low-rank d = U·Vᵀ is not materialised for
    contiguous p."""
    a, b = factors
    if b is None:
        if beta != 1.0:
            p.mul_(beta)
        p.add_(a, alpha=alpha)
    elif p.is_contiguous():
        kernels.lowrank_add_(p.view(a.size(0), -1), a, b, alpha, beta)
    else:
        p.mul_(beta).add_((a @ b.T).view(p.shape), alpha=alpha)


def plan_add_directions(
    ps: list[Tensor], factors: list[Factors], alphas: list[float], betas: list[float]
) -> Callable[[], None]:
    """``add_direction`` for many tensors, returned as a function that applies them (the factors
    are read then, not now); the low-rank ones of one dtype, device and rank go through one
    kernel launch, planned now."""
    groups: dict[tuple, tuple[list, list, list, list]] = {}
    singles = []
    for p, (a, b), alpha, beta in zip(ps, factors, alphas, betas, strict=True):
        if b is None or not p.is_contiguous():
            singles.append((p, (a, b), alpha, beta))
            continue
        group = groups.setdefault((p.dtype, p.device, a.size(1)), ([], [], [], []))
        w = p if p.dim() == 2 else p.view(a.size(0), -1)
        for items, x in zip(group, (w, (a, b), alpha, beta), strict=True):
            items.append(x)
    launches = [kernels.plan_lowrank_add_many(*group) for group in groups.values()]

    def apply() -> None:
        for single in singles:
            add_direction(*single)
        for launch in launches:
            launch()

    return apply
