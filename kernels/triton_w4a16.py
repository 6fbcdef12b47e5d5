"""W4A16 matmul in Triton: a CUDA-core GEMV for small M and a ``tl.dot`` GEMM for the rest.

Both kernels read one layout, made once at load by :func:`repack` from the canonical
:class:`QuantizedWeight` (kernels-and-style.md §4.1):

* ``qweight`` int32 ``[N, Kp / 8]``. K is cut into tiles of ``BK = 8 * SUB`` codes; word ``j`` of a
  tile holds the codes ``tile * BK + i * SUB + j`` in nibble ``i`` (bits ``4i .. 4i+3``). So one
  shift-and-mask of a ``[*, SUB]`` block of words yields ``SUB`` *consecutive* codes: no gather,
  no reshape, and the x slice they meet is contiguous. ``Kp`` is K rounded up to BK; the padding
  codes are 0 and meet x = 0 (masked loads), so they add nothing.
* ``scales`` fp16 ``[Gp, N]`` (transposed so one group's scales are one contiguous row), and for
  asymmetric weights ``offsets`` fp16 ``[Gp, N]`` = ``fp16(z * s)``, the contract's rounding point.
  Symmetric weights store no offsets: ``8 * s`` is exact in fp16 and computed in the kernel.
  Rows past the real groups are zero, for the padded tail.

``SUB`` divides the group size, so each ``SUB``-slice sits inside one group and needs one scale
(and offset) per row. A nibble becomes a float with one shift and one LOP3 (it is written into the
top mantissa bits of 1.0, giving ``1 + q/16``; no int->float conversion, which runs at a quarter
of the FMA rate), and one FMA turns that into ``q * s - o`` exactly (see :func:`_nibble_1p`).

Work split (§4.3): the GEMV (M = 1 by default) gives each program ``BLOCK_N`` rows and a
contiguous share of the K tiles; the GEMM (M >= 2, M padded to 16) tiles ``BLOCK_M x BLOCK_N`` and
dequantizes one ``[SUB, BLOCK_N]`` slice at a time into the activation dtype for ``tl.dot``. With
split-K the partial sums meet in a shared fp32 workspace, finished by the last program of each
tile (:func:`_store_split`), so every call is a single launch.

Measured on an H100 (bench/kernels.py): M = 1 about 1.5-1.8x cuBLAS fp16 on Llama-3-8B shapes,
M = 16 about 1.2-1.5x, M >= 64 well below cuBLAS (the BK = 512 x tile makes the GEMM's
shared-memory stages large); PyTorch's tinygemm reaches 2.2-2.5x at M = 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from klaq.formats.qweight import QuantizedWeight

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_K_CHOICES = (512, 256, 128)  # BK = 8 * SUB; SUB >= 16 for tl.dot


def choose_block_k(in_features: int, group_size: int) -> int:
    """Largest BK whose slices fit in a group, preferring the one that pads K least."""
    fits = [bk for bk in BLOCK_K_CHOICES if group_size % (bk // 8) == 0]
    if not fits:
        raise ValueError(f"group size {group_size} must be a multiple of 16")
    return min(fits, key=lambda bk: (-(-in_features // bk) * bk, -bk))


@dataclass
class TritonW4:
    """A 4-bit weight in the kernel layout (see the module docstring)."""

    qweight: torch.Tensor  # int32 [N, Kp // 8]
    scales: torch.Tensor  # fp16 [Gp, N]
    offsets: torch.Tensor | None  # fp16 [Gp, N] or None (symmetric)
    in_features: int
    out_features: int
    group_size: int
    block_k: int

    @property
    def n_tiles(self) -> int:
        return self.qweight.shape[1] * 8 // self.block_k

    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.qweight.nbytes + self.scales.nbytes + extra

    def __call__(self, x: torch.Tensor, **config) -> torch.Tensor:
        return w4a16_matmul(x, self, **config)


def repack(qweight: QuantizedWeight, device="cuda", block_k: int | None = None) -> TritonW4:
    """Canonical :class:`QuantizedWeight` -> :class:`TritonW4` (done once, on the host)."""
    if qweight.bits != 4:
        raise ValueError("the Triton kernels take bits=4")
    n, k = qweight.codes.shape
    gs = qweight.group_size
    bk = block_k or choose_block_k(k, gs)
    sub = bk // 8
    kp = -(-k // bk) * bk
    codes = np.zeros((n, kp), dtype=np.uint32)
    codes[:, :k] = qweight.codes
    nib = codes.reshape(n, kp // bk, 8, sub) << (4 * np.arange(8, dtype=np.uint32))[:, None]
    words = np.bitwise_or.reduce(nib, axis=2).reshape(n, kp // 8).view(np.int32)
    gp = -(-kp // gs)

    def rows(a: np.ndarray) -> torch.Tensor:  # [N, G] -> zero-padded fp16 [Gp, N]
        out = np.zeros((gp, n), dtype=np.float16)
        out[: a.shape[1]] = a.T
        return torch.from_numpy(out).to(device)

    offsets = None if qweight.zeros is None else rows(qweight.offsets())
    return TritonW4(torch.from_numpy(words).to(device), rows(qweight.scales), offsets, k, n, gs, bk)


@triton.jit
def _nibble_1p(w, i: tl.constexpr):
    """Nibble ``i`` of int32 words as the float32 ``1 + q / 16``: one shift and one LOP3.

    The nibble lands in the top mantissa bits of 1.0 (bits 19..22); ``q * s - o`` is then one
    FMA, ``(1 + q/16) * 16s - (16s + o)``, exact in fp32 like the contract's ``q * s - o``.
    """
    if 4 * i <= 19:
        v = w << (19 - 4 * i)
    else:
        v = w >> (4 * i - 19)
    return ((v & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _store_split(y_ptrs, ws_ptrs, cnt_ptr, acc, mask, SPLIT: tl.constexpr):
    """Write one output tile; with split-K, the last of its SPLIT programs writes it.

    Partials go into a fp32 workspace by atomics; a per-tile counter tells the last arrival, which
    stores the sum in the output dtype and zeroes the workspace tile and the counter again. So a
    call is one launch: no memset before it and no cast after it (each costs about as much as
    the whole GEMV at small N), and the same kernel replays in a CUDA graph.
    """
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == SPLIT - 1:
            tl.debug_barrier()
            total = tl.load(ws_ptrs, mask=mask, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.store(ws_ptrs, tl.zeros_like(total), mask=mask)
            tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, stride_xm, stride_ym,
                 group_size, tiles_per_split, n_tiles, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
    # Every tensor is [BLOCK_M, BLOCK_N, SUB] and loaded with that shape (x through a broadcast
    # pointer: redundant lanes hit L1), so all share one register layout and nothing goes through
    # shared memory. Products accumulate elementwise; the one reduction over K is at the end (a
    # reduction per slice costs shuffles and barriers that dwarf the arithmetic).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Rows past M or N are clamped, not masked: loads stay unpredicated, only the store is masked.
    m3 = tl.minimum(tl.arange(0, BLOCK_M), M - 1)[:, None, None]
    n3 = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)[None, :, None]
    j3 = tl.max_contiguous(tl.arange(0, SUB), SUB)[None, None, :]
    # x runs of 4 (not SUB): 16-bit x then gets the 4-wide vectors the int32 weights get.
    jx = tl.max_contiguous(tl.multiple_of(tl.arange(0, SUB), 4), 4)[None, None, :]
    zero = tl.zeros((BLOCK_M, BLOCK_N, SUB), dtype=tl.int32)
    w_ptrs = w_ptr + n3 * Kw + j3
    s_ptrs = s_ptr + n3
    o_ptrs = o_ptr + n3
    x_ptrs = x_ptr + m3 * stride_xm + jx + zero
    acc = tl.zeros((BLOCK_M, BLOCK_N, SUB), dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
        w = tl.load(w_ptrs + t * SUB, eviction_policy="evict_first")
        for i in tl.static_range(8):
            k0 = t * 8 * SUB + i * SUB
            if EVEN_K:
                xk = tl.load(x_ptrs + k0)
            else:
                xk = tl.load(x_ptrs + k0, mask=k0 + j3 < K, other=0.0)
            g = k0 // group_size
            s16 = 16.0 * tl.load(s_ptrs + g * N).to(tl.float32)
            if HAS_ZERO:
                c = s16 + tl.load(o_ptrs + g * N).to(tl.float32)
            else:
                c = 1.5 * s16  # 16s + 8s
            wd = _nibble_1p(w, i) * s16 - c  # q * s - o
            acc += wd * xk.to(tl.float32)
    out = tl.sum(acc, axis=2)
    m2 = tl.arange(0, BLOCK_M)[:, None]
    n2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (m2 < M) & (n2 < N)
    _store_split(y_ptr + m2 * stride_ym + n2, ws_ptr + m2 * N + n2, cnt_ptr + pid_n, out, mask, SPLIT)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, stride_xm, stride_ym,
                 group_size, tiles_per_split, n_tiles, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                 DOT_F32: tl.constexpr = False):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // grid_n, pid % grid_n
    offs_m = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1)  # clamped, as in the GEMV
    offs_n = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    offs_j = tl.max_contiguous(tl.arange(0, SUB), SUB)
    dtype = x_ptr.dtype.element_ty
    w_cols = w_ptr + offs_n[None, :] * Kw + offs_j[:, None]  # [SUB, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
        w = tl.load(w_cols + t * SUB, eviction_policy="evict_first")
        for i in tl.static_range(8):
            k0 = t * 8 * SUB + i * SUB
            kk = k0 + offs_j
            if EVEN_K:
                xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :])
            else:
                xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=(kk < K)[None, :], other=0.0)
            g = k0 // group_size
            s16 = 16.0 * tl.load(s_ptr + g * N + offs_n).to(tl.float32)
            if HAS_ZERO:
                c = s16 + tl.load(o_ptr + g * N + offs_n).to(tl.float32)
            else:
                c = 1.5 * s16
            # One rounding, as the contract has it: q * s - o in fp32, then to x's dtype.
            wd = (_nibble_1p(w, i) * s16[None, :] - c[None, :]).to(dtype)
            if DOT_F32:  # same products, exact in fp32: the interpreter's bf16 dot is wrong
                acc += tl.dot(xk.to(tl.float32), wd.to(tl.float32))
            else:
                acc = tl.dot(xk, wd, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    _store_split(y_ptrs, ws_ptrs, cnt_ptr + pid, acc, mask, SPLIT)


def default_config(m: int, n: int, k: int) -> dict:
    """Launch parameters by batch size, from bench/kernels.py sweeps on an H100 (4096 x 4096).

    M = 1 takes the CUDA-core GEMV; from M = 2 the tensor-core GEMM with M padded to 16 was
    faster than the GEMV in every sweep, so it takes over there.
    """
    if m == 1:
        wide = n >= 2048
        return dict(kernel="gemv", block_m=1, block_n=64 if wide else 32, split=4, num_warps=8 if wide else 4,
                    num_stages=1 if wide else 3)
    if m <= 16:
        return dict(kernel="gemm", block_m=16, block_n=32, split=4, num_warps=4, num_stages=2)
    if m <= 64:
        return dict(kernel="gemm", block_m=m if m in (32, 64) else 64, block_n=64, split=2, num_warps=4,
                    num_stages=2)
    return dict(kernel="gemm", block_m=64, block_n=128, split=1, num_warps=8, num_stages=2)


def w4a16_matmul(x: torch.Tensor, w: TritonW4, kernel: str | None = None, block_m: int | None = None,
                 block_n: int | None = None, split: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None) -> torch.Tensor:
    """``x @ W.T`` for fp16/bf16 ``x [..., K]``; keyword arguments override :func:`default_config`."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"activations must be fp16 or bf16, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features).contiguous()
    m, n, k = x2.shape[0], w.out_features, w.in_features
    cfg = default_config(m, n, k)
    if kernel == "gemv" and block_m is None:
        block_m = triton.next_power_of_2(m)
    for key, val in dict(kernel=kernel, block_m=block_m, block_n=block_n, split=split,
                         num_warps=num_warps, num_stages=num_stages).items():
        if val is not None:
            cfg[key] = val
    split = max(1, min(cfg["split"], w.n_tiles))
    tps = -(-w.n_tiles // split)
    split = -(-w.n_tiles // tps)  # no empty programs
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    gemv = cfg["kernel"] == "gemv"
    tiles = triton.cdiv(n, cfg["block_n"]) * (1 if gemv else triton.cdiv(m, cfg["block_m"]))
    ws, counters = _workspace(x.device, m * n if split > 1 else 0, tiles)
    offsets = w.offsets if w.offsets is not None else w.scales  # unused when symmetric
    args = (x2, w.qweight, w.scales, offsets, y, ws, counters, m, n, k, w.qweight.shape[1], x2.stride(0),
            y.stride(0), w.group_size, tps, w.n_tiles)
    meta = dict(HAS_ZERO=w.offsets is not None, EVEN_K=k % w.block_k == 0, BLOCK_N=cfg["block_n"],
                SUB=w.block_k // 8, SPLIT=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if gemv:
        grid = (triton.cdiv(n, cfg["block_n"]), split)
        _gemv_kernel[grid](*args, BLOCK_M=cfg["block_m"], **meta)
    else:
        grid = (triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"]), split)
        _gemm_kernel[grid](*args, BLOCK_M=cfg["block_m"], DOT_F32=_INTERPRET and x.dtype == torch.bfloat16,
                           **meta)
    return y.reshape(*lead, n)


_WORKSPACES: dict = {}


def _workspace(device, floats: int, tiles: int):
    """Split-K scratch shared by all weights on a device: fp32 partials and per-tile counters.

    Both are all-zero between calls (the kernels restore that), so calls on one stream may share
    them; they only grow, and are allocated outside any CUDA-graph capture by the warm-up call.
    """
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < tiles:
        ws = torch.zeros(max(floats, 1 << 16, 0 if ws is None else ws.numel()), device=device)
        cnt = torch.zeros(max(tiles, 1024, 0 if cnt is None else cnt.numel()), device=device, dtype=torch.int32)
        _WORKSPACES[device] = (ws, cnt)
    return ws, cnt
