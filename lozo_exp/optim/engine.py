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
  counter-based key while it reads and writes the weight (`kernels.axpbz_many_`, every weight
  in one launch): three passes that each touch every weight once, with no z in memory.
- LOZO's factors are drawn once per step, all in a few launches, and kept (they are small);
  MeZO's z is replayed (its 1-D tensors' z are kept too).
- The GPU must never wait for the CPU. The loss sync before the update is unavoidable (g must be
  finite to be applied), so what follows it is kept short. While the GPU evaluates the second
  loss, the CPU makes the next step's draws (pure functions of their keys) and plans the low-rank
  update: every part that g does not change, including the one-launch pass's table of addresses
  (`kernels.plan_lowrank_add_many`). After the sync: g's multi-tensor scaling of the directions
  and one launch. On OPT-13B at 32×64 tokens (an H200, under the profiler) the gaps between a
  step's kernels went from 35 to ~10 ms.
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
from lozo_exp.optim.zo import Factors, MeZO, ZeroOrderOptimizer

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


RANK_PAD = 8  # cuBLAS runs x·V ~25-30% faster with V padded to 8 columns (H200)


def _pad_rank(x: Tensor) -> Tensor:
    """A factor with zero columns up to a multiple of RANK_PAD: x·V is unchanged in its first
    r columns, exactly (U is not padded: the low-rank kernel reads the first r columns)."""
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
            type(optimizer)._prepare_update is ZeroOrderOptimizer._prepare_update
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
        # This step: (U, padded V) of each covered matrix, and the covered ones moved in place.
        self.factors: dict[int, tuple[Tensor, Tensor]] = {}
        self.in_place: set[int] = set()
        self._padded_v: dict[int, tuple[tuple, Tensor]] = {}  # V is fixed for an interval
        self._next: tuple[tuple, dict[int, Factors]] | None = None  # the next step's draws
        self.params: list[tuple[int, dict, Tensor]] = []  # this step's (index, group, tensor)
        # Each covered module's forward during the evaluations: made once, installed per step.
        self._forwards = [
            (module, (self._linear_forward if isinstance(module, nn.Linear)
                      else self._embedding_forward)(i, module))
            for i, modules in self.side.items() for module in modules
        ]  # fmt: skip
        optimizer.engine = self

    # -- one step ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        opt, eps = self.opt, self.opt.eps
        keep = isinstance(opt, LOZO)  # low-rank factors are small: draw once per step
        self.params = list(opt._indexed_params())
        entries = [(i, p) for i, _, p in self.params]
        try:
            opt._draws = self._kept_draws(entries, opt.step_count) if keep else None
            if keep:
                v_id = opt._v_id(opt.step_count)
                for i, p in entries:
                    if i in self.side:
                        u, v = opt._direction(i, p)
                        self.factors[i] = (u, self._padded(i, v, v_id))
            self.small_draws = self._small()
            with self._patched_forwards():
                self.scale = eps
                self._perturb_in_place(eps)
                loss1 = closure()
                self.scale = -eps
                self._perturb_in_place(-2 * eps)
                loss2 = closure()
            if not self.fused_sgd:  # the 1-D tensors' restore needs no g: queued now
                self._move_small(eps)
            if keep:  # while the GPU still evaluates loss2: the next step's draws, the update plan
                step = opt.step_count + 1
                self._next = (self._draw_id(step, entries), self._draw(entries, step))
                update = self._plan_update(self.params)
            g = opt._slope(loss1, loss2)  # waits for the GPU
            if g is None:
                self._restore()
            elif keep:
                update(g)
            elif self.fused_sgd:
                self._fused_update(g)
            else:  # replayed full-size draws: one tensor at a time, one direction-sized temporary
                for entry in self.params:
                    self._plan_update([entry])(g)
        finally:
            opt._draws = None
            self.factors = {}
            self.in_place = set()
            self.small_draws = ([], [], [])
        return loss1

    def _draw(self, entries: list[tuple[int, Tensor]], step: int) -> dict[int, Factors]:
        return dict(zip((i for i, _ in entries), self.opt._factors(entries, step), strict=True))

    def _draw_id(self, step: int, entries: list[tuple[int, Tensor]]) -> tuple:
        """What a step's draws depend on (they are pure functions of their keys)."""
        opt = self.opt
        return (
            opt.seed,
            step,
            len(entries),
            getattr(opt, "rank", None),
            getattr(opt, "interval", None),
        )

    def _kept_draws(self, entries: list[tuple[int, Tensor]], step: int) -> dict[int, Factors]:
        """This step's draws: those made during the previous step if they were made for this
        step, seed and settings (a resumed or changed optimizer draws anew), else drawn now."""
        made, self._next = self._next, None
        if made is not None and made[0] == self._draw_id(step, entries):
            return made[1]
        return self._draw(entries, step)

    def _padded(self, index: int, v: Tensor, v_id: tuple) -> Tensor:
        """V padded to RANK_PAD columns, made once per interval. Kept under what V's numbers
        depend on, not under the tensor: a draw made ahead and the stored V are equal, distinct
        tensors (keyed by identity, the pad was redone every step: 240 launches on OPT-13B)."""
        kept = self._padded_v.get(index)
        if kept is None or kept[0] != v_id:
            kept = self._padded_v[index] = (v_id, _pad_rank(v))
        return kept[1]

    def _small(self) -> tuple[list[Tensor], list[Tensor], list[tuple[int, dict, Tensor]]]:
        """The 1-D tensors moved with multi-tensor ops, their kept draws z, and their entries."""
        opt = self.opt
        entries = [(i, g, p) for i, g, p in self.params if i in self.small]
        if opt._draws is None:  # MeZO replays its other draws; these few are kept here
            zs = [z for z, _ in opt._factors([(i, p) for i, _, p in entries], opt.step_count)]
        else:
            zs = [opt._direction(i, p)[0] for i, _, p in entries]
        return [p for _, _, p in entries], zs, entries

    def _move_small(self, scale: float) -> None:
        """θ += scale·z for the 1-D tensors, in one multi-tensor launch."""
        ps, zs, _ = self.small_draws
        if ps:
            torch._foreach_add_(ps, zs, alpha=scale)

    def _perturb_in_place(self, scale: float) -> None:
        """Moves every tensor perturbed in place (covered matrices only once their forward has
        chosen it: during the first evaluation that happens inside the forward)."""
        self._move_small(scale)
        self._move(dict.fromkeys(self._moved(self.params), (1.0, scale)))

    def _moved(self, entries: list[tuple[int, dict, Tensor]]) -> set[int]:
        """The matrices of ``entries`` perturbed in place (in-place ones and uncovered ones)."""
        return {
            i for i, _, _ in entries
            if i not in self.small and (i not in self.side or i in self.in_place)
        }  # fmt: skip

    def _move(self, coefs: dict[int, tuple[float, float]]) -> None:
        """θ ← a·θ + b·d for the tensors ``coefs`` holds ({index: (a, b)}). Fused ZO-SGD passes
        (z regenerated inside the pass) go in one launch per dtype; the others one at a time."""
        opt = self.opt
        fused: dict[tuple, tuple[list, list, list, list]] = {}
        for i, _, p in self.params:
            if i not in coefs:
                continue
            a, b = coefs[i]
            if self.fused_sgd and p.is_contiguous() and kernels.available(p.device):
                group = fused.setdefault((p.dtype, p.device), ([], [], [], []))
                for items, x in zip(group, (p, opt._key(i, "z"), a, b), strict=True):
                    items.append(x)
            else:
                opt._add_direction(p, *opt._direction(i, p), b, a)
        for group in fused.values():
            kernels.axpbz_many_(*group)

    def _restore(self) -> None:
        """θ−εd → θ for what is in place (a skipped step: g is not finite)."""
        if self.fused_sgd:  # the 1-D tensors (else restored before the loss sync)
            self._move_small(self.opt.eps)
        self._move(dict.fromkeys(self._moved(self.params), (1.0, self.opt.eps)))

    def _fused_update(self, g: float) -> None:
        """ZO-SGD: θ−εd → β·θ + (β·ε − lr·g)·d, restore and update in one pass per tensor
        (β = 1 − lr·wd); z is regenerated inside the pass where Triton runs it."""
        coef = {}
        for i, group, _ in self.params:
            beta = 1.0 - group["lr"] * group["weight_decay"]
            coef[i] = (beta, beta * self.opt.eps - group["lr"] * g)
        moved = self._moved(self.params)
        self._move({i: ab for i, ab in coef.items() if i in moved})
        _, zs, small = self.small_draws
        self._update_small([(e, z, coef[e[0]][1]) for e, z in zip(small, zs, strict=True)])

    def _plan_update(self, entries: list[tuple[int, dict, Tensor]]) -> Callable[[float], None]:
        """The update of ``entries``, one pass per tensor: in-place ones go θ−εd → β·θ + β·ε·d −
        lr·D, side-path ones θ → β·θ − lr·D (never moved), 1-D ones θ → β·θ − lr·D (restored
        before the loss sync); β = 1 − lr·wd. Everything g does not change is done now (the
        restore terms, the optimizer's plan of D, the passes' table); returns what applies g.
        With kept (low-rank) draws the directions come in a few launches and the matrices'
        passes in one, so the CPU enqueues the update much faster than the GPU runs it."""
        opt = self.opt
        moved = self._moved(entries)
        lrs = {i: group["lr"] for i, group, _ in entries}
        betas = {i: 1.0 - group["lr"] * group["weight_decay"] for i, group, _ in entries}
        # The restore terms first: finishing the update directions may scale the draws in place.
        restore = {i: opt._direction(i, p)[0] * (betas[i] * opt.eps)
                   for i, _, p in entries if i in moved}  # fmt: skip
        directions, finish = opt._prepare_update([(i, p) for i, _, p in entries])
        ws, factors, alphas, bs, small = [], [], [], [], []
        folds: dict[float, tuple[list[Tensor], list[Tensor]]] = {}  # −lr: (restore terms, D)
        for (i, group, p), (d, b) in zip(entries, directions, strict=True):
            if i in self.small:
                small.append(((i, group, p), d, -lrs[i]))
                continue
            if i in restore:  # β·ε·d − lr·D as one factor: restore + (−lr)·D, added after finish
                terms, ds = folds.setdefault(-lrs[i], ([], []))
                terms.append(restore[i])
                ds.append(d)
                d, alpha = restore[i], 1.0
            else:
                alpha = -lrs[i]
            ws.append(p)
            factors.append((d, b))
            alphas.append(alpha)
            bs.append(betas[i])
        passes = opt._plan_add_directions(ws, factors, alphas, bs)

        def apply(g: float) -> None:
            finish(g)
            for alpha, (terms, ds) in folds.items():
                torch._foreach_add_(terms, ds, alpha=alpha)
            passes()
            self._update_small(small)

        return apply

    @staticmethod
    def _update_small(items: list[tuple[tuple[int, dict, Tensor], Tensor, float]]) -> None:
        """θ ← β·θ + alpha·d for the 1-D tensors ((index, group, θ), d, alpha), with
        multi-tensor ops per param group (β = 1 − lr·wd)."""
        groups: dict[int, tuple[dict, list[Tensor], list[Tensor], float]] = {}
        for (_, group, p), d, alpha in items:
            _, gp, gd, _ = groups.setdefault(id(group), (group, [], [], alpha))
            gp.append(p)
            gd.append(d)
        for group, gp, gd, alpha in groups.values():
            beta = 1 - group["lr"] * group["weight_decay"]
            if beta != 1:
                torch._foreach_mul_(gp, beta)
            torch._foreach_add_(gp, gd, alpha=alpha)

    # -- the covered modules' forwards ------------------------------------------------------

    @contextmanager
    def _patched_forwards(self) -> Iterator[None]:
        """While the two losses are evaluated, each covered module runs a forward that adds its
        term ±ε·(x·V)·Uᵀ / ±ε·U[ids]·Vᵀ (or moves W in place); restored afterwards, so other
        forwards are untouched. An instance attribute, not a hook: hooks cost more per call;
        set in the module's ``__dict__``, as ``module.forward = f`` does minus nn.Module's
        checks (hundreds of modules per step)."""
        patched = []
        try:
            for module, forward in self._forwards:
                vars(module)["forward"] = forward
                patched.append(module)
            yield
        finally:
            for module in patched:
                del vars(module)["forward"]

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
            u, v = self.factors[index]  # v padded: x·V runs faster, its first r columns used
            self._add_term(out, torch.matmul(x, v), u)  # ±ε·(x·V)·Uᵀ
            return out

        return forward

    def _embedding_forward(self, index: int, module: nn.Embedding) -> Callable[[Tensor], Tensor]:
        def forward(ids: Tensor) -> Tensor:
            out = nn.Embedding.forward(module, ids)
            u, v = self.factors[index]
            self._add_term(out, F.embedding(ids, u), v[:, : u.size(1)])  # ±ε·U[ids]·Vᵀ
            return out

        return forward

    def _add_term(self, out: Tensor, a: Tensor, b: Tensor) -> None:
        """out += scale·a·bᵀ, with a (…, ≥ r) matching out's leading dims and b (out features, r):
        a's first r columns are used."""
        if out.is_contiguous():
            kernels.lowrank_add_(out, a, b, self.scale)
        else:
            out.add_(a[..., : b.size(1)] @ b.T, alpha=self.scale)
