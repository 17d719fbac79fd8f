"""The fast engine computes the plain path's losses and updates; side-path weights never move.

The Triton kernels, and the engine running through them, are tested in test_kernels.py."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import compose_config
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from lozo_exp.config import ConfigError, validate
from lozo_exp.methods import build_method
from lozo_exp.models import load_model, load_tokenizer
from lozo_exp.optim import (
    LOZO,
    LOZOM,
    Estimator,
    FastEngine,
    MeZO,
    Placement,
    ZeroOrderOptimizer,
    draw_key,
)

ALL = [LOZO, LOZOM, MeZO]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(name: str, dtype: str, device: str = "cpu", *overrides: str) -> nn.Module:
    cfg = compose_config(f"model={name}", f"model.dtype={dtype}", *overrides)
    torch.manual_seed(0)
    return load_model(cfg.model, load_tokenizer(cfg.model), device).eval()


def small_opt() -> nn.Module:
    """An OPT with a 256-token vocabulary and two layers, in float64."""
    config = OPTConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4
    )
    torch.manual_seed(0)
    return OPTForCausalLM(config).double().eval()


def make_opt(
    cls: type[ZeroOrderOptimizer], model: nn.Module, eps=1e-3, named=True
) -> ZeroOrderOptimizer:
    """Named parameters: no decay on biases and LayerNorms; unnamed: every tensor decays."""
    kw = {"rank": 2, "interval": 4} if issubclass(cls, LOZO) else {}
    params = model.named_parameters() if named else model.parameters()
    return cls(params, lr=1e-2, eps=eps, weight_decay=0.1, seed=7, **kw)


def batch(model: nn.Module, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.get_input_embeddings().num_embeddings, (3, 10), generator=gen)
    return ids.to(next(model.parameters()).device)


class ContractOnly:
    """An estimator seen through `Estimator` alone: any other attribute is an error, and so is
    setting one. The engine runs on it in every fast-vs-plain test."""

    MEMBERS = frozenset(Estimator.__annotations__) | {
        name for name in vars(Estimator) if not name.startswith("_")
    }

    def __init__(self, opt: ZeroOrderOptimizer) -> None:
        object.__setattr__(self, "_opt", opt)

    def __getattr__(self, name: str):
        if name not in self.MEMBERS:
            raise AttributeError(f"{name!r} is not part of the Estimator contract")
        return getattr(object.__getattribute__(self, "_opt"), name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"an engine must not set {name!r} on the estimator")


def attach(opt: ZeroOrderOptimizer, model: nn.Module, placement: str = "auto") -> FastEngine:
    """The fast engine on ``opt``, built through the public contract alone."""
    return opt.use_engine(FastEngine(ContractOnly(opt), model, placement=placement))


def trajectory(
    model: nn.Module, cls, fast: str | None, steps: int, eps=1e-3, named=True
) -> tuple[list, list]:
    """Losses and flattened weights after each step, on a fresh copy of ``model``; ``fast`` is
    the engine's placement (None: the plain path)."""
    model = copy.deepcopy(model)
    opt = make_opt(cls, model, eps, named)
    if fast:
        attach(opt, model, fast)
    losses, weights = [], []
    for k in range(steps):
        ids = batch(model, k)
        opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        losses.append(opt.last_losses)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return losses, weights


PLACEMENTS = ["auto", "side", "in_place"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-opt", "tiny-roberta"])
@pytest.mark.parametrize(("cls", "placement"), [(c, p) for c in ALL for p in PLACEMENTS
                                                if c is not MeZO or p == "auto"])  # fmt: skip
def test_fast_equals_plain_in_float32(name, cls, placement, device):
    assert_close_trajectory_in_float32(tiny_model(name, "float32", device), cls, placement)


@pytest.mark.parametrize("cls", ALL)
def test_fast_equals_plain_with_an_untied_head(cls):
    """roberta-large's published head: the decoder is its own matrix, on the side path alone."""
    model = tiny_model("tiny-roberta", "float32", "cpu", "model.tie_word_embeddings=false")
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is not emb.weight
    strategy = attach(make_opt(cls, model), model).strategy
    if cls is not MeZO:  # LOZO's side path (MeZO's fast step fuses SGD instead)
        assert [head] in strategy.side.values() and [emb] in strategy.side.values()
    assert_close_trajectory_in_float32(model, cls, "auto")


def assert_close_trajectory_in_float32(model: nn.Module, cls, placement: str) -> None:
    """Three steps, fast and plain. g = Δloss / 2ε carries the float32 rounding of the losses
    times 1/2ε, so the updates agree to about 1e-3 of their size; ε = 1e-2 keeps that well
    inside the tolerance."""
    (lp, wp), (lf, wf) = (trajectory(model, cls, f, steps=3, eps=1e-2) for f in (None, placement))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-5, atol=1e-5)
    for a, b in zip(wf, wp, strict=True):
        moved = (b - start).abs().max()
        assert moved > 1e-3  # the weights really moved
        assert (a - b).abs().max() < 1e-3 * moved


def assert_same_trajectory(model: nn.Module, cls, placement: str, steps: int, named=True) -> None:
    """Fast and plain give the same losses and weights after every step, in float64."""
    (lp, wp), (lf, wf) = (trajectory(model, cls, f, steps, named=named) for f in (None, placement))
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-12, atol=0)
    for a, b in zip(wf, wp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(wf[-1], wf[0])


TRAJECTORIES = [(c, p) for c in ALL for p in PLACEMENTS if c is not MeZO or p == "auto"]


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize(("cls", "placement"), TRAJECTORIES)
def test_trajectories_identical_in_float64(cls, named, placement):
    """Six steps (interval 4: V is redrawn at step 4, LOZO-M carries its momentum into it)."""
    assert_same_trajectory(small_opt(), cls, placement, 6, named)


@pytest.mark.slow
@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize(("cls", "placement"), TRAJECTORIES)
def test_fifty_step_trajectories_identical_in_float64(cls, named, placement):
    assert_same_trajectory(small_opt(), cls, placement, 50, named)


@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_resume_mid_run_discards_the_draws_made_ahead(cls):
    """The engine draws step t+1's factors during step t; loading a state from another step
    (or another seed) must not use them."""
    model = small_opt()
    opt = make_opt(cls, model)
    attach(opt, model)
    ids = batch(model)

    def run(steps: int) -> list[torch.Tensor]:
        for _ in range(steps):
            opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        return [p.detach().clone() for p in model.parameters()]

    run(3)  # V is redrawn at step 4 (interval 4): the resumed run crosses a refresh
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    first = run(3)
    model.load_state_dict(saved[0])
    opt.load_state_dict(copy.deepcopy(saved[1]))
    again = run(3)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_padded_v_is_made_once_per_interval_and_equals_v(cls):
    """V is padded for x·V once per interval, though the draws made ahead give an equal but
    distinct V tensor every other step (padding it anew each step is a launch per matrix)."""
    model = small_opt()
    opt = make_opt(cls, model)  # interval 4
    strategy = attach(opt, model).strategy
    ids = batch(model)
    index = next(iter(strategy.side))
    padded = []
    for _ in range(6):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        padded.append(strategy.padded_v[index][1])
        v = opt.state[dict((i, p) for i, _, p in opt.indexed_params())[index]]["V"]
        assert torch.equal(padded[-1][:, : opt.rank], v)
        assert not padded[-1][:, opt.rank :].any()
    assert all(x is padded[0] for x in padded[:4])
    assert padded[4] is not padded[0] and padded[5] is padded[4]


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-roberta"])
@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_side_path_weights_bit_identical_during_both_evaluations(name, cls):
    model = tiny_model(name, "float32")
    opt = make_opt(cls, model)
    strategy = attach(opt, model, "side").strategy
    side = [p for i, _, p in opt.indexed_params() if i in strategy.side]
    ids = batch(model)
    for _ in range(2):
        before = [p.clone() for p in side]
        seen = []

        def closure(before=before, seen=seen):
            assert all(torch.equal(p, q) for p, q in zip(side, before, strict=True))
            seen.append(model(input_ids=ids, labels=ids).loss)
            return seen[-1]

        opt.step(closure)
        assert len(seen) == 2 and seen[0] != seen[1]  # the side path did perturb the loss
    assert not any("forward" in vars(m) for m in model.modules())  # forwards restored


def test_auto_placement_moves_a_linear_in_place_when_its_pass_is_cheaper():
    """T tokens: in place iff T·(n + 2m) > 2mn. small_opt at 30 tokens: the 32×32 projections
    (threshold 21.3) and fc1 64×32 (25.6) go in place, fc2 32×64 (32) and the tied embedding /
    LM head stay on the side path; at 20 tokens all stay there."""
    model = small_opt()
    opt = make_opt(LOZO, model)
    strategy = attach(opt, model).strategy
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = {i: by_id[id(p)] for i, _, p in opt.indexed_params()}
    for length, expected in (
        (10, {"q_proj", "k_proj", "v_proj", "out_proj", "fc1"}),
        (20 // 3, set()),
    ):
        ids = batch(model)[:, :length]
        seen = []

        def closure(ids=ids, seen=seen):
            loss = model(input_ids=ids, labels=ids).loss
            seen.append({names[i].split(".")[-2] for i in strategy.in_place})
            return loss

        opt.step(closure)
        assert seen == [expected, expected]
        assert not strategy.in_place  # reset after the step
        assert {names[i].split(".")[-2] for i in opt.last_placement().at_plus} == expected
    with pytest.raises(ValueError, match="placement='fastest' is not one of auto, side, in_place"):
        FastEngine(opt, model, placement="fastest")


def test_side_path_covers_opt_and_roberta_module_types(caplog):
    expected = {
        "tiny-opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "embed_tokens"},
        "tiny-roberta": {
            "query", "key", "value", "dense", "word_embeddings", "position_embeddings",
            "token_type_embeddings",
        },
    }  # fmt: skip
    for name, kinds in expected.items():
        model = tiny_model(name, "float32")
        opt = make_opt(LOZO, model)
        with caplog.at_level(logging.INFO, logger="lozo_exp.optim.engine"):
            side = attach(opt, model).strategy.side
        modules = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        covered = {modules[id(m)] for ms in side.values() for m in ms}
        assert kinds <= covered, kinds - covered
        # The tied LM head shares the input embedding's weight: both modules get the term.
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        assert head.weight is emb.weight
        (tied,) = [ms for ms in side.values() if emb in ms]
        assert head in tied
        # Every matrix is on the side path except OPT's positional embedding (custom forward).
        matrices = [i for i, _, p in opt.indexed_params() if p.dim() == 2]
        missing = [i for i in matrices if i not in side]
        assert len(missing) == (1 if name == "tiny-opt" else 0)
    assert "model.decoder.embed_positions.weight" in caplog.text


@pytest.mark.parametrize("cls", ALL)
def test_non_finite_loss_restores_and_skips_the_update(cls):
    model = small_opt()
    opt = make_opt(cls, model)
    attach(opt, model)
    ids = batch(model)
    for _ in range(4):  # state made (LOZO-M), and the skipped step starts an interval (new V)
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    start = [p.clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    losses = iter([model(input_ids=ids, labels=ids).loss, torch.tensor(float("nan"))])
    opt.step(lambda: next(losses))
    assert opt.projected_grad != opt.projected_grad  # NaN
    for p, q in zip(model.parameters(), start, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for k, kept in state["state"].items():  # the planned update changed no state
        assert kept.keys() == after["state"][k].keys()
        for name, value in kept.items():
            torch.testing.assert_close(after["state"][k][name], value, rtol=0, atol=0)


class HeavyBallMeZO(MeZO):
    """MeZO with momentum on z: an estimator whose update direction is not g·z, so the engine
    cannot fold it into the fused pass and replays full-size draws one tensor at a time."""

    def prepare_update(self, entries, factors):
        directions, scale = super().prepare_update(entries, factors)
        ms = [torch.empty_like(z) for z, _ in directions]

        def finish(g):
            scale(g)
            for (_, p), (gz, _), m in zip(entries, directions, ms, strict=True):
                old = self.state[p].get("m")
                m.copy_(gz if old is None else 0.5 * old + gz)
                self.state[p]["m"] = m

        return [(m, None) for m in ms], finish


class RademacherZO(ZeroOrderOptimizer):
    """A new estimator written against the public interface alone: ZO-SGD along random signs,
    d = sign(z) of a keyed Gaussian draw per tensor."""

    def draw(self, entries, step):
        zs = self.randn([(p, tuple(p.shape), i, "z") for i, p in entries], step)
        return [(z.sign(), None) for z in zs]


class BlockSparseZO(ZeroOrderOptimizer):
    """A new low-rank estimator, public interface alone: each matrix moves along ``k`` of its
    columns, chosen anew every step: d = U·Vᵀ with U Gaussian (m×k) and V one-hot (n×k);
    1-D tensors along a full z. The engine runs it on the side path."""

    low_rank = True
    k = 3

    def draw(self, entries, step):
        shapes = [(p.size(0), self.k) if p.dim() >= 2 else tuple(p.shape) for _, p in entries]
        kinds = ["U" if p.dim() >= 2 else "z" for _, p in entries]
        draws = [(p, s, i, c) for (i, p), s, c in zip(entries, shapes, kinds, strict=True)]
        zs = self.randn(draws, step)
        out = []
        for (i, p), z in zip(entries, zs, strict=True):
            v = None
            if p.dim() >= 2:
                gen = torch.Generator().manual_seed(draw_key(self.seed, step, i, "V"))
                columns = torch.randperm(p.numel() // p.size(0), generator=gen)[: self.k]
                v = torch.zeros(p.numel() // p.size(0), self.k, dtype=p.dtype, device=p.device)
                v[columns, torch.arange(self.k)] = 1.0
            out.append((z, v))
        return out


class OwnVLOZO(LOZO):
    """LOZO whose D carries its own copy of V: the engine cannot fold the restore of an
    in-place matrix into its update, and restores it before the loss sync instead."""

    def prepare_update(self, entries, factors):
        directions, finish = super().prepare_update(entries, factors)
        return [(d, None if v is None else v.clone()) for d, v in directions], finish


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("cls", [HeavyBallMeZO, RademacherZO, BlockSparseZO, OwnVLOZO])
def test_engine_equals_plain_for_estimators_added_through_the_public_interface(cls, placement):
    if not cls.low_rank and placement != "auto":
        pytest.skip("no side path: placement does not apply")
    assert_same_trajectory(small_opt(), cls, placement, 6)


def test_toy_estimators_draw_what_they_say():
    """The toys are what their names say (so the test above covers what it claims)."""
    model = small_opt()
    entries = [(i, p) for i, _, p in make_opt(MeZO, model).indexed_params()]
    (i, w), (j, b) = (
        next(e for e in entries if e[1].dim() == 2),
        next(e for e in entries if e[1].dim() == 1),
    )
    ((sign, _),) = RademacherZO(model.parameters(), lr=0.1).draw([(i, w)], 0)
    assert set(sign.unique().tolist()) == {-1.0, 1.0}
    opt = BlockSparseZO(model.parameters(), lr=0.1)
    ((u, v), (z, none)) = opt.draw([(i, w), (j, b)], 5)
    assert u.shape == (w.size(0), 3) and none is None and z.shape == b.shape
    assert torch.equal(v.sum(0), torch.ones(3)) and v.sum(1).max() == 1  # 3 distinct columns
    assert not torch.equal(v, opt.draw([(i, w)], 6)[0][1])  # chosen anew every step


def test_engine_is_attached_explicitly():
    model = small_opt()
    opt = make_opt(LOZO, model)
    engine = FastEngine(opt, model)
    assert opt.engine is None  # building an engine attaches nothing
    assert opt.use_engine(engine) is engine and opt.engine is engine
    assert isinstance(opt, Estimator)
    assert type(engine.strategy).__name__ == "LowRankSidePath"
    assert type(FastEngine(make_opt(MeZO, model), model).strategy).__name__ == "FusedSGD"
    heavy = FastEngine(make_opt(HeavyBallMeZO, model), model)
    assert type(heavy.strategy).__name__ == "ReplayedDraws"


def test_method_engine_selects_the_path_and_is_validated():
    model = small_opt()
    fast = build_method(compose_config("method=lozo")).build_optimizer(model, seed=0)
    assert isinstance(fast.engine, FastEngine)
    plain = build_method(compose_config("method=lozo", "method.engine=plain"))
    plain = plain.build_optimizer(model, seed=0)
    assert plain.engine is None
    with pytest.raises(ConfigError, match=r"method.engine='turbo' is not one of fast, plain"):
        validate(compose_config("method.engine=turbo"))


REPLAYS = [(c, p) for c in ALL for p in [None, *PLACEMENTS] if c is not MeZO or p != "side"]


@pytest.mark.parametrize(("cls", "placement"), [*REPLAYS, (HeavyBallMeZO, "auto")])
def test_a_logged_run_replays_bit_identically_without_the_model(cls, placement):
    """Replaying each step from its losses, lr and placement (the closure evaluates nothing)
    runs the same weight passes: weights and optimizer state are bit-identical, in float32,
    through placements that change from step to step (a step whose matrices go in place only
    at θ−εd included), a V refresh (interval 4) and a skipped step (loss2 NaN)."""
    model = small_opt().float()
    live, replica = copy.deepcopy(model), copy.deepcopy(model)
    opt, again = make_opt(cls, live), make_opt(cls, replica)
    if placement:
        attach(opt, live, placement), attach(again, replica, placement)
    ids = batch(live)
    lengths = [(10, 10), (6, 6), (6, 10), (10, 10), (10, 10), (6, 6), (10, 10)]
    logged = []
    for k, (first, second) in enumerate(lengths):
        calls = iter([(ids[:, :first], 1.0), (ids[:, :second], float("nan") if k == 5 else 1.0)])

        def closure(calls=calls):
            x, scale = next(calls)
            return live(input_ids=x, labels=x).loss * scale

        for group in opt.param_groups:
            group["lr"] = 1e-2 / (k + 1)
        opt.step(closure)
        logged.append((*opt.last_losses, opt.last_placement(), 1e-2 / (k + 1)))
    assert opt.projected_grad == opt.projected_grad and logged[5][1] != logged[5][1]  # NaN
    for loss1, loss2, taken, lr in logged:
        for group in again.param_groups:
            group["lr"] = lr
        again.replay_step(loss1, loss2, taken)
    for p, q in zip(live.parameters(), replica.parameters(), strict=True):
        assert torch.equal(p, q)
    for kept, replayed in zip(opt.state.values(), again.state.values(), strict=True):
        assert kept.keys() == replayed.keys()
        assert all(torch.equal(v, replayed[k]) for k, v in kept.items() if torch.is_tensor(v))
    placements = [taken for *_, taken, _ in logged]
    if placement == "auto" and cls.low_rank:
        assert placements[1] == ((), ()) and placements[0].at_plus and not placements[0].at_minus
        assert placements[2].at_minus and not placements[2].at_plus
    elif not cls.low_rank or placement is None:
        assert set(placements) == {None}
        with pytest.raises(ValueError, match="moves every tensor in place"):
            again.replay_step(0.0, 0.0, Placement((1,), ()))
