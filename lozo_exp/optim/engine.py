"""The fast ZO step: the plain step's losses and updates with fewer passes over the weights.

The plain step writes every weight four times (θ+εd, θ−εd, restore, update). `FastEngine` runs
an estimator through its public contract (`Estimator`) with one of three strategies, chosen by
what the estimator promises:

- `LowRankSidePath` (``low_rank``: LOZO, LOZO-M). A matrix W perturbed by ±ε·U·Vᵀ need not be
  written during the evaluations: each Linear that uses W adds ±ε·(x·V)·Uᵀ to its output, each
  Embedding ±ε·U[ids]·Vᵀ (a tied LM head is a Linear sharing the embedding's W), and W is
  written once, by the update. The side path reads x and reads and writes the output twice per
  step; the in-place way reads and writes W twice more (restore and update fold into one pass),
  so a Linear used by T tokens goes in place when T·(n + 2m) > 2·m·n, decided in its forward.
  The factors are small: drawn once per step and kept. The GPU must not wait for the CPU, and
  the loss sync before the update cannot be avoided (g must be finite), so the next step's
  draws and every part of the update that g does not change are done while the GPU evaluates
  the second loss; after the sync only g's scaling and one launch remain.
- `FusedSGD` (``normal_keys``: MeZO). Every tensor moves in place; where the Triton kernels run,
  each pass is one kernel over every weight that regenerates z from its key while it moves the
  weight (no z in memory), and restore and update are one pass.
- `ReplayedDraws` (any other estimator). Every tensor moves in place, its draws replayed from
  their keys one tensor at a time (one direction-sized temporary), restore and update folded.

In all three the 1-D tensors (biases, LayerNorms: hundreds of tiny tensors, where launches, not
bytes, are the cost) move with multi-tensor ops on draws kept for the step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lozo_exp.optim import kernels
from lozo_exp.optim.estimator import (
    Entry,
    Estimator,
    Factors,
    Placement,
    add_direction,
    plan_add_directions,
)

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "side", "in_place")
RANK_PAD = 8  # x·V runs faster in cuBLAS with V padded to 8 columns


class FastEngine:
    """Runs ``optimizer``'s steps on ``model`` the fast way:
    ``optimizer.use_engine(FastEngine(optimizer, model))``.

    Built for the optimizer's tensors as they are (attach it once the param groups are final).
    A weight is covered by the side path only if every module that holds it is a plain Linear or
    Embedding using it as ``weight`` (code that reads the weight directly, outside those modules,
    is not seen: the fast-vs-plain tests guard the supported model families). ``placement`` says
    where a covered Linear's perturbation goes: "auto" (by token count), "side" or "in_place".
    """

    def __init__(self, optimizer: Estimator, model: nn.Module, placement: str = "auto") -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
        self.opt = optimizer
        self.strategy: Strategy
        entries = [(i, p) for i, _, p in optimizer.indexed_params()]
        if optimizer.low_rank:
            self.strategy = LowRankSidePath(optimizer, model, placement)
        elif optimizer.normal_keys(entries, optimizer.step_count) is not None:
            self.strategy = FusedSGD(optimizer)
        else:
            self.strategy = ReplayedDraws(optimizer)
        log.info(
            "fast engine: %s runs %s (%d tensors)",
            type(self.strategy).__name__,
            type(optimizer).__name__,
            len(entries),
        )

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        return self.strategy.step(closure)

    def last_placement(self) -> Placement | None:
        """The covered matrices the last step moved in place (None: every tensor always moves
        in place, as in MeZO's and any other non-low-rank estimator's strategy)."""
        return self.strategy.last_placement()

    def replay_placement(self, placement: Placement | None) -> None:
        """Run the next step with ``placement`` (a logged step replayed without forwards)."""
        self.strategy.replay_placement(placement)


class Strategy:
    """One way of running an estimator's steps; owns what it keeps between and within steps.

    Made for the estimator's tensors at construction: their order, each one's param group (read
    anew every step: the lr may change, and resuming replaces the group dicts), the matrices
    (≥ 2 dims) and the 1-D tensors.
    """

    def __init__(self, opt: Estimator) -> None:
        self.opt = opt
        params = opt.indexed_params()
        position = {id(group): k for k, group in enumerate(opt.param_groups)}
        self.group_of = {i: position[id(group)] for i, group, _ in params}
        self.entries: list[Entry] = [(i, p) for i, _, p in params]
        self.matrices: list[Entry] = [(i, p) for i, p in self.entries if p.dim() >= 2]
        self.one_dim = OneDim([(i, p) for i, p in self.entries if p.dim() < 2], self.group_of)

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        """One step: the same losses and updates as the plain path."""
        raise NotImplementedError

    def last_placement(self) -> Placement | None:
        return None  # every tensor moves in place, every step

    def replay_placement(self, placement: Placement | None) -> None:
        if placement is not None and (placement.at_plus or placement.at_minus):
            raise ValueError(
                f"{type(self).__name__} moves every tensor in place every step: {placement} is "
                f"not the placement of one of its steps"
            )

    def group_coefs(self) -> tuple[list[float], list[float]]:
        """This step's lr and β = 1 − lr·wd of each param group."""
        groups = self.opt.param_groups
        return [g["lr"] for g in groups], [1.0 - g["lr"] * g["weight_decay"] for g in groups]

    def plan_update(
        self,
        entries: list[Entry],
        draws: list[Factors],
        moved: Callable[[int], bool] | None = None,
    ) -> Callable[[float | None], None]:
        """The update θ ← β·θ − lr·D of ``entries`` given this step's ``draws``, one pass per
        tensor; returns ``apply(g)``. Matrices ``moved`` in place (None: all) hold θ − ε·d and go
        θ−εd → β·θ + (β·ε·d − lr·D) when D shares d's second factor (restore folded in; else
        restored now); the others hold θ, and so do 1-D tensors (restored before the loss
        sync). Everything g does not change is done now: the estimator's part of D, the restore
        terms, the passes' table. ``apply(None)`` (a skipped step) restores what is in place."""
        eps = self.opt.eps
        lrs, betas = self.group_coefs()
        directions, finish = self.opt.prepare_update(entries, draws)
        ws, factors, alphas, bs, one_dim_ds = [], [], [], [], []
        folds: dict[float, tuple[list[Tensor], list[Tensor]]] = {}  # −lr: (restore terms, D)
        folded: list[tuple[Tensor, Factors]] = []  # still at θ − ε·d: (θ, d)
        one_dim = self.one_dim.indices
        for (i, p), (d, b), (z, v) in zip(entries, directions, draws, strict=True):
            if i in one_dim:
                one_dim_ds.append(d)
                continue
            k = self.group_of[i]
            alpha = -lrs[k]
            if moved is None or moved(i):
                if b is v:  # one factor β·ε·z − lr·D: the restore term now (finish may scale z)
                    term = z * (betas[k] * eps)
                    terms, ds = folds.setdefault(alpha, ([], []))
                    terms.append(term)
                    ds.append(d)
                    folded.append((p, (z, v)))
                    d, alpha = term, 1.0
                else:
                    add_direction(p, (z, v), eps)
            ws.append(p)
            factors.append((d, b))
            alphas.append(alpha)
            bs.append(betas[k])
        passes = plan_add_directions(ws, factors, alphas, bs)
        decay = [-lr for lr in lrs]
        one_dim_update = self.one_dim.grouped(one_dim_ds) if one_dim_ds else []

        def apply(g: float | None) -> None:
            if g is None:
                for p, draw in folded:
                    add_direction(p, draw, eps)
                return
            finish(g)
            for alpha, (terms, ds) in folds.items():
                torch._foreach_add_(terms, ds, alpha=alpha)
            passes()
            OneDim.update(one_dim_update, betas, decay)

        return apply


class OneDim:
    """A strategy's 1-D tensors: they move with multi-tensor ops (a few launches per pass, not
    one per tensor) along the draws ``zs`` kept for the step."""

    def __init__(self, entries: list[Entry], group_of: dict[int, int]) -> None:
        self.entries = entries
        self.indices = {i for i, _ in entries}
        self.ps = [p for _, p in entries]
        self.zs: list[Tensor] = []
        members: dict[int, list[int]] = {}
        for j, (i, _) in enumerate(entries):
            members.setdefault(group_of[i], []).append(j)
        # Per param group: its position, its 1-D tensors, and their positions in ``entries``.
        self.groups = [(k, [self.ps[j] for j in js], js) for k, js in members.items()]

    def move(self, scale: float) -> None:
        """θ += scale·z."""
        if self.ps:
            torch._foreach_add_(self.ps, self.zs, alpha=scale)

    def grouped(self, ds: list[Tensor]) -> list[tuple[int, list[Tensor], list[Tensor]]]:
        """``ds`` (one per tensor, in entry order) by param group: (its position, its tensors,
        their ds), for ``update``."""
        return [(k, ps, [ds[j] for j in js]) for k, ps, js in self.groups]

    @staticmethod
    def update(
        grouped: list[tuple[int, list[Tensor], list[Tensor]]],
        betas: list[float],
        alphas: list[float],
    ) -> None:
        """θ ← β·θ + α·d, with the β and α of each param group."""
        for k, ps, ds in grouped:
            if betas[k] != 1:
                torch._foreach_mul_(ps, betas[k])
            torch._foreach_add_(ps, ds, alpha=alphas[k])


class ReplayedDraws(Strategy):
    """Any estimator: every tensor moves in place. A matrix's draws are replayed from their keys
    for each pass (one direction-sized temporary at a time); its restore and update are folded
    into one pass."""

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        opt, eps, step = self.opt, self.opt.eps, self.opt.step_count
        draws = opt.draw(self.one_dim.entries, step)
        self.one_dim.zs = [z for z, _ in draws]
        try:
            self._perturb(eps)
            loss1 = closure()
            self._perturb(-2 * eps)
            loss2 = closure()
            self.one_dim.move(eps)  # the 1-D tensors' restore needs no g: queued before the sync
            g = opt.slope(loss1, loss2)
            if g is None:
                self._move_matrices(eps)
            else:
                self.plan_update(self.one_dim.entries, draws)(g)
                for entry in self.matrices:  # one direction-sized temporary at a time
                    self.plan_update([entry], opt.draw([entry], step))(g)
        finally:
            self.one_dim.zs = []
        return loss1

    def _perturb(self, scale: float) -> None:
        self.one_dim.move(scale)
        self._move_matrices(scale)

    def _move_matrices(self, scale: float) -> None:
        step = self.opt.step_count
        for i, p in self.matrices:
            add_direction(p, self.opt.draw([(i, p)], step)[0], scale)


class FusedSGD(Strategy):
    """ZO-SGD along keyed Gaussian draws (``normal_keys``: MeZO). Where the Triton kernels run,
    each pass is one launch per dtype that regenerates z from its key while it moves the weight;
    elsewhere z is replayed one tensor at a time. Restore and update are one pass:
    θ−εz → β·θ + (β·ε − lr·g)·z."""

    def __init__(self, opt: Estimator) -> None:
        super().__init__(opt)
        # The contiguous matrices of each dtype and device go in one launch: (device, tensors,
        # their positions in ``matrices``, or None when they are all of them, in order).
        launches: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], list[int]]] = {}
        self.singles: list[int] = []  # positions of the others
        for j, (_, p) in enumerate(self.matrices):
            if p.is_contiguous():
                ps, js = launches.setdefault((p.dtype, p.device), ([], []))
                ps.append(p)
                js.append(j)
            else:
                self.singles.append(j)
        every = list(range(len(self.matrices)))
        self.launches = [
            (device, ps, None if js == every else js) for (_, device), (ps, js) in launches.items()
        ]
        self.matrix_groups = [self.group_of[i] for i, _ in self.matrices]

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        opt, eps, step = self.opt, self.opt.eps, self.opt.step_count
        keys = opt.normal_keys(self.matrices, step)
        if keys is None:
            raise RuntimeError(f"{type(opt).__name__}.normal_keys gave keys once, not now")
        zs = [z for z, _ in opt.draw(self.one_dim.entries, step)]
        self.one_dim.zs, grouped = zs, self.one_dim.grouped(zs)
        n = len(self.matrices)
        ones = [1.0] * n
        try:
            self.one_dim.move(eps)
            self._pass(keys, [eps] * n, ones)
            loss1 = closure()
            self.one_dim.move(-2 * eps)
            self._pass(keys, [-2 * eps] * n, ones)
            loss2 = closure()
            g = opt.slope(loss1, loss2)
            if g is None:
                self.one_dim.move(eps)
                self._pass(keys, [eps] * n, ones)
            else:
                lrs, betas = self.group_coefs()
                alphas = [beta * eps - lr * g for lr, beta in zip(lrs, betas, strict=True)]
                by_matrix = self.matrix_groups
                self._pass(keys, [alphas[k] for k in by_matrix], [betas[k] for k in by_matrix])
                OneDim.update(grouped, betas, alphas)
        finally:
            self.one_dim.zs = []
        return loss1

    def _pass(self, keys: list[int], alphas: list[float], betas: list[float]) -> None:
        """θ ← β·θ + α·z for every matrix (keys, α and β: one per matrix)."""
        singles = self.singles
        for device, ps, js in self.launches:
            if not kernels.available(device):
                singles = [*singles, *(range(len(ps)) if js is None else js)]
            elif js is None:
                kernels.axpbz_many_(ps, keys, alphas, betas)
            else:
                picked = ([x[j] for j in js] for x in (keys, alphas, betas))
                kernels.axpbz_many_(ps, *picked)
        step = self.opt.step_count
        for j in singles:
            entry = self.matrices[j]
            add_direction(entry[1], self.opt.draw([entry], step)[0], alphas[j], betas[j])


class LowRankSidePath(Strategy):
    """Low-rank directions (``low_rank``: LOZO, LOZO-M), their factors drawn once per step and
    kept. A covered matrix's perturbation goes on the side path, or in place where that is
    cheaper (``placement``); the other matrices move in place."""

    def __init__(self, opt: Estimator, model: nn.Module, placement: str) -> None:
        super().__init__(opt)
        self.placement = placement
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                entry = owners.setdefault(id(p), [])
                if all(m is not module for _, m, _ in entry):
                    entry.append((mod_name, module, pname))
        # Covered matrices: index -> the modules that use them.
        self.side: dict[int, list[nn.Module]] = {}
        uncovered = []
        for i, p in self.matrices:
            held = owners.get(id(p), [])
            if p.dim() == 2 and held and all(_side_path_module(m, n) for _, m, n in held):
                self.side[i] = [m for _, m, _ in held]
            else:
                uncovered.append(", ".join(f"{m}.{n}" for m, _, n in held) or f"param {i}")
        # Only a weight held by one Linear may be perturbed in place from inside its forward
        # (a tied embedding / LM head stays on the side path: its in-place pass is the larger).
        # A logged step replays its in-place moves whatever this engine's placement (a run
        # logged in one process continues across several, where placement is "side").
        self.replayable = {
            i for i, ms in self.side.items() if len(ms) == 1 and isinstance(ms[0], nn.Linear)
        }
        self.movable = set() if placement == "side" else self.replayable
        log.info(
            "fast engine: %d matrices covered (placement %s); %d tensors always in place "
            "(1-D, and matrices of modules it does not cover: %s)",
            len(self.side),
            placement,
            len(self.entries) - len(self.side),
            "; ".join(uncovered) or "none",
        )
        # Each covered module's forward during the evaluations: made once, installed per step.
        self.forwards = [
            (module, (self._linear_forward if isinstance(module, nn.Linear)
                      else self._embedding_forward)(i, module))
            for i, modules in self.side.items() for module in modules
        ]  # fmt: skip
        # Across steps: the next step's draws (made during this one) and each V padded for x·V.
        self.ahead: tuple[Hashable, dict[int, Factors]] | None = None
        self.padded_v: dict[int, tuple[Hashable, Tensor]] = {}
        # This step: the draws, (U, padded V) of each covered matrix, the perturbation's sign and
        # size, and the covered matrices that went in place (with the scale they went at).
        self.draws: dict[int, Factors] = {}
        self.factors: dict[int, tuple[Tensor, Tensor]] = {}
        self.scale = 0.0
        self.in_place: dict[int, float] = {}
        self.weights = dict(self.matrices)
        # The last step's placement, and the one the next step replays (None: forwards choose).
        self.placement_taken = Placement()
        self.replayed: Placement | None = None

    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:
        opt, eps, step = self.opt, self.opt.eps, self.opt.step_count
        replayed, self.replayed = self.replayed, None
        try:
            self.draws = draws = self._kept_draws(step)
            v_id = opt.v_id(step)
            self.factors = {i: (draws[i][0], self._padded(i, draws[i][1], v_id)) for i in self.side}
            self.one_dim.zs = [draws[i][0] for i, _ in self.one_dim.entries]
            with _patched(self.forwards if replayed is None else []):
                self.scale = eps
                self._perturb_in_place(eps)
                for i in replayed.at_plus if replayed else ():
                    self._go_in_place(i)
                loss1 = closure()
                self.scale = -eps
                self._perturb_in_place(-2 * eps)
                for i in replayed.at_minus if replayed else ():
                    self._go_in_place(i)
                loss2 = closure()
            self.placement_taken = Placement(
                *(tuple(sorted(i for i, s in self.in_place.items() if s * sign > 0))
                  for sign in (1, -1))
            )  # fmt: skip
            self.one_dim.move(eps)  # the 1-D tensors' restore needs no g: queued before the sync
            # While the GPU still evaluates loss2: the next step's draws, the update's plan.
            self.ahead = (opt.draw_id(step + 1), self._draw(step + 1))
            update = self.plan_update(self.entries, [draws[i] for i, _ in self.entries],
                                      moved=self._moved)  # fmt: skip
            update(opt.slope(loss1, loss2))  # the slope waits for the GPU; None: restore
        finally:
            self.draws, self.factors, self.in_place = {}, {}, {}
            self.one_dim.zs = []
        return loss1

    def last_placement(self) -> Placement | None:
        return self.placement_taken

    def replay_placement(self, placement: Placement | None) -> None:
        """The next step moves these matrices in place, at the evaluation each went at, and its
        forwards choose nothing (its closure evaluates nothing)."""
        if placement is not None:
            bad = set(placement.at_plus) | set(placement.at_minus)
            if not bad <= self.replayable:
                raise ValueError(
                    f"matrices {sorted(bad - self.replayable)} cannot move in place from a "
                    f"forward: {placement} is not one of this engine's steps"
                )
        self.replayed = placement

    def _draw(self, step: int) -> dict[int, Factors]:
        draws = self.opt.draw(self.entries, step)
        return dict(zip((i for i, _ in self.entries), draws, strict=True))

    def _kept_draws(self, step: int) -> dict[int, Factors]:
        """This step's draws: those made during the previous step if they were made for this
        step, seed and settings (a resumed or changed optimizer draws anew), else drawn now."""
        made, self.ahead = self.ahead, None
        if made is not None and made[0] == self.opt.draw_id(step):
            return made[1]
        return self._draw(step)

    def _padded(self, index: int, v: Tensor, v_id: Hashable) -> Tensor:
        """V with zero columns up to a multiple of RANK_PAD (x·V's first r columns unchanged,
        exactly), made once per V: kept under what V's numbers depend on, not under the tensor
        (the draw made ahead and the stored V are equal, distinct tensors)."""
        kept = self.padded_v.get(index)
        if kept is None or kept[0] != v_id:
            kept = self.padded_v[index] = (v_id, F.pad(v, (0, -v.size(1) % RANK_PAD)))
        return kept[1]

    def _moved(self, index: int) -> bool:
        """Whether matrix ``index`` is perturbed in place (uncovered, or gone in place)."""
        return index not in self.side or index in self.in_place

    def _perturb_in_place(self, scale: float) -> None:
        """Moves what is perturbed in place (covered matrices only once their forward has chosen
        it: during the first evaluation that happens inside the forward)."""
        self.one_dim.move(scale)
        for i, p in self.matrices:
            if self._moved(i):
                add_direction(p, self.draws[i], scale)

    # -- the covered modules' forwards ------------------------------------------------------

    def _moves_in_place(self, index: int, w: Tensor, x: Tensor) -> bool:
        """Whether W is cheaper to perturb in place than on the side path for input ``x``."""
        if index not in self.movable:
            return False
        if self.placement == "in_place":
            return True
        m, n = w.shape
        tokens = x.numel() // n
        return tokens * (n + 2 * m) > 2 * m * n

    def _go_in_place(self, index: int) -> None:
        """From now on W itself carries θ + scale·d (chosen in its forward, or replayed)."""
        self.in_place[index] = self.scale
        add_direction(self.weights[index], self.draws[index], self.scale)

    def _linear_forward(self, index: int, module: nn.Linear) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            if index not in self.in_place and self._moves_in_place(index, module.weight, x):
                self._go_in_place(index)
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


def _side_path_module(module: nn.Module, name: str) -> bool:
    """Whether ``module`` uses its parameter ``name`` only in a forward we can mirror."""
    if name != "weight" or "forward" in vars(module):  # e.g. accelerate wraps forward itself
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Embedding):
        return type(module).forward is nn.Embedding.forward and module.max_norm is None
    return False


@contextmanager
def _patched(forwards: list[tuple[nn.Module, Callable[[Tensor], Tensor]]]) -> Iterator[None]:
    """While the two losses are evaluated, each covered module runs a forward that adds its term
    ±ε·(x·V)·Uᵀ / ±ε·U[ids]·Vᵀ (or moves W in place); restored afterwards, so other forwards are
    untouched. An instance attribute, not a hook: hooks cost more per call; set in the module's
    ``__dict__``, as ``module.forward = f`` does minus nn.Module's checks (hundreds of modules
    per step)."""
    patched = []
    try:
        for module, forward in forwards:
            vars(module)["forward"] = forward
            patched.append(module)
        yield
    finally:
        for module in patched:
            del vars(module)["forward"]
