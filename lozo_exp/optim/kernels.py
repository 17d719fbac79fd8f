"""Triton kernels of the fast engine: counter-based Gaussian draws and one-pass weight updates.

- Element e of a draw keyed k is a pure function of (k, e) (Philox4x32-10, then Box–Muller), so
  MeZO's passes regenerate z inside the kernel that reads and writes the weight instead of
  writing z to memory and reading it back: one read and one write of each weight per pass.
  `normal` materialises exactly the same numbers (rounded to the tensor's dtype), which keeps the
  plain in-place path and the fused one equal.
- Box–Muller uses the GPU's fast approximate log/sin/cos: the precise calls make the pass
  compute-bound, and the difference is far below what a float16/bfloat16 weight can hold.
- `lowrank_add_`: W ← β·W + α·A·Bᵀ for a small inner dimension r in one pass over W (cuBLAS's
  `addmm_` with K = r runs a GEMM tiled for large K). `plan_lowrank_add_many` does it for
  hundreds of matrices in one launch (a table of addresses), so a step's update costs the CPU
  one launch instead of hundreds, and the table is made before the loss sync.

The kernels run on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set
before this module is imported: the tests), there with the precise log/sin/cos (the interpreter
has no libdevice). Triton is optional: without it draws come from `torch.Generator` and
`lowrank_add_` falls back to `addmm_`. `results/bench/README.md` has the measurements behind
these choices.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

BLOCK = 4096  # elements per program; part of the draw's definition (element -> counter map)
_KEY_MASK = (1 << 63) - 1  # Triton takes the seed as a signed 64-bit integer
_TILE = (16, 512)  # rows x columns of W per program in `lowrank_add_` (measured best)


try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: draws come from torch.Generator
    triton = None

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
"""Whether the kernels run in Triton's interpreter (read at import, as Triton does)."""

if triton is not None:

    @triton.jit
    def _box_muller_fast(u1, u2):
        u1 = tl.maximum(u1, 1.0e-7)  # log(0) would be -inf
        radius = tl.sqrt(-2.0 * libdevice.fast_logf(u1))
        angle = 6.283185307179586 * u2
        return radius * libdevice.fast_cosf(angle), radius * libdevice.fast_sinf(angle)

    @triton.jit
    def _box_muller_precise(u1, u2):
        u1 = tl.maximum(u1, 1.0e-7)
        radius = tl.sqrt(-2.0 * tl.log(u1))
        angle = 6.283185307179586 * u2
        return radius * tl.cos(angle), radius * tl.sin(angle)

    _box_muller = _box_muller_precise if INTERPRETED else _box_muller_fast

    # Block j of a draw covers its elements [4·Q·j, 4·Q·(j+1)); counter j·Q + q yields the four
    # normals of the elements 4·Q·j + i·Q + q, i = 0..3 (32-bit counters: a 64-bit one would
    # switch Triton to Philox4x64).
    @triton.jit
    def _normals(seed, block, Q: tl.constexpr):
        q = tl.arange(0, Q)
        u0, u1, u2, u3 = tl.rand4x(seed, (block * Q + q).to(tl.int32), 10)
        z0, z1 = _box_muller(u0, u1)
        z2, z3 = _box_muller(u2, u3)
        return block.to(tl.int64) * (4 * Q) + q, z0, z1, z2, z3

    @triton.jit
    def _store(out_ptr, offs, n, z):
        tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _axpb(p_ptr, offs, n, a, b, z):
        mask = offs < n
        z = z.to(p_ptr.dtype.element_ty).to(tl.float32)  # the same z that `normal` stores
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        tl.store(p_ptr + offs, (a * p + b * z).to(p_ptr.dtype.element_ty), mask=mask)

    # Many draws in one launch: program pid makes block blocks[pid] of draw draws[pid], whose
    # key, first element in ``out`` and size are keys/starts/sizes[draws[pid]].
    @triton.jit
    def normal_many_kernel(out_ptr, keys_ptr, starts_ptr, sizes_ptr, draws_ptr, blocks_ptr,
                      Q: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        draw = tl.load(draws_ptr + pid)
        n = tl.load(sizes_ptr + draw)
        out_ptr += tl.load(starts_ptr + draw)
        base, z0, z1, z2, z3 = _normals(tl.load(keys_ptr + draw), tl.load(blocks_ptr + pid), Q)
        _store(out_ptr, base, n, z0)
        _store(out_ptr, base + Q, n, z1)
        _store(out_ptr, base + 2 * Q, n, z2)
        _store(out_ptr, base + 3 * Q, n, z3)

    @triton.jit
    def normal_kernel(out_ptr, n, seed, Q: tl.constexpr):
        base, z0, z1, z2, z3 = _normals(seed, tl.program_id(0), Q)
        _store(out_ptr, base, n, z0)
        _store(out_ptr, base + Q, n, z1)
        _store(out_ptr, base + 2 * Q, n, z2)
        _store(out_ptr, base + 3 * Q, n, z3)

    # Many tensors in one launch: program pid works on block blocks[pid] of tensor items[pid];
    # table holds each tensor's (address, key), sizes its size, coefs its (a, b).
    @triton.jit
    def axpbz_many_kernel(like_ptr, table, sizes, coefs, items, blocks, Q: tl.constexpr,
                          ALIGNED: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        item = tl.load(items + pid)
        n = tl.load(sizes + item)
        p_ptr = tl.load(table + 2 * item).to(tl.pointer_type(like_ptr.dtype.element_ty))
        if ALIGNED:  # what Triton infers by itself for one tensor: loads and stores as vectors
            n = tl.multiple_of(n, 16)
            p_ptr = tl.multiple_of(p_ptr, 16)
        a, b = tl.load(coefs + 2 * item), tl.load(coefs + 2 * item + 1)
        base, z0, z1, z2, z3 = _normals(tl.load(table + 2 * item + 1), tl.load(blocks + pid), Q)
        _axpb(p_ptr, base, n, a, b, z0)
        _axpb(p_ptr, base + Q, n, a, b, z1)
        _axpb(p_ptr, base + 2 * Q, n, a, b, z2)
        _axpb(p_ptr, base + 3 * Q, n, a, b, z3)

    @triton.jit
    def _lowrank_tile(w_ptr, a_ptr, b_ptr, M, N, alpha, beta, tile_m, tile_n, SA: tl.constexpr,
                      SB: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr):  # fmt: skip
        rows = tile_m * BM + tl.arange(0, BM)
        cols = tile_n * BN + tl.arange(0, BN)
        row_ok, col_ok = rows < M, cols < N
        ab = tl.zeros((BM, BN), tl.float32)
        for k in tl.static_range(R):
            a = tl.load(a_ptr + rows * SA + k, mask=row_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols * SB + k, mask=col_ok, other=0.0).to(tl.float32)
            ab += a[:, None] * b[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
        tl.store(w_ptr + offs, (beta * w + alpha * ab).to(w_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def lowrank_kernel(w_ptr, a_ptr, b_ptr, M, N, alpha, beta, SA: tl.constexpr,
                       SB: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr):  # fmt: skip
        # The factors' row strides are compile-time constants (a few values: r, or the padded
        # width of x·V): as run-time arguments they make the pass slower.
        _lowrank_tile(w_ptr, a_ptr, b_ptr, M, N, alpha, beta, tl.program_id(0),
                      tl.program_id(1), SA, SB, R, BM, BN)  # fmt: skip

    # Many matrices in one launch: program pid works on tile tiles[pid] of matrix mats[pid];
    # ptrs holds each matrix's (w, a, b) addresses, dims its (M, N), coefs its (alpha, beta).
    @triton.jit
    def lowrank_many_kernel(like_ptr, ptrs, dims, coefs, mats, tiles, R: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        mat = tl.load(mats + pid)
        tile = tl.load(tiles + pid)
        m, n = tl.load(dims + 2 * mat), tl.load(dims + 2 * mat + 1)
        ptr_type = tl.pointer_type(like_ptr.dtype.element_ty)
        w_ptr = tl.load(ptrs + 3 * mat).to(ptr_type)
        if ALIGNED:  # what Triton infers by itself for one matrix: W's rows load as vectors
            n = tl.multiple_of(n, 16)
            w_ptr = tl.multiple_of(w_ptr, 16)
        a_ptr = tl.load(ptrs + 3 * mat + 1).to(ptr_type)
        b_ptr = tl.load(ptrs + 3 * mat + 2).to(ptr_type)
        alpha, beta = tl.load(coefs + 2 * mat), tl.load(coefs + 2 * mat + 1)
        tiles_n = tl.cdiv(n, BN)
        _lowrank_tile(w_ptr, a_ptr, b_ptr, m, n, alpha, beta, tile // tiles_n, tile % tiles_n,
                      R, R, R, BM, BN)  # fmt: skip


_enabled = True


def set_enabled(flag: bool) -> None:
    """Turn the Triton kernels off (or back on): the benchmark times the torch path with it."""
    global _enabled
    _enabled = flag


def available(device: torch.device) -> bool:
    """Whether the kernels run on ``device`` (and draws there come from Triton's Philox)."""
    return (
        _enabled
        and triton is not None
        and (device.type == "cuda" or (INTERPRETED and device.type == "cpu"))
    )


def _upload(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A kernel's table on ``device``: on CUDA through pinned memory and non-blocking (a
    pageable copy would wait for all queued GPU work)."""
    table = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _grid(n: int) -> tuple[int]:
    return ((n + BLOCK - 1) // BLOCK,)


def _programs(counts: list[int]) -> tuple[Tensor, Tensor]:
    """For items that need ``counts`` programs each: every program's item, and its index among
    that item's programs (the tables a many-items-in-one-launch kernel looks itself up in)."""
    items = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    first = torch.tensor([0, *counts]).cumsum(0)[:-1]
    within = torch.arange(len(items)) - first[items]
    return items.to(torch.int32), within.to(torch.int32)


@functools.lru_cache(maxsize=16)
def _layout(sizes: tuple[int, ...], device: torch.device) -> tuple[list[int], list[Tensor]]:
    """Where each draw of ``sizes`` starts in the shared buffer, and the tables on device: the
    starts, the sizes, and each program's (draw, block); a fused pass over tensors of these sizes
    uses the last three. Fixed for an optimizer's tensors, so made once."""
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    draws, within = _programs([(n + BLOCK - 1) // BLOCK for n in sizes])

    def put(x: list[int] | Tensor, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(x, dtype=dtype).to(device)

    tables = [put(starts[:-1], torch.int64), put(sizes, torch.int64), put(draws, torch.int32)]
    return starts, [*tables, put(within, torch.int32)]


def normal_many(
    shapes: list[tuple[int, ...]], keys: list[int], dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """N(0, 1) draws, one per (shape, key), made in one launch (CUDA with Triton only). Each is
    the same as ``normal(shape, key)``: hundreds of tiny draws cost one launch, not hundreds."""
    sizes = tuple(math.prod(s) for s in shapes)
    starts, tables = _layout(sizes, device)
    out = torch.empty(starts[-1], dtype=dtype, device=device)
    if n_programs := len(tables[-1]):
        keys_t = _upload([k & _KEY_MASK for k in keys], torch.int64, device)
        normal_many_kernel[(n_programs,)](out, keys_t, *tables, Q=BLOCK // 4)
    return [z.view(s) for z, s in zip(out.split_with_sizes(sizes), shapes, strict=True)]


def normal(shape: tuple[int, ...], key: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """N(0, 1) draw keyed by ``key`` (CUDA with Triton only)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel():
        normal_kernel[_grid(out.numel())](out, out.numel(), key & _KEY_MASK, Q=BLOCK // 4)
    return out


def axpbz_many_(ps: list[Tensor], keys: list[int], alphas: list[float], betas: list[float]) -> None:
    """p ← β·p + α·z for each contiguous tensor p (one dtype and device) and its α, β, with
    z = ``normal(p.shape, key)`` regenerated in registers, in one pass and one launch: MeZO's
    pass over hundreds of weights costs the CPU one launch instead of hundreds."""
    if not ps:
        return
    assert all(p.is_contiguous() and p.dtype == ps[0].dtype for p in ps), "contiguous, one dtype"
    sizes = tuple(p.numel() for p in ps)
    device = ps[0].device
    _, (_, n_tensors, items, within) = _layout(sizes, device)
    ptrs = [p.data_ptr() for p in ps]
    table = [x for ptr, key in zip(ptrs, keys, strict=True) for x in (ptr, key & _KEY_MASK)]
    coefs = [float(x) for ab in zip(betas, alphas, strict=True) for x in ab]  # the kernel's (a, b)
    table_t = _upload(table, torch.int64, device)
    coefs_t = _upload(coefs, torch.float32, device)
    aligned = all(n % 16 == 0 for n in sizes) and all(x % 16 == 0 for x in ptrs)
    if len(items):
        axpbz_many_kernel[(len(items),)](ps[0], table_t, n_tensors, coefs_t, items, within,
                                         Q=BLOCK // 4, ALIGNED=aligned)  # fmt: skip


def lowrank_add_(w: Tensor, a: Tensor, b: Tensor, alpha: float, beta: float = 1.0) -> None:
    """w ← β·w + α·a·bᵀ in place, for w m×n, a m×(≥ r) and b n×r, r small: only a's first r
    columns are used (x·V is computed on a padded V). w and a may also be batched (…×n, …×r'),
    read as their 2-D views: the side path passes a Linear's output and x·V as they come, one
    Python call per module (the forward must not wait for the CPU)."""
    n, r = w.size(-1), b.size(1)
    if not (available(w.device) and w.is_contiguous() and (a.dim() == 2 or a.is_contiguous())):
        w2 = w if w.dim() == 2 else w.view(-1, n)
        w2.addmm_(a.reshape(-1, a.size(-1))[:, :r], b.T, beta=beta, alpha=alpha)
        return
    m = w.numel() // n if n else 0
    if a.numel() // a.size(-1) != m or a.size(-1) < r:
        raise ValueError(f"lowrank_add_: a {tuple(a.shape)} does not match w {tuple(w.shape)}")
    if w.numel():
        a = a if a.stride(-1) == 1 else a.contiguous()
        b = b if b.stride(1) == 1 else b.contiguous()
        bm, bn = _TILE
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        lowrank_kernel[grid](w, a, b, m, n, float(alpha), float(beta), SA=a.stride(-2),
                             SB=b.stride(0), R=r, BM=bm, BN=bn)  # fmt: skip


@functools.lru_cache(maxsize=16)
def _tiles(dims: tuple[torch.Size, ...], device: torch.device) -> tuple[Tensor, ...]:
    """Each program's (matrix, tile) for matrices of shapes ``dims``, and the shapes, on device."""
    bm, bn = _TILE
    mats, tiles = _programs([math.ceil(m / bm) * math.ceil(n / bn) for m, n in dims])
    flat = torch.tensor([x for mn in dims for x in mn])
    return tuple(t.to(device) for t in (flat, mats, tiles))


def plan_lowrank_add_many(
    ws: list[Tensor],
    factors: list[tuple[Tensor, Tensor]],
    alphas: list[float],
    betas: list[float],
) -> Callable[[], None]:
    """``lowrank_add_`` for many matrices (same dtype, device and rank) in one launch, returned
    as a function that launches it: a step's hundreds of updates cost the CPU one launch. All
    the work but the launch (checks, the table of addresses and its upload) is done now, so it
    can be done before the factors hold their values: the launch reads them as they are then."""
    r = factors[0][0].size(1) if factors else 0
    usable = bool(ws) and available(ws[0].device)
    ptrs: list[int] = []  # (w, a, b) addresses; the checks and the table in one pass
    shapes = []
    for w, (a, b) in zip(ws, factors, strict=True):
        usable = usable and (
            w.dtype == ws[0].dtype and w.dim() == 2 and w.is_contiguous() and a.is_contiguous()
            and b.is_contiguous() and a.size(1) == b.size(1) == r
        )  # fmt: skip
        if not usable:
            break
        ptrs += (w.data_ptr(), a.data_ptr(), b.data_ptr())
        shapes.append(w.shape)
    if not usable:

        def one_at_a_time() -> None:
            for w, (a, b), alpha, beta in zip(ws, factors, alphas, betas, strict=True):
                lowrank_add_(w, a, b, alpha, beta)

        return one_at_a_time
    device = ws[0].device
    dims, mats, tiles = _tiles(tuple(shapes), device)
    coefs = [float(x) for ab in zip(alphas, betas, strict=True) for x in ab]
    ptrs_t = _upload(ptrs, torch.int64, device)
    coefs_t = _upload(coefs, torch.float32, device)
    aligned = all(n % 16 == 0 for _, n in shapes) and all(x % 16 == 0 for x in ptrs[::3])
    table = (ptrs_t, dims, coefs_t, mats, tiles)
    return functools.partial(_launch_many, ws, factors, table, r, aligned)


def _launch_many(
    ws: list[Tensor], factors: list[tuple[Tensor, Tensor]], table: tuple[Tensor, ...], r: int,
    aligned: bool,
) -> None:  # fmt: skip
    """Launches a planned `lowrank_many_kernel`; holds ws and factors, which the table points
    into, until then."""
    ptrs, dims, coefs, mats, tiles = table
    bm, bn = _TILE
    lowrank_many_kernel[(len(mats),)](ws[0], ptrs, dims, coefs, mats, tiles, R=r, BM=bm, BN=bn,
                                      ALIGNED=aligned)  # fmt: skip
