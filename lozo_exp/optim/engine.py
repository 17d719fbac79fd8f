"""The fast ZO step: the same losses and updates as the plain in-place step, fewer weight passes.

The plain step writes every weight four times (θ+εd, θ−εd, restore, update). Here:

- LOZO / LOZO-M: a matrix W (m×n) perturbed by ±ε·U·Vᵀ need not be written during the two
  evaluations. While they run, each `nn.Linear` that uses W adds ±ε·(x·V)·Uᵀ to its output
  (the side path), each `nn.Embedding` adds ±ε·U[ids]·Vᵀ; a tied LM head is a Linear sharing the
  embedding's W and gets the same term. The step then writes W once (the update).
- The side path reads x and reads and writes the module's output, twice per step; perturbing W in
  place reads and writes W twice more (restore and update fold into one pass). So a Linear used by
  T tokens per forward is perturbed in place when T·(n + 2m) > 2·m·n, decided in its forward
  (``placement="auto"``; measured on an H200 the rule picks the cheaper way for every OPT-13B
  shape at 2k and 6k tokens). ``placement="side"`` keeps every covered W untouched (bit-identical)
  through both evaluations.
- Tensors the side path does not cover (1-D biases and LayerNorms, modules with a custom forward
  such as OPT's positional embedding, every tensor for MeZO) are perturbed in place, and
  "restore" and "update" are folded into one pass: θ−εd → β·θ + β·ε·d − lr·D, β = 1−lr·wd.
  The many tiny 1-D tensors move with multi-tensor (`torch._foreach_*`) ops, where launches,
  not bytes, are the cost.
- MeZO on CUDA with Triton: each pass is one fused kernel that regenerates z from its
  counter-based key while it reads and writes the weight (`kernels.axpbz_`): three passes that
  each touch every weight once, with no z in memory.
- LOZO's factors are drawn once per step, all in a few launches, and kept (they are small);
  MeZO's z is replayed (its 1-D tensors' z are kept too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lozo_exp.optim import kernels
from lozo_exp.optim.lozo import LOZO
from lozo_exp.optim.zo import MeZO, ZeroOrderOptimizer

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "side", "in_place")


def _side_path_module(module: nn.Module, name: str) -> bool:
    """Whether ``module`` uses its parameter ``name`` only in a forward we can mirror."""
    if name != "weight" or "forward" in vars(module):  # e.g. accelerate wraps forward itself
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Embedding):
        return type(module).forward is nn.Embedding.forward and module.max_norm is None
    return False


RANK_PAD = 8  # cuBLAS runs x·V ~25-30% faster with r padded to 8 (H200)


def _pad_rank(x: Tensor) -> Tensor:
    """A factor with zero columns up to a multiple of RANK_PAD: U·Vᵀ is unchanged, exactly."""
    return F.pad(x, (0, -x.size(1) % RANK_PAD))


class FastEngine:
    """Runs ``optimizer``'s steps on ``model`` the fast way; attach with ``FastEngine(opt, model)``.

    A weight is covered only if every module that holds it is a plain Linear or Embedding using
    it as ``weight`` (code that reads the weight directly, outside those modules, is not seen:
    the fast-vs-plain tests guard the supported model families). ``placement`` says where a
    covered Linear's perturbation goes: "auto" (by token count), "side" or "in_place".
    """

    def __init__(
        self, optimizer: ZeroOrderOptimizer, model: nn.Module, placement: str = "auto"
    ) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
        self.opt = optimizer
        self.placement = placement
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
        # Only a weight held by one Linear may be perturbed in place from inside its forward
        # (a tied embedding / LM head stays on the side path: its in-place pass is the larger).
        self.movable = {
            i for i, ms in self.side.items() if len(ms) == 1 and isinstance(ms[0], nn.Linear)
        }
        if placement == "side":
            self.movable = set()
        # MeZO's plain ZO-SGD update g·z can be fused with the restore into one scaled pass.
        self.fused_sgd = isinstance(optimizer, MeZO) and (
            type(optimizer)._update_direction is ZeroOrderOptimizer._update_direction
        )
        n_params = sum(1 for _ in optimizer._indexed_params())
        if low_rank:
            log.info(
                "fast engine: %d matrices covered (placement %s); %d tensors always in place "
                "(1-D, and matrices of modules it does not cover: %s)",
                len(self.side),
                placement,
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
        # This step: padded (U, V) of each covered matrix, and the covered ones moved in place.
        self.factors: dict[int, tuple[Tensor, Tensor]] = {}
        self.in_place: set[int] = set()
        self._padded_v: dict[int, tuple[Tensor, Tensor]] = {}  # V is fixed for an interval
        optimizer.engine = self

    # -- one step ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        opt, eps = self.opt, self.opt.eps
        keep = isinstance(opt, LOZO)  # low-rank factors are small: draw once per step
        opt._draws = {} if keep else None
        try:
            if keep:
                opt._keep_draws([(i, p) for i, _, p in opt._indexed_params()])
            for i, _, p in opt._indexed_params():
                if i in self.side:
                    u, v = opt._direction(i, p)
                    self.factors[i] = (_pad_rank(u), self._padded(i, v))
            self.small_draws = self._small()
            with self._patched_forwards():
                self.scale = eps
                self._perturb_in_place(eps)
                loss1 = closure()
                self.scale = -eps
                self._perturb_in_place(-2 * eps)
                loss2 = closure()
            self._restore_and_update(opt._slope(loss1, loss2))
        finally:
            opt._draws = None
            self.factors = {}
            self.in_place = set()
            self.small_draws = ([], [], [])
        return loss1

    def _padded(self, index: int, v: Tensor) -> Tensor:
        kept = self._padded_v.get(index)
        if kept is None or kept[0] is not v:
            kept = self._padded_v[index] = (v, _pad_rank(v))
        return kept[1]

    def _small(self) -> tuple[list[Tensor], list[Tensor], list[tuple[int, dict, Tensor]]]:
        """The 1-D tensors moved with multi-tensor ops, their kept draws z, and their entries."""
        entries = [(i, g, p) for i, g, p in self.opt._indexed_params() if i in self.small]
        if self.opt._draws is None:  # MeZO replays its other draws; these few are kept here
            zs = [z for z, _ in self.opt._factors([(i, p) for i, _, p in entries])]
        else:
            zs = [self.opt._direction(i, p)[0] for i, _, p in entries]
        return [p for _, _, p in entries], zs, entries

    def _perturb_in_place(self, scale: float) -> None:
        """Moves every tensor perturbed in place (covered matrices only once their forward has
        chosen it: during the first evaluation that happens inside the forward)."""
        opt = self.opt
        ps, zs, _ = self.small_draws
        if ps:
            torch._foreach_add_(ps, zs, alpha=scale)
        for i, _, p in opt._indexed_params():
            if i in self.small or (i in self.side and i not in self.in_place):
                continue
            if self._fused(p):
                kernels.axpbz_(p, opt._key(i, "z"), 1.0, scale)
            else:
                opt._add_direction(p, *opt._direction(i, p), scale)

    def _fused(self, p: Tensor) -> bool:
        return self.fused_sgd and p.is_contiguous() and kernels.available(p.device)

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
            if i in self.side and i not in self.in_place:
                if g is not None:
                    opt._add_direction(p, *opt._update_direction(i, p, g), -lr, beta)
            elif self._fused(p):
                coef = beta * eps - (lr * g if g is not None else 0.0)
                kernels.axpbz_(p, opt._key(i, "z"), beta, coef)
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

    # -- the covered modules' forwards ------------------------------------------------------

    @contextmanager
    def _patched_forwards(self) -> Iterator[None]:
        """While the two losses are evaluated, each covered module runs a forward that adds its
        term ±ε·(x·V)·Uᵀ / ±ε·U[ids]·Vᵀ (or moves W in place); restored afterwards, so other
        forwards are untouched. An instance attribute, not a hook: hooks cost more per call."""
        patched = []
        try:
            for i, modules in self.side.items():
                for module in modules:
                    linear = isinstance(module, nn.Linear)
                    forward = self._linear_forward if linear else self._embedding_forward
                    module.forward = forward(i, module)
                    patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def _moves_in_place(self, index: int, w: Tensor, x: Tensor) -> bool:
        """Whether W is cheaper to perturb in place than on the side path for input ``x``."""
        if index not in self.movable:
            return False
        if self.placement == "in_place":
            return True
        m, n = w.shape
        tokens = x.numel() // n
        return tokens * (n + 2 * m) > 2 * m * n

    def _linear_forward(self, index: int, module: nn.Linear) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            if index not in self.in_place and self._moves_in_place(index, module.weight, x):
                self.in_place.add(index)  # from now on W itself carries θ + scale·d
                w = module.weight
                self.opt._add_direction(w, *self.opt._direction(index, w), self.scale)
            out = nn.Linear.forward(module, x)
            if index in self.in_place:
                return out
            u, v = self.factors[index]
            self._add_term(out, x.reshape(-1, v.size(0)) @ v, u)  # ±ε·(x·V)·Uᵀ
            return out

        return forward

    def _embedding_forward(self, index: int, module: nn.Embedding) -> Callable[[Tensor], Tensor]:
        def forward(ids: Tensor) -> Tensor:
            out = nn.Embedding.forward(module, ids)
            u, v = self.factors[index]
            self._add_term(out, F.embedding(ids, u).view(-1, u.size(1)), v)  # ±ε·U[ids]·Vᵀ
            return out

        return forward

    def _add_term(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        """out += scale·a·bᵀ, with a (tokens, r) and b (out features, r)."""
        if out.is_contiguous():
            kernels.lowrank_add_(out.view(-1, b.size(0)), a, b, self.scale)
        else:
            out.add_((a @ b.T).view(out.shape), alpha=self.scale)
