"""LOZO and LOZO-M: zeroth-order steps along low-rank directions U·Vᵀ (Chen et al., 2024)."""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from lozo_exp.optim.estimator import Entry, Factors, Finish
from lozo_exp.optim.zo import Params, ZeroOrderOptimizer, require


class LOZO(ZeroOrderOptimizer):
    """Each matrix W (viewed as m×n) moves along U·Vᵀ: U ∈ R^{m×r} fresh every step, V ∈ R^{n×r}
    redrawn every ``interval`` steps, so consecutive steps explore one rank-r row space.
    1-D tensors get MeZO's full Gaussian z.
    """

    low_rank = True

    def __init__(
        self,
        params: Params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        rank: int = 2,
        interval: int = 50,
        seed: int = 0,
    ) -> None:
        require(isinstance(rank, int) and rank >= 1, "rank", rank, "an int >= 1")
        require(isinstance(interval, int) and interval >= 1, "interval", interval, "an int >= 1")
        super().__init__(params, lr, eps, weight_decay, seed)
        self.rank = rank
        self.interval = interval

    def _start(self, step: int) -> int:
        """The first step of ``step``'s interval: V is drawn keyed by it."""
        return step - step % self.interval

    def draw_id(self, step: int) -> Hashable:
        return (self.seed, step, self.rank, self.interval)

    def v_id(self, step: int) -> Hashable:
        """V is drawn once per interval, keyed by its first step."""
        return (self.seed, self.rank, self._start(step))

    def draw(self, entries: list[Entry], step: int) -> list[Factors]:
        draws = [
            (p, tuple(p.shape), i, "z") if p.dim() < 2 else (p, (p.size(0), self.rank), i, "U")
            for i, p in entries
        ]
        vs = self._vs([(i, p) for i, p in entries if p.dim() >= 2], step)
        zs = self.randn(draws, step)
        return [(d, vs.get(i)) for (i, _), d in zip(entries, zs, strict=True)]

    def _vs(self, matrices: list[Entry], step: int) -> dict[int, Tensor]:
        """The V of each matrix at ``step``: the one the last update stored if it belongs to the
        same interval, else a draw keyed by the interval's first step (the same numbers)."""
        start = self._start(step)
        vs = {i: self.state[p]["V"] for i, p in matrices if self.state[p].get("V_start") == start}
        new = [(i, p) for i, p in matrices if i not in vs]
        draws = [(p, (p.numel() // p.size(0), self.rank), i, "V") for i, p in new]
        vs.update(zip((i for i, _ in new), self.randn(draws, start), strict=True))
        return vs

    def prepare_update(
        self, entries: list[Entry], factors: list[Factors]
    ) -> tuple[list[Factors], Finish]:
        directions, scale = super().prepare_update(entries, factors)

        def finish(g: float) -> None:
            scale(g)
            self._store_vs(entries, directions)

        return directions, finish

    def _store_vs(self, entries: list[Entry], directions: list[Factors]) -> None:
        """Keep each matrix's V with its interval's first step: the next steps of the interval
        reuse it, and LOZO-M carries its momentum from it into the next interval's V."""
        start = self._start(self.step_count)
        for (_, p), (_, v) in zip(entries, directions, strict=True):
            if v is not None:
                self.state[p].update(V=v, V_start=start)


class LOZOM(LOZO):
    """LOZO with momentum kept in factor space: N ∈ R^{m×r} per matrix, so the buffer costs
    r/n of a full one; at a V refresh N is carried into the new row space via V_oldᵀ·V_new / n.
    1-D tensors keep ordinary momentum on z.
    """

    def __init__(
        self,
        params: Params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        rank: int = 2,
        interval: int = 50,
        *,  # LOZO's positions stay LOZO's: a value meant for LOZO's next argument is no beta
        beta: float = 0.9,
        seed: int = 0,
    ) -> None:
        require(0 <= beta < 1, "beta", beta, "in [0, 1)")
        super().__init__(params, lr, eps, weight_decay, rank, interval, seed=seed)
        self.beta = beta

    def prepare_update(
        self, entries: list[Entry], factors: list[Factors]
    ) -> tuple[list[Factors], Finish]:
        """N ← β·N + (1−β)·g·U per matrix (M ← β·M + (1−β)·g·z per 1-D tensor), N = g·U on its
        first step. β·N (of N carried into the new V where this step starts an interval) is
        made now, in new tensors; ``finish`` adds g's term and only then makes them the state."""
        start = self._start(self.step_count)
        states = [self.state[p] for _, p in entries]
        olds, us, first = [], [], []  # N and its U; U's copies, the first N once scaled by g
        for state, (u, v) in zip(states, factors, strict=True):  # unscaled: g enters in finish
            buf = state.get("momentum")
            if buf is None:
                first.append(u.clone())
                continue
            v_old = state.get("V") if state.get("V_start") != start else None
            if v is not None and v_old is not None:  # a new interval: N into the new row space
                buf = buf @ (v_old.T @ v) / v.size(0)
            olds.append(buf)
            us.append(u)
        decayed = torch._foreach_mul(olds, self.beta) if olds else []
        made, fresh = iter(decayed), iter(first)
        news = [next(fresh) if s.get("momentum") is None else next(made) for s in states]

        def finish(g: float) -> None:
            if decayed:
                torch._foreach_add_(decayed, us, alpha=(1 - self.beta) * g)
            if first:
                torch._foreach_mul_(first, g)
            for state, buf in zip(states, news, strict=True):
                state["momentum"] = buf
            self._store_vs(entries, factors)

        return [(n, v) for n, (_, v) in zip(news, factors, strict=True)], finish
