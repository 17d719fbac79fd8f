"""Zeroth-order optimizers on small float64 problems."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

from lozo_exp.optim import LOZO, LOZOM, MeZO, ZeroOrderOptimizer, default_param_groups

ALL = [MeZO, LOZO, LOZOM]
M, N_COLS = 6, 8  # the matrix param is (6, 2, 4): viewed as 6×8


def make_params(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(M, 2, 4, generator=gen, dtype=torch.float64).to(dtype),
        torch.randn(5, generator=gen, dtype=torch.float64).to(dtype),
    ]


def flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params])


def spd_matrix(dim: int, seed: int = 1) -> torch.Tensor:
    b = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return b @ b.T / dim + torch.eye(dim, dtype=torch.float64)


class Quadratic:
    """f(θ) = ½ θᵀAθ; records the flattened params at every call."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.a = spd_matrix(sum(p.numel() for p in params))
        self.seen: list[torch.Tensor] = []

    def grad(self) -> torch.Tensor:
        return self.a @ flat(self.params)

    def __call__(self) -> torch.Tensor:
        x = flat(self.params).double()
        self.seen.append(x.clone())
        return 0.5 * x @ self.a @ x


def make_opt(cls: type[ZeroOrderOptimizer], params, **kw) -> ZeroOrderOptimizer:
    if cls is MeZO:
        kw.pop("interval", None)
    else:
        kw.setdefault("interval", 3)
    return cls(params, **kw)


def run(cls, steps: int, seed: int = 0, **kw) -> list[torch.Tensor]:
    params = make_params()
    f = Quadratic(params)
    opt = make_opt(cls, params, lr=1e-2, seed=seed, **kw)
    traj = []
    for _ in range(steps):
        opt.step(f)
        traj.append(flat(params).clone())
    return traj


@pytest.mark.parametrize("cls", ALL)
def test_perturbations_are_symmetric_and_restored(cls):
    params = make_params()
    f = Quadratic(params)
    opt = make_opt(cls, params, lr=0.0, eps=1e-3)
    theta0 = flat(params).clone()
    for _ in range(4):
        opt.step(f)
    for k in range(4):
        plus, minus = f.seen[2 * k] - theta0, f.seen[2 * k + 1] - theta0
        assert plus.abs().max() > 1e-4  # θ+εd really moved
        torch.testing.assert_close(minus, -plus, rtol=0, atol=1e-12)
    torch.testing.assert_close(flat(params), theta0, rtol=0, atol=1e-12)
    assert opt.projected_grad is not None and len(opt.last_losses) == 2


def test_projected_grad_none_before_first_step():
    opt = MeZO(make_params(), lr=0.1)
    assert opt.projected_grad is None and opt.last_losses is None


def _steps(cls, steps: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per step: Δθ, the perturbation direction d read off θ+εd, and g."""
    params = make_params()
    f = Quadratic(params)
    opt = make_opt(cls, params, eps=1e-3, **kw)
    out = []
    for _ in range(steps):
        before = flat(params).clone()
        f.seen.clear()
        opt.step(f)
        out.append((flat(params) - before, (f.seen[0] - before) / opt.eps, opt.projected_grad))
    return out


def matrix(x: torch.Tensor) -> torch.Tensor:
    return x[: M * N_COLS].view(M, N_COLS)


def test_lozo_low_rank_and_lazy_row_space():
    rank, interval = 2, 3
    deltas = [
        matrix(delta)
        for delta, _, _ in _steps(LOZO, interval + 1, lr=1e-2, rank=rank, interval=interval)
    ]
    _, s, vh = torch.linalg.svd(deltas[0])
    assert s[rank - 1] > 1e-8 and s[rank:].max() < 1e-12 * s[0]
    proj = vh[:rank].T @ vh[:rank]  # projector onto the row space span(V) of step 0
    for k in range(1, interval + 1):
        dw = deltas[k]
        s = torch.linalg.svdvals(dw)
        assert s[rank:].max() < 1e-12 * s[0]
        residual = (dw - dw @ proj).norm() / dw.norm()
        if k < interval:
            assert residual < 1e-10, k
        else:
            assert residual > 0.1  # V refreshed at step ν


@pytest.mark.parametrize("cls", [LOZO, MeZO])
def test_update_uses_the_perturbation_direction_on_every_step(cls):
    # The published LOZO code draws a different U (and z) for the update on refresh steps.
    steps = _steps(cls, 4, lr=1e-2, interval=3)
    for k in (0, 1, 3):  # refresh, ordinary, refresh
        delta, d, g = steps[k]
        torch.testing.assert_close(delta / (-1e-2 * g), d, rtol=0, atol=1e-8)


@pytest.mark.parametrize("cls", [MeZO, LOZO])
def test_every_step_is_a_descent_step_on_a_quadratic(cls):
    params = make_params()
    f = Quadratic(params)
    opt = make_opt(cls, params, lr=1e-3, eps=1e-6, interval=2)
    for _ in range(20):
        grad, before = f.grad(), flat(params).clone()
        opt.step(f)
        assert grad @ (flat(params) - before) <= 1e-12


@pytest.mark.parametrize("cls", [MeZO, LOZO])
def test_projected_grad_is_the_directional_derivative(cls):
    params = make_params()
    f = Quadratic(params)
    opt = make_opt(cls, params, lr=0.0, eps=1e-3)
    for _ in range(3):
        grad, before = f.grad(), flat(params).clone()
        f.seen.clear()
        opt.step(f)
        d = (f.seen[0] - before) / opt.eps
        # exact up to rounding for a quadratic (the O(ε²) term vanishes)
        assert abs(opt.projected_grad - grad @ d) < 1e-7 * grad.norm() * d.norm()


def test_projected_grad_error_is_second_order_in_eps():
    def err(eps: float) -> float:
        (x,) = params = [torch.linspace(-1, 1, 7, dtype=torch.float64)]
        opt = MeZO(params, lr=0.0, eps=eps)
        seen = []

        def closure():
            seen.append(x.clone())
            return (x**3).sum()

        opt.step(closure)
        d = (seen[0] - x) / eps
        return abs(opt.projected_grad - (3 * x**2) @ d)

    assert 50 < err(1e-2) / err(1e-3) < 200


def test_lozom_takes_beta_by_keyword_only():
    """LOZOM's positional arguments are LOZO's: a 7th positional value is refused, not taken
    as a beta (or a seed) by its place."""
    with pytest.raises(TypeError, match="positional"):
        LOZOM(make_params(), 1e-3, 1e-3, 0.0, 2, 50, 0.5)
    assert LOZOM(make_params(), 1e-3, beta=0.5, seed=3).beta == 0.5


def test_lozom_factor_momentum():
    beta, lr, interval = 0.9, 1e-2, 3
    params = make_params()
    f = Quadratic(params)
    opt = LOZOM(params, lr=lr, eps=1e-3, rank=2, interval=interval, beta=beta)
    w = params[0]

    def factor_u(d: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return d @ v @ torch.linalg.inv(v.T @ v)  # U from d = U·Vᵀ

    for k in range(interval + 1):
        old = {key: t.clone() for key, t in opt.state[w].items() if torch.is_tensor(t)}
        before = flat(params).clone()
        f.seen.clear()
        opt.step(f)
        g, v, buf = opt.projected_grad, opt.state[w]["V"], opt.state[w]["momentum"]
        u = factor_u(matrix((f.seen[0] - before) / opt.eps), v)
        if k == 0:
            expected = g * u
        elif k == interval:
            assert not torch.allclose(v, old["V"])
            assert opt.state[w]["V_start"] == interval  # the interval the stored V belongs to
            expected = beta * old["momentum"] @ (old["V"].T @ v) / N_COLS + (1 - beta) * g * u
        else:
            torch.testing.assert_close(v, old["V"], rtol=0, atol=0)
            expected = beta * old["momentum"] + (1 - beta) * g * u
        torch.testing.assert_close(buf, expected, rtol=0, atol=1e-9)
        torch.testing.assert_close(
            matrix(flat(params) - before), -lr * buf @ v.T, rtol=0, atol=1e-12
        )


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.final_layernorm = nn.LayerNorm(4)
        self.LayerNorm = nn.LayerNorm(4)  # HF RoBERTa spelling
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def test_weight_decay_skips_bias_and_layer_norm():
    model = Named().double()
    groups = default_param_groups(model.named_parameters(), 0.5)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert groups[0]["params"] == [model.proj.weight]
    assert len(groups[1]["params"]) == 7  # proj.bias + 3 × (weight, bias); frozen skipped

    lr, wd = 0.1, 0.5
    opt = MeZO(model.named_parameters(), lr=lr, weight_decay=wd)
    before = {n: p.clone() for n, p in model.named_parameters()}
    opt.step(lambda: 1.0)  # g = 0: only weight decay moves the weights
    for name, p in model.named_parameters():
        factor = 1 - lr * wd if name == "proj.weight" else 1.0
        torch.testing.assert_close(p, factor * before[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", ALL)
def test_same_seed_reproduces_and_global_rng_untouched(cls):
    rng = torch.get_rng_state()
    a, b, c = run(cls, 5, seed=1), run(cls, 5, seed=1), run(cls, 5, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.allclose(a[-1], c[-1])


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_smoke(cls, dtype, atol):
    params = make_params(dtype=dtype)
    start = [p.clone() for p in params]
    opt = make_opt(cls, params, lr=0.0, eps=1e-2)
    losses = [opt.step(lambda: sum((p.float() ** 2).sum() for p in params)) for _ in range(3)]
    assert all(torch.isfinite(torch.as_tensor(x)) for x in losses)
    for p, p0 in zip(params, start, strict=True):
        assert p.dtype == dtype
        # +ε, −2ε, +ε each round to the weight's precision: a few ulps, relative to |θ|.
        rtol = 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(p.float(), p0.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("cls", ALL)
def test_plain_module_with_named_parameters(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    before = [p.clone() for p in model.parameters()]
    opt = cls(model.named_parameters(), lr=1e-2, weight_decay=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    for _ in range(3):
        loss = opt.step(lambda: nn.functional.mse_loss(model(x), y))
        assert torch.isfinite(loss) and loss.grad_fn is None
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("cls", ALL)
def test_resume_is_bit_exact(cls):
    kw = {"lr": 1e-2, "weight_decay": 0.1, "seed": 3}
    params = make_params()
    f = Quadratic(params)
    opt = make_opt(cls, params, **kw)
    for _ in range(4):  # stop mid-interval: V and momentum must come from the checkpoint
        opt.step(f)
    buffer = io.BytesIO()
    torch.save({"params": params, "opt": opt.state_dict()}, buffer)
    for _ in range(4):
        opt.step(f)

    buffer.seek(0)
    ckpt = torch.load(buffer)
    params2 = [p.clone() for p in ckpt["params"]]
    opt2 = make_opt(cls, params2, **{**kw, "seed": 99})
    opt2.load_state_dict(copy.deepcopy(ckpt["opt"]))
    assert (opt2.step_count, opt2.seed) == (4, 3)
    f2 = Quadratic(params2)
    for _ in range(4):
        opt2.step(f2)
    assert all(torch.equal(p, q) for p, q in zip(params, params2, strict=True))


@pytest.mark.parametrize(
    "cls, kw, bad",
    [
        (MeZO, {"lr": -1.0}, -1.0),
        (MeZO, {"lr": 0.1, "eps": 0.0}, 0.0),
        (MeZO, {"lr": 0.1, "weight_decay": -0.5}, -0.5),
        (LOZO, {"lr": 0.1, "rank": 0}, 0),
        (LOZO, {"lr": 0.1, "rank": 1.5}, 1.5),
        (LOZO, {"lr": 0.1, "interval": 0}, 0),
        (LOZOM, {"lr": 0.1, "beta": 1.0}, 1.0),
        (LOZOM, {"lr": 0.1, "beta": -0.1}, -0.1),
    ],
)
def test_bad_arguments(cls, kw, bad):
    name = next(k for k, v in kw.items() if v == bad)
    with pytest.raises(ValueError, match=rf"{name} must be .*{re.escape(repr(bad))}"):
        cls(make_params(), **kw)


def test_step_requires_closure():
    with pytest.raises(ValueError, match="closure"):
        MeZO(make_params(), lr=0.1).step()
