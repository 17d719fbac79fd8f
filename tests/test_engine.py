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
from lozo_exp.optim import LOZO, LOZOM, FastEngine, MeZO, ZeroOrderOptimizer, philox

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
    kw = {} if cls is MeZO else {"rank": 2, "interval": 4}
    params = model.named_parameters() if named else model.parameters()
    return cls(params, lr=1e-2, eps=eps, weight_decay=0.1, seed=7, **kw)


def batch(model: nn.Module, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.get_input_embeddings().num_embeddings, (3, 10), generator=gen)
    return ids.to(next(model.parameters()).device)


def trajectory(
    model: nn.Module, cls, fast: bool, steps: int, eps=1e-3, named=True
) -> tuple[list, list]:
    """Losses and flattened weights after each step, on a fresh copy of ``model``."""
    model = copy.deepcopy(model)
    opt = make_opt(cls, model, eps, named)
    if fast:
        FastEngine(opt, model)
    losses, weights = [], []
    for k in range(steps):
        ids = batch(model, k)
        opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        losses.append(opt.last_losses)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return losses, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-opt", "tiny-roberta"])
@pytest.mark.parametrize("cls", ALL)
def test_fast_equals_plain_in_float32(name, cls, device):
    # g = Δloss / 2ε carries the float32 rounding of the losses times 1/2ε, so the updates
    # agree to about 1e-3 of their size; ε = 1e-2 keeps that well inside the tolerance.
    model = tiny_model(name, "float32", device)
    (lp, wp), (lf, wf) = (trajectory(model, cls, f, steps=3, eps=1e-2) for f in (False, True))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-5, atol=1e-5)
    for a, b in zip(wf, wp, strict=True):
        moved = (b - start).abs().max()
        assert moved > 1e-3  # the weights really moved
        assert (a - b).abs().max() < 1e-3 * moved


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("cls", ALL)
def test_fifty_step_trajectories_identical_in_float64(cls, named):
    model = small_opt()
    (lp, wp), (lf, wf) = (trajectory(model, cls, f, 50, named=named) for f in (False, True))
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lp), rtol=1e-12, atol=0)
    for a, b in zip(wf, wp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-roberta"])
@pytest.mark.parametrize("cls", [LOZO, LOZOM])
def test_side_path_weights_bit_identical_during_both_evaluations(name, cls):
    model = tiny_model(name, "float32")
    opt = make_opt(cls, model)
    engine = FastEngine(opt, model)
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
    assert not any(m._forward_hooks for m in model.modules())  # hooks gone after the step


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
    start = [p.clone() for p in model.parameters()]
    opt = make_opt(cls, model)
    FastEngine(opt, model)
    ids = batch(model)
    losses = iter([model(input_ids=ids, labels=ids).loss, torch.tensor(float("nan"))])
    opt.step(lambda: next(losses))
    assert opt.projected_grad != opt.projected_grad  # NaN
    for p, q in zip(model.parameters(), start, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-15)


def test_method_engine_selects_the_path_and_is_validated():
    model = small_opt()
    fast = build_optimizer(model, compose_config("method=lozo").method, seed=0)
    assert isinstance(fast.engine, FastEngine)
    plain = build_optimizer(model, compose_config("method=lozo", "method.engine=plain").method, 0)
    assert plain.engine is None
    with pytest.raises(ConfigError, match=r"method.engine='turbo' is not one of fast, plain"):
        validate(compose_config("method.engine=turbo"))


@pytest.mark.skipif(not philox.available(torch.device("cuda")), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_draws_are_gaussian_and_the_fused_pass_matches_them(dtype):
    z = philox.normal((3, 1_000_003), 12345, dtype, torch.device("cuda")).float()
    assert abs(z.mean().item()) < 3e-3 and abs(z.std().item() - 1) < 3e-3
    assert not torch.equal(z, philox.normal(z.shape, 12346, dtype, z.device).float())
    p = torch.randn(z.shape, device="cuda", dtype=dtype)
    expected = 0.9 * p.float() + 0.25 * z
    philox.axpbz_(p, 12345, 0.9, 0.25)
    torch.testing.assert_close(p.float(), expected, rtol=1e-3 if dtype == torch.float16 else 1e-6,
                               atol=1e-3 if dtype == torch.float16 else 1e-6)  # fmt: skip
