"""Counter-based Gaussian draws on CUDA (Triton's Philox), and MeZO's fused pass.

Element e of a draw keyed k is a pure function of (k, e), so a pass can regenerate z inside the
kernel that reads and writes the weight, instead of writing z to memory and reading it back:
one read and one write of each weight per pass. `normal` materialises exactly the same numbers
(rounded to the tensor's dtype), which keeps the plain in-place path and the fused one equal.
Triton is optional: without it (CPU, CI) draws come from `torch.Generator`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 4096  # elements per program; part of the draw's definition (element -> counter map)
_KEY_MASK = (1 << 63) - 1  # Triton takes the seed as a signed 64-bit integer


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _store(out_ptr, offs, n, z):
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _axpb(p_ptr, offs, n, a, b, z):
        mask = offs < n
        z = z.to(p_ptr.dtype.element_ty).to(tl.float32)  # the same z that `normal` stores
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        tl.store(p_ptr + offs, (a * p + b * z).to(p_ptr.dtype.element_ty), mask=mask)

    # Program pid covers elements [4·Q·pid, 4·Q·(pid+1)); counter pid·Q + q yields the four
    # normals of the elements 4·Q·pid + j·Q + q, j = 0..3.
    @triton.jit
    def normal_kernel(out_ptr, n, seed, Q: tl.constexpr):
        pid = tl.program_id(0)
        q = tl.arange(0, Q)
        z0, z1, z2, z3 = tl.randn4x(seed, pid * Q + q)
        base = pid.to(tl.int64) * (4 * Q) + q
        _store(out_ptr, base, n, z0)
        _store(out_ptr, base + Q, n, z1)
        _store(out_ptr, base + 2 * Q, n, z2)
        _store(out_ptr, base + 3 * Q, n, z3)

    @triton.jit
    def axpbz_kernel(p_ptr, n, seed, a, b, Q: tl.constexpr):
        pid = tl.program_id(0)
        q = tl.arange(0, Q)
        z0, z1, z2, z3 = tl.randn4x(seed, pid * Q + q)
        base = pid.to(tl.int64) * (4 * Q) + q
        _axpb(p_ptr, base, n, a, b, z0)
        _axpb(p_ptr, base + Q, n, a, b, z1)
        _axpb(p_ptr, base + 2 * Q, n, a, b, z2)
        _axpb(p_ptr, base + 3 * Q, n, a, b, z3)

    return normal_kernel, axpbz_kernel


_enabled = True


def set_enabled(flag: bool) -> None:
    """Turn the Triton kernels off (or back on): the benchmark times the torch path with it."""
    global _enabled
    _enabled = flag


def available(device: torch.device) -> bool:
    """Whether draws on ``device`` come from the Triton Philox kernels."""
    return _enabled and device.type == "cuda" and _kernels() is not None


def _grid(n: int) -> tuple[int]:
    return ((n + BLOCK - 1) // BLOCK,)


def normal(shape: tuple[int, ...], key: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """N(0, 1) draw keyed by ``key`` (CUDA with Triton only)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel():
        _kernels()[0][_grid(out.numel())](out, out.numel(), key & _KEY_MASK, Q=BLOCK // 4)
    return out


def axpbz_(p: Tensor, key: int, a: float, b: float) -> None:
    """p ← a·p + b·z in one pass, z = ``normal(p.shape, key)`` regenerated in registers."""
    assert p.is_contiguous(), "the fused pass needs a contiguous tensor"
    if p.numel():
        kernel = _kernels()[1]
        kernel[_grid(p.numel())](p, p.numel(), key & _KEY_MASK, float(a), float(b), Q=BLOCK // 4)
