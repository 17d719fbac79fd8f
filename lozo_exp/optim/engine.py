"""The fast ZO step: the same losses and updates as the plain in-place step, fewer weight passes.

The plain step writes every weight four times (θ+εd, θ−εd, restore, update). Here:

- LOZO / LOZO-M: a matrix W (m×n) perturbed by ±ε·U·Vᵀ is never written during the two
  evaluations. Each `nn.Linear` that uses W adds ±ε·(x·V)·Uᵀ to its output, each `nn.Embedding`
  adds ±ε·U[ids]·Vᵀ; a tied LM head is a Linear sharing the embedding's W and gets the same
  term. θ stays bit-identical through both evaluations and the step writes W once (the update).
- Tensors the side path does not cover (1-D biases and LayerNorms, modules with a custom
  forward such as OPT's positional embedding, every tensor for MeZO) are perturbed in place,
  and "restore" and "update" are folded into one pass: θ−εd → β·θ + β·ε·d − lr·D, β = 1−lr·wd.
  LOZO's many tiny 1-D tensors instead move with multi-tensor (`torch._foreach_*`) ops, where
  launches, not bytes, are the cost.
- MeZO on CUDA with Triton: each pass is one fused kernel that regenerates z from its
  counter-based key while it reads and writes the weight (`philox.axpbz_`): three passes that
  each touch every weight once, with no z in memory.
- LOZO's factors are drawn once per step and kept (they are small); MeZO's z is replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lozo_exp.optim import philox
from lozo_exp.optim.lozo import LOZO
from lozo_exp.optim.zo import MeZO, ZeroOrderOptimizer

log = logging.getLogger(__name__)


def _side_path_module(module: nn.Module, name: str) -> bool:
    """Whether ``module`` uses its parameter ``name`` only in a forward we can mirror."""
    if name != "weight":
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Embedding):
        return type(module).forward is nn.Embedding.forward and module.max_norm is None
    return False


RANK_PAD = 8  # cuBLAS runs x·V and the rank-r addmm ~25-30% faster with r padded to 8 (H200)


def _pad_rank(u: Tensor, v: Tensor | None) -> tuple[Tensor, Tensor]:
    """U and V with zero columns up to a multiple of RANK_PAD: U·Vᵀ is unchanged, exactly."""
    pad = -u.size(1) % RANK_PAD
    return F.pad(u, (0, pad)), F.pad(v, (0, pad))


class FastEngine:
    """Runs ``optimizer``'s steps on ``model`` the fast way; attach with ``FastEngine(opt, model)``.

    A weight is on the side path only if every module that holds it is a plain Linear or
    Embedding using it as ``weight`` (code that reads the weight directly, outside those
    modules, is not seen: the fast-vs-plain tests guard the supported model families).
    """

    def __init__(self, optimizer: ZeroOrderOptimizer, model: nn.Module) -> None:
        self.opt = optimizer
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                entry = owners.setdefault(id(p), [])
                if all(m is not module for _, m, _ in entry):
                    entry.append((mod_name, module, pname))
        low_rank = isinstance(optimizer, LOZO)
        self.side: dict[int, list[nn.Module]] = {}
        fallback = []
        for i, _, p in optimizer._indexed_params():
            held = owners.get(id(p), [])
            covered = bool(held) and all(_side_path_module(m, n) for _, m, n in held)
            if low_rank and p.dim() == 2 and covered:
                self.side[i] = [m for _, m, _ in held]
            elif low_rank and p.dim() >= 2:
                fallback.append(", ".join(f"{m}.{n}" for m, _, n in held) or f"param {i}")
        # MeZO's plain ZO-SGD update g·z can be fused with the restore into one scaled pass.
        self.fused_sgd = isinstance(optimizer, MeZO) and (
            type(optimizer)._update_direction is ZeroOrderOptimizer._update_direction
        )
        n_params = sum(1 for _ in optimizer._indexed_params())
        if low_rank:
            log.info(
                "fast engine: %d matrices on the side path; %d tensors in place (1-D, and "
                "matrices of modules it does not cover: %s)",
                len(self.side),
                n_params - len(self.side),
                "; ".join(fallback) or "none",
            )
        else:
            log.info(
                "fast engine: %s, %d tensors perturbed in place, restore and update folded",
                type(optimizer).__name__,
                n_params,
            )
        # 1-D tensors (biases, LayerNorms: hundreds of tiny tensors) move with multi-tensor ops
        # on draws made once per step: a few launches per pass instead of one per tensor.
        self.small = {i for i, _, p in optimizer._indexed_params() if p.dim() < 2}
        self.small_draws: tuple[list[Tensor], list[Tensor], list[tuple[int, dict, Tensor]]]
        self.scale = 0.0
        self.hook_factors: dict[int, tuple[Tensor, Tensor]] = {}
        optimizer.engine = self

    # -- one step ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        opt, eps = self.opt, self.opt.eps
        keep = isinstance(opt, LOZO)  # low-rank factors are small: draw once per step
        opt._draws = {} if keep else None
        try:
            for i, _, p in opt._indexed_params():
                if i in self.side:  # the hooks read these padded copies of the kept draws
                    self.hook_factors[i] = _pad_rank(*opt._direction(i, p))
            self.small_draws = self._small()
            with self._side_path():
                self.scale = eps
                self._perturb_in_place(eps)
                loss1 = closure()
                self.scale = -eps
                self._perturb_in_place(-2 * eps)
                loss2 = closure()
            self._restore_and_update(opt._slope(loss1, loss2))
        finally:
            opt._draws = None
            self.hook_factors = {}
            self.small_draws = ([], [], [])
        return loss1

    def _small(self) -> tuple[list[Tensor], list[Tensor], list[tuple[int, dict, Tensor]]]:
        """The 1-D tensors moved with multi-tensor ops, their kept draws z, and their entries."""
        entries = [(i, g, p) for i, g, p in self.opt._indexed_params() if i in self.small]
        zs = [self.opt._direction(i, p)[0] for i, _, p in entries]
        return [p for _, _, p in entries], zs, entries

    def _perturb_in_place(self, scale: float) -> None:
        opt = self.opt
        ps, zs, _ = self.small_draws
        if ps:
            torch._foreach_add_(ps, zs, alpha=scale)
        for i, _, p in opt._indexed_params():
            if i in self.side or i in self.small:
                continue
            if self._fused(p):
                philox.axpbz_(p, opt._key(i, "z"), 1.0, scale)
            else:
                opt._add_direction(p, *opt._direction(i, p), scale)

    def _fused(self, p: Tensor) -> bool:
        return self.fused_sgd and p.is_contiguous() and philox.available(p.device)

    def _restore_and_update(self, g: float | None) -> None:
        """One pass per tensor: in-place ones go θ−εd → β·θ + β·ε·d − lr·D, side-path ones
        θ → β·θ − lr·D (they were never moved)."""
        opt, eps = self.opt, self.opt.eps
        self._restore_and_update_small(g)
        for i, group, p in opt._indexed_params():
            beta = 1.0 - group["lr"] * group["weight_decay"] if g is not None else 1.0
            lr = group["lr"]
            if i in self.small:
                continue
            if i in self.side:
                if g is not None:
                    opt._add_direction(p, *opt._update_direction(i, p, g), -lr, beta)
            elif self._fused(p):
                coef = beta * eps - (lr * g if g is not None else 0.0)
                philox.axpbz_(p, opt._key(i, "z"), beta, coef)
            elif g is None:
                opt._add_direction(p, *opt._direction(i, p), eps)
            elif self.fused_sgd:  # D = g·d: a scalar coefficient, no extra temporaries
                opt._add_direction(p, *opt._direction(i, p), beta * eps - lr * g, beta)
            else:
                a, b = opt._direction(i, p)
                restore = a * (beta * eps)  # before _update_direction may scale a in place
                da, _ = opt._update_direction(i, p, g)  # same V as the perturbation
                opt._add_direction(p, restore.add_(da, alpha=-lr), b, 1.0, beta)

    def _restore_and_update_small(self, g: float | None) -> None:
        """The plain path's restore and update, as multi-tensor ops over the 1-D tensors."""
        ps, zs, entries = self.small_draws
        if not ps:
            return
        eps = self.opt.eps
        if g is None or not self.fused_sgd:
            torch._foreach_add_(ps, zs, alpha=eps)
            if g is None:
                return
        groups: dict[int, tuple[dict, list[Tensor], list[Tensor]]] = {}
        for (i, group, p), z in zip(entries, zs, strict=True):
            # ZO-SGD: D = g·z, so restore and update are one add; else the estimator's D.
            d = z if self.fused_sgd else self.opt._update_direction(i, p, g)[0]
            _, gp, gd = groups.setdefault(id(group), (group, [], []))
            gp.append(p)
            gd.append(d)
        for group, gp, gd in groups.values():
            beta = 1 - group["lr"] * group["weight_decay"]
            if beta != 1:
                torch._foreach_mul_(gp, beta)
            alpha = beta * eps - group["lr"] * g if self.fused_sgd else -group["lr"]
            torch._foreach_add_(gp, gd, alpha=alpha)

    # -- the side path ----------------------------------------------------------------------

    @contextmanager
    def _side_path(self):
        """Forward hooks adding ±ε·(x·V)·Uᵀ (Linear) or ±ε·U[ids]·Vᵀ (Embedding) while the
        two losses are evaluated; removed afterwards, so other forwards are untouched."""
        handles = []
        for i, modules in self.side.items():
            for module in modules:
                hook = self._linear_hook if isinstance(module, nn.Linear) else self._embed_hook
                handles.append(module.register_forward_hook(hook(i), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _linear_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Tensor) -> None:
            u, v = self.hook_factors[index]
            x = args[0] if args else kwargs["input"]
            xv = x @ v  # (..., r)
            if out.is_contiguous():
                out.view(-1, u.size(0)).addmm_(xv.reshape(-1, v.size(1)), u.T, alpha=self.scale)
            else:
                out.add_(xv @ u.T, alpha=self.scale)

        return hook

    def _embed_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Tensor) -> None:
            u, v = self.hook_factors[index]
            ids = args[0] if args else kwargs["input"]
            out.add_(F.embedding(ids, u) @ v.T, alpha=self.scale)

        return hook
