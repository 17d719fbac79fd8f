"""The Triton kernels against torch references, and the fast engine running through them.

Each test runs where it can: ``torch`` (the CPU fallback the kernels' callers use without
Triton), ``cuda`` (the compiled kernels), and ``interpreter``: the kernels on the CPU under
Triton's interpreter, so CI without a GPU still runs kernels.py. Triton reads
``TRITON_INTERPRET=1`` when it is imported, so those run in a process of their own, started by
``test_kernels_in_an_interpreter_process`` (slow tier; needs ``pip install -e '.[kernels-test]'``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_engine import assert_close_trajectory_in_float32
from torch import nn
from torch.nn import functional as F

from lozo_exp.optim import LOZO, LOZOM, MeZO, draw_key, kernels

ROOT = Path(__file__).resolve().parents[1]
TRITON_DEVICES = [
    pytest.param("cuda", id="cuda"),
    pytest.param("interpreter", id="interpreter", marks=pytest.mark.slow),
]
DEVICES = [pytest.param("torch", id="torch"), *TRITON_DEVICES]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Where the kernels (or their torch fallback) run."""
    if request.param == "cuda":
        if not (torch.cuda.is_available() and kernels.available(torch.device("cuda"))):
            pytest.skip("needs CUDA and Triton")
        return torch.device("cuda")
    if (request.param == "interpreter") != kernels.INTERPRETED:
        pytest.skip("the interpreter's tests run in their own process, and only they do")
    return torch.device("cpu")


@pytest.mark.slow
def test_kernels_in_an_interpreter_process():
    """The ``interpreter`` tests of this module, in a process started with TRITON_INTERPRET=1:
    every one must pass (none skipped)."""
    if kernels.INTERPRETED:
        pytest.skip("this is that process")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: pip install -e '.[kernels-test]'")
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the compiled kernels are tested instead")
    select = ["-m", "slow", "-k", "interpreter and not process"]
    command = [sys.executable, "-m", "pytest", __file__, *select, "-q", "-p", "no:cacheprovider"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


triton_only = pytest.mark.parametrize("device", TRITON_DEVICES, indirect=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lowrank_update_matches_the_float64_reference(device, dtype):
    gen = torch.Generator(device).manual_seed(0)
    w, a, b = (torch.randn(s, device=device, generator=gen).to(dtype)
               for s in ((200, 700), (200, 3), (700, 3)))  # fmt: skip
    expected = (0.9 * w.double() + 0.5 * a.double() @ b.double().T).to(dtype)
    kernels.lowrank_add_(w, a, b, 0.5, 0.9)
    torch.testing.assert_close(w, expected)  # float32 accumulation, one rounding
    wide = torch.cat([a, torch.ones_like(a)], 1)  # a column slice of a wider factor
    w2 = expected.clone()
    kernels.lowrank_add_(w2, wide[:, :3], b, -0.5)
    kernels.lowrank_add_(expected, a, b, -0.5)
    assert torch.equal(w2, expected)


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


@pytest.mark.parametrize(
    "shapes", [[(200, 700), (17, 5), (40, 513), (1, 1)], [(64, 512), (5, 4096), (70, 1024)]]
)  # widths not all multiples of 16, and all (the kernel then loads W's rows as vectors)
def test_many_lowrank_updates_in_one_launch_equal_one_at_a_time(shapes, device):
    """Planned before the factors hold their values (the engine plans before the loss sync):
    the launch reads the factors as they are when it runs."""
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
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


@triton_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_draws_are_gaussian_and_the_fused_pass_matches_the_torch_reference(device, dtype):
    n = 3 * 50_003
    z = kernels.normal((3, 50_003), 12345, dtype, device).float()
    # The mean and standard deviation of n draws, within 5 standard errors.
    assert abs(z.mean().item()) < 5 / n**0.5 and abs(z.std().item() - 1) < 5 / (2 * n) ** 0.5
    assert not torch.equal(z, kernels.normal(z.shape, 12346, dtype, z.device).float())
    p = torch.randn(z.shape, device=device).to(dtype)
    expected = 0.9 * p.float() + 0.25 * z
    kernels.axpbz_many_([p], [12345], alphas=[0.25], betas=[0.9])
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(p.float(), expected, rtol=tol, atol=tol)


@triton_only
@pytest.mark.parametrize(
    "shapes", [[(5,), (3, 4097), (1,), (2, 8192), (7, 3)], [(32, 512), (12304,), (16,), (64, 64)]]
)  # sizes not all multiples of 16, and all (the fused pass then moves vectors)
def test_draws_made_together_equal_the_fused_pass_draw_of_each_tensor(shapes, device):
    keys = [11, 2**62 + 5, 13, 14, 15][: len(shapes)]
    many = kernels.normal_many(shapes, keys, torch.float32, device)
    ps = [torch.zeros(shape, device=device) for shape in shapes]
    ones, zeros = [1.0] * len(shapes), [0.0] * len(shapes)
    kernels.axpbz_many_(ps, keys, alphas=ones, betas=zeros)  # p = z, every tensor in one launch
    for shape, key, z, p in zip(shapes, keys, many, ps, strict=True):
        assert torch.equal(z, kernels.normal(shape, key, torch.float32, device))
        assert torch.equal(p, z)
        alone = torch.zeros(shape, device=device)
        kernels.axpbz_many_([alone], [key], alphas=[1.0], betas=[0.0])
        assert torch.equal(alone, z)
    assert len({z.flatten()[0].item() for z in many}) == len(many)  # unrelated streams


class TinyLM(nn.Module):
    """Embedding → Linear → GELU → Linear → LayerNorm → tied head: covered Linears (in place at
    30 tokens with placement "auto", on the side path with "side"), an Embedding, a tied head
    and 1-D tensors, in a few tensors (the interpreter pays per launch)."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.layer_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        logits = self.head(self.layer_norm(self.down(F.gelu(self.up(self.embed(input_ids))))))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss)


@triton_only
@pytest.mark.parametrize(
    ("cls", "placement"),
    [(MeZO, "auto"), (LOZO, "auto"), (LOZO, "side"), (LOZOM, "auto"), (LOZOM, "side")],
)
def test_fast_equals_plain_through_the_kernels(device, cls, placement):
    """Both paths draw with the Philox kernels; the fast one also runs the draws made together,
    the side path's and the planned low-rank updates, and MeZO's fused passes. In float32: the
    kernels compute in float32."""
    torch.manual_seed(0)
    model = TinyLM().to(device)
    opt = MeZO(model.parameters(), lr=0.1, seed=7)
    (i, p), *_ = [(i, p) for i, _, p in opt.indexed_params()]
    ((z, _),) = opt.draw([(i, p)], 0)
    key = draw_key(7, 0, i, "z")
    assert torch.equal(z, kernels.normal(tuple(p.shape), key, p.dtype, device))  # Philox draws
    assert_close_trajectory_in_float32(model, cls, placement)
