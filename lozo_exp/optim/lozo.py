"""LOZO and LOZO-M: zeroth-order steps along low-rank directions U·Vᵀ (Chen et al., 2024)."""

from __future__ import annotations

from torch import Tensor

from lozo_exp.optim.zo import Factors, Params, ZeroOrderOptimizer, _require


class LOZO(ZeroOrderOptimizer):
    """Each matrix W (viewed as m×n) moves along U·Vᵀ: U ∈ R^{m×r} fresh every step, V ∈ R^{n×r}
    redrawn every ``interval`` steps, so consecutive steps explore one rank-r row space.
    1-D tensors get MeZO's full Gaussian z.
    """

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
        _require(isinstance(rank, int) and rank >= 1, "rank", rank, "an int >= 1")
        _require(isinstance(interval, int) and interval >= 1, "interval", interval, "an int >= 1")
        super().__init__(params, lr, eps, weight_decay, seed)
        self.rank = rank
        self.interval = interval

    @property
    def _refresh(self) -> bool:
        """Whether V is redrawn at the current step (step 0 included)."""
        return self.step_count % self.interval == 0

    def _factors(self, entries: list[tuple[int, Tensor]]) -> list[Factors]:
        draws = [
            (p, tuple(p.shape), i, "z") if p.dim() < 2 else (p, (p.size(0), self.rank), i, "U")
            for i, p in entries
        ]
        vs = self._vs([(i, p) for i, p in entries if p.dim() >= 2])
        return [(d, vs.get(i)) for (i, _), d in zip(entries, self._randn(draws), strict=True)]

    def _vs(self, matrices: list[tuple[int, Tensor]]) -> dict[int, Tensor]:
        """This interval's V of each matrix: the stored one, or a draw keyed by the interval's
        first step (on refresh steps, and for a tensor that has no stored V yet)."""
        vs = {i: self.state[p].get("V") for i, p in matrices}
        new = [(i, p) for i, p in matrices if vs[i] is None or self._refresh]
        start = self.step_count - self.step_count % self.interval
        draws = [(p, (p.numel() // p.size(0), self.rank), i, "V") for i, p in new]
        vs.update(zip((i for i, _ in new), self._randn(draws, step=start), strict=True))
        return vs

    def _update_direction(self, index: int, p: Tensor, g: float) -> Factors:
        gu, v = super()._update_direction(index, p, g)
        if v is not None:
            self.state[p]["V"] = v
        return gu, v


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
        beta: float = 0.9,
        seed: int = 0,
    ) -> None:
        _require(0 <= beta < 1, "beta", beta, "in [0, 1)")
        super().__init__(params, lr, eps, weight_decay, rank, interval, seed)
        self.beta = beta

    def _update_direction(self, index: int, p: Tensor, g: float) -> Factors:
        state = self.state[p]
        v_old = state.get("V")
        gu, v = super()._update_direction(index, p, g)
        buf = state.get("momentum")
        if buf is None:  # first step: N = g·U (M = g·z); a copy, not a view of the step's draws
            buf = state["momentum"] = gu.clone()
        else:
            if v is not None and self._refresh:
                buf = state["momentum"] = buf @ (v_old.T @ v) / v.size(0)
            buf.mul_(self.beta).add_(gu, alpha=1 - self.beta)
        return buf, v
