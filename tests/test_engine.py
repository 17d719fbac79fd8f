"""The fast engine computes the plain path's losses and updates; side-path weights never move."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import compose_config
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from lozo_exp.config import ConfigError, validate
from lozo_exp.methods import build_optimizer
from lozo_exp.models import load_model, load_tokenizer
from lozo_exp.optim import LOZO, LOZOM, FastEngine, MeZO, ZeroOrderOptimizer, kernels

ALL = [LOZO, LOZOM, MeZO]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(name: str, dtype: str, device: str = "cpu") -> nn.Module:
    cfg = compose_config(f"model={name}", f"model.dtype={dtype}")
    torch.manual_seed(0)
    return load_model(cfg.model, load_tokenizer(cfg.model)).to(device).eval()


def small_opt() -> nn.Module:
    """An OPT with a 256-token vocabulary: 50 float64 steps in about a second."""
    config = OPTConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4
    )
    torch.manual_seed(0)
    return OPTForCausalLM(config).double().eval()


def make_opt(
    cls: type[ZeroOrderOptimizer], model: nn.Module, eps=1e-3, named=True
) -> ZeroOrderOptimizer:
    """Named parameters: no decay on biases and LayerNorms; unnamed: every tensor decays."""
    kw = {} if issubclass(cls, MeZO) else {"rank": 2, "interval": 4}
    params = model.named_parameters() if named else model.parameters()
    return cls(params, lr=1e-2, eps=eps, weight_decay=0.1, seed=7, **kw)


def batch(model: nn.Module, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.get_input_embeddings().num_embeddings, (3, 10), generator=gen)
    return ids.to(next(model.parameters()).device)


def trajectory(
    model: nn.Module, cls, fast: str | None, steps: int, eps=1e-3, named=True
) -> tuple[list, list]:
    """Losses and flattened weights after each step, on a fresh copy of ``model``; ``fast`` is
    the engine's placement (None: the plain path)."""
    model = copy.deepcopy(model)
    opt = make_opt(cls, model, eps, named)
    if fast:
        FastEngine(opt, model, placement=fast)
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
    # g = Δloss / 2ε carries the float32 rounding of the losses times 1/2ε, so the updates
    # agree to about 1e-3 of their size; ε = 1e-2 keeps that well inside the tolerance.
    model = tiny_model(name, "float32", device)
    (lp, wp), (lf, wf) = (trajectory(model, cls, f, steps=3, eps=1e-2) for f in (None, placement))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-5, atol=1e-5)
    for a, b in zip(wf, wp, strict=True):
        moved = (b - start).abs().max()
        assert moved > 1e-3  # the weights really moved
        assert (a - b).abs().max() < 1e-3 * moved


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("cls", ALL)
def test_fifty_step_trajectories_identical_in_float64(cls, named, placement):
    if cls is MeZO and placement != "auto":
        pytest.skip("MeZO has no side path")
    model = small_opt()
    runs = (trajectory(model, cls, f, 50, named=named) for f in (None, placement))
    (lp, wp), (lf, wf) = runs
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-12, atol=0)
    for a, b in zip(wf, wp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_resume_mid_run_discards_the_draws_made_ahead(cls):
    """The engine draws step t+1's factors during step t; loading a state from another step
    (or another seed) must not use them."""
    model = small_opt()
    opt = make_opt(cls, model)
    FastEngine(opt, model)
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
    distinct V tensor every other step (padding it anew each step cost 240 launches on OPT-13B)."""
    model = small_opt()
    opt = make_opt(cls, model)  # interval 4
    engine = FastEngine(opt, model)
    ids = batch(model)
    index = next(iter(engine.side))
    padded = []
    for _ in range(6):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        padded.append(engine._padded_v[index][1])
        v = opt.state[dict((i, p) for i, _, p in opt._indexed_params())[index]]["V"]
        assert torch.equal(padded[-1][:, : opt.rank], v)
        assert not padded[-1][:, opt.rank :].any()
    assert all(x is padded[0] for x in padded[:4])
    assert padded[4] is not padded[0] and padded[5] is padded[4]


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-roberta"])
@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_side_path_weights_bit_identical_during_both_evaluations(name, cls):
    model = tiny_model(name, "float32")
    opt = make_opt(cls, model)
    engine = FastEngine(opt, model, placement="side")
    side = [p for i, _, p in opt._indexed_params() if i in engine.side]
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
    engine = FastEngine(opt, model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = {i: by_id[id(p)] for i, _, p in opt._indexed_params()}
    for length, expected in (
        (10, {"q_proj", "k_proj", "v_proj", "out_proj", "fc1"}),
        (20 // 3, set()),
    ):
        ids = batch(model)[:, :length]
        seen = []

        def closure(ids=ids, seen=seen):
            loss = model(input_ids=ids, labels=ids).loss
            seen.append({names[i].split(".")[-2] for i in engine.in_place})
            return loss

        opt.step(closure)
        assert seen == [expected, expected]
        assert engine.in_place == set()  # reset after the step
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
            engine = FastEngine(opt, model)
        modules = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        covered = {modules[id(m)] for ms in engine.side.values() for m in ms}
        assert kinds <= covered, kinds - covered
        # The tied LM head shares the input embedding's weight: both modules get the term.
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        assert head.weight is emb.weight
        (tied,) = [ms for ms in engine.side.values() if emb in ms]
        assert head in tied
        # Every matrix is on the side path except OPT's positional embedding (custom forward).
        matrices = [i for i, _, p in opt._indexed_params() if p.dim() == 2]
        missing = [i for i in matrices if i not in engine.side]
        assert len(missing) == (1 if name == "tiny-opt" else 0)
    assert "model.decoder.embed_positions.weight" in caplog.text


@pytest.mark.parametrize("cls", ALL)
def test_non_finite_loss_restores_and_skips_the_update(cls):
    model = small_opt()
    opt = make_opt(cls, model)
    FastEngine(opt, model)
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

    def _prepare_update(self, entries):
        directions, scale = super()._prepare_update(entries)
        ms = [torch.empty_like(z) for z, _ in directions]

        def finish(g):
            scale(g)
            for (_, p), (gz, _), m in zip(entries, directions, ms, strict=True):
                old = self.state[p].get("m")
                m.copy_(gz if old is None else 0.5 * old + gz)
                self.state[p]["m"] = m

        return [(m, None) for m in ms], finish


def test_engine_equals_plain_for_an_estimator_with_its_own_update_direction():
    model = small_opt()
    runs = [trajectory(model, HeavyBallMeZO, placement, 6) for placement in (None, "auto")]
    (lp, wp), (lf, wf) = runs
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-12, atol=0)
    for a, b in zip(wf, wp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(wf[-1], wf[0])


def test_method_engine_selects_the_path_and_is_validated():
    model = small_opt()
    fast = build_optimizer(model, compose_config("method=lozo").method, seed=0)
    assert isinstance(fast.engine, FastEngine)
    plain = build_optimizer(model, compose_config("method=lozo", "method.engine=plain").method, 0)
    assert plain.engine is None
    with pytest.raises(ConfigError, match=r"method.engine='turbo' is not one of fast, plain"):
        validate(compose_config("method.engine=turbo"))


@pytest.mark.skipif(not kernels.available(torch.device("cuda")), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_lowrank_update_matches_addmm(dtype):
    gen = torch.Generator("cuda").manual_seed(0)
    w, a, b = (torch.randn(s, device="cuda", generator=gen).to(dtype)
               for s in ((1000, 3000), (1000, 3), (3000, 3)))  # fmt: skip
    expected = (0.9 * w.double() + 0.5 * a.double() @ b.double().T).to(dtype)
    kernels.lowrank_add_(w, a, b, 0.5, 0.9)
    torch.testing.assert_close(w, expected)  # float32 accumulation, one rounding
    wide = torch.cat([a, torch.ones_like(a)], 1)  # a column slice of a wider factor
    w2 = expected.clone()
    kernels.lowrank_add_(w2, wide[:, :3], b, -0.5)
    kernels.lowrank_add_(expected, a, b, -0.5)
    assert torch.equal(w2, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_add_takes_batched_outputs_and_a_padded_factor(device):
    """The side path's call: a Linear's (B, L, m) output and x·V on a padded V (B, L, 8): only
    the first r columns count, and the result is the 2-D one (a mismatched a is refused)."""
    gen = torch.Generator(device).manual_seed(0)
    out, xv, u = (torch.randn(s, device=device, generator=gen)
                  for s in ((2, 5, 300), (2, 5, 8), (300, 2)))  # fmt: skip
    expected = out.view(10, 300) + 0.5 * xv.view(10, 8)[:, :2] @ u.T
    kernels.lowrank_add_(out, xv, u, 0.5)
    torch.testing.assert_close(out.view(10, 300), expected)
    if kernels.available(out.device):
        with pytest.raises(ValueError, match="does not match"):
            kernels.lowrank_add_(out, xv[:1], u, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shapes", [[(1000, 3000), (17, 5), (4096, 513), (1, 1)], [(64, 512), (5, 4096), (700, 1024)]]
)  # widths not all multiples of 16, and all (the kernel then loads W's rows as vectors)
def test_many_lowrank_updates_in_one_launch_equal_one_at_a_time(shapes, device):
    """Planned before the factors hold their values (the engine plans before the loss sync):
    the launch reads the factors as they are when it runs."""
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    ws = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    factors = [
        tuple(torch.randn(k, 2, device=device, generator=gen).to(dtype) for k in shape)
        for shape in shapes
    ]
    alphas, betas = [0.5, -1.0, 2.0, 0.25][: len(shapes)], [0.9, 1.0, 0.5, 1.0][: len(shapes)]
    launch = kernels.plan_lowrank_add_many(ws, factors, alphas, betas)
    torch._foreach_mul_([a for a, _ in factors], 3.0)
    expected = [w.clone() for w in ws]
    for w, (a, b), alpha, beta in zip(expected, factors, alphas, betas, strict=True):
        kernels.lowrank_add_(w, a, b, alpha, beta)
    launch()
    for w, e in zip(ws, expected, strict=True):
        assert torch.equal(w, e)


@pytest.mark.skipif(not kernels.available(torch.device("cuda")), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_draws_are_gaussian_and_the_fused_pass_matches_them(dtype):
    z = kernels.normal((3, 1_000_003), 12345, dtype, torch.device("cuda")).float()
    assert abs(z.mean().item()) < 3e-3 and abs(z.std().item() - 1) < 3e-3
    assert not torch.equal(z, kernels.normal(z.shape, 12346, dtype, z.device).float())
    p = torch.randn(z.shape, device="cuda", dtype=dtype)
    expected = 0.9 * p.float() + 0.25 * z
    kernels.axpbz_many_([p], [12345], [0.9], [0.25])
    torch.testing.assert_close(p.float(), expected, rtol=1e-3 if dtype == torch.float16 else 1e-6,
                               atol=1e-3 if dtype == torch.float16 else 1e-6)  # fmt: skip


@pytest.mark.skipif(not kernels.available(torch.device("cuda")), reason="needs CUDA and Triton")
@pytest.mark.parametrize(
    "shapes", [[(5,), (3, 4097), (1,), (2, 8192), (7, 3)], [(32, 512), (12304,), (16,), (64, 64)]]
)  # sizes not all multiples of 16, and all (the fused pass then moves vectors)
def test_draws_made_together_equal_the_fused_pass_draw_of_each_tensor(shapes):
    keys = [11, 2**62 + 5, 13, 14, 15][: len(shapes)]
    many = kernels.normal_many(shapes, keys, torch.float32, torch.device("cuda"))
    ps = [torch.zeros(shape, device="cuda") for shape in shapes]
    ones, zeros = [1.0] * len(shapes), [0.0] * len(shapes)
    kernels.axpbz_many_(ps, keys, zeros, ones)  # p = z, every tensor in one launch
    for shape, key, z, p in zip(shapes, keys, many, ps, strict=True):
        assert torch.equal(z, kernels.normal(shape, key, torch.float32, z.device))
        assert torch.equal(p, z)
        alone = torch.zeros(shape, device="cuda")
        kernels.axpbz_many_([alone], [key], [0.0], [1.0])
        assert torch.equal(alone, z)
    assert len({z.flatten()[0].item() for z in many}) == len(many)  # unrelated streams
