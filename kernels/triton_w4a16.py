"""W4A16 matmul in Triton: a CUDA-core GEMV for small M and a ``tl.dot`` GEMM for the rest.

Both kernels read one layout, made once at load by :func:`repack` from the canonical
:class:`QuantizedWeight` (kernels-and-style.md §4.1):

* ``qweight`` int32 ``[N, Kp / 8]``. K is cut into tiles of ``BK = 8 * SUB`` codes; word ``j`` of a
  tile holds the code ``tile * BK + i * SUB + j`` of slice ``i`` in nibble ``NIBBLE[i]``. So one
  shift-and-mask of a ``[*, SUB]`` block of words yields ``SUB`` *consecutive* codes: no gather,
  no reshape, and the x slice they meet is contiguous. Slices 2p and 2p + 1 sit 16 bits apart
  (nibbles p and p + 4): one half2 after a shift and a mask. ``Kp`` is K rounded up to BK; the padding
  codes are 0 and meet x = 0 (masked loads), so they add nothing.
* ``scales`` fp16 ``[Gp, N]`` (transposed so one group's scales are one contiguous row), and for
  asymmetric weights ``offsets`` fp16 ``[Gp, N]`` = ``fp16(z * s)``, the contract's rounding point.
  Symmetric weights store no offsets: ``8 * s`` is exact in fp16 and computed in the kernel.
  Rows past the real groups are zero, for the padded tail.

``SUB`` divides the group size, so each ``SUB``-slice sits inside one group and needs one scale
(and offset) per row. A nibble becomes a float with one shift and one LOP3 (it is written into the
top mantissa bits of 1.0, giving ``1 + q/16``; no int->float conversion, which runs at a quarter
of the FMA rate), and one FMA turns that into ``q * s - o`` exactly (see :func:`_nibble_1p`).

Kernels (§4.3), picked by :func:`default_config` from M and the layer size:

* ``gemv`` (M <= 8): each program takes ``BLOCK_N`` rows and a contiguous share of the K tiles;
  products accumulate elementwise and reduce once at the end. Large layers at M = 1, bf16.
* ``gemv_h2`` (M = 1, fp16): ``TILES`` K-tiles of ``BLOCK_N`` rows per step, dequantized and
  multiplied in half2 by inline PTX; symmetric weights sum 4 words' products before the shared
  scale (``_H2C_EVEN`` / ``_H2C_ODD``), zero points build each weight (``_H2_ASYM``). Large layers
  at M = 1, fp16.
* ``gemv_wide`` (M = 1): the same, loading ``TILES`` K-tiles per step and no split-K: few
  programs with many bytes in flight. Small layers at M = 1 (SmolLM2's), where split-K's atomics
  are pure latency.
* ``gemm`` (M padded to 16): ``BLOCK_M x BLOCK_N`` tiles, one ``[SUB, BLOCK_N]`` weight slice
  dequantized at a time into the activation dtype for ``tl.dot``. M = 2-16.
* ``gemm_swap``: ``Y^T = W X^T``, the dequantized weight as the left operand (it may stay in
  registers, only x is staged). M = 17-128.
* ``dequant``: the whole weight to the activation dtype in a scratch buffer, then cuBLAS. M > 128.
* ``wgmma`` (gluon_w4a16.py): on Hopper with fp16 activations it replaces ``gemm_swap`` and
  ``dequant`` (M > 16): TMA-staged x, asynchronous wgmma on register-dequantized weights; from
  M = 129, where 128 x 256 tiles fill two thirds of the SMs, gluon_w4a16_tall.py's two-warpgroup
  kernel (a weight dequantized once per 256 tokens).
* ``gemv_reg`` (gluon_gemv.py): on Hopper, for symmetric weights, 4-row programs load all their words
  and scales into registers at their start (with PDL before its wait, so a GEMV's weights stream in
  while the kernel before it runs) and x right after, before any arithmetic. In place of ``gemv_h2``
  for K < 8192 (``KLAQ_TMA_GEMV=0`` turns it off; :func:`tma_gemv_default`). ``gemv_tma`` (the same
  arithmetic, words by TMA into shared memory) by name.

With split-K the partial sums meet in a shared fp32 workspace, finished by the last program of
each tile (:func:`_store_split`), so every call is a single launch.

On Hopper the GEMVs launch with programmatic dependent launch (:mod:`klaq.kernels.pdl`; off with
``KLAQ_PDL=0``): a program (optionally prefetching its weight rows into L2, or loading its first
step of words: ``early``) lets the next kernel launch and waits for the previous one before it reads
x or writes anything, so its launch overlaps the kernel before it. On an H100 that made SmolLM2's
decode step 10% faster and a chain of large GEMVs alone no faster.

Measured on an H100 (bench/kernel_sweep.py, bench/kernels.py): M = 1 about 2.3-2.9x cuBLAS fp16 on
Llama-3-8B shapes with these Triton GEMVs (tinygemm 2.2-2.4x), 2.9-3.5x with ``gemv_reg`` (K < 8192), and
1.3-2.0x on SmolLM2's; M = 16 about 1.5-2.0x; M = 64
0.8-1.2x (0.9-1.4x with ``wgmma``); M = 256 0.5-0.6x (0.87-0.95x with ``wgmma`` and the 128 x 256 kernel).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from klaq.formats.qweight import QuantizedWeight

from .pdl import launch_kwargs, pdl_enter_rows, pdl_for, pdl_trigger

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_K_CHOICES = (512, 256, 128)  # BK = 8 * SUB; SUB >= 16 for tl.dot
# Slice i of a tile sits in nibble NIBBLE[i]: slices 2p and 2p + 1 in nibbles p and p + 4, so one
# shift by 4p and one LOP3 with 0x000F000F put both codes into one half2 (the gemv_h2 kernel).
NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def choose_block_k(in_features: int, group_size: int) -> int:
    """Largest BK whose slices fit in a group and whose padding stays within half of K.

    Wide tiles win even when they pad: at K = 576 a GEMV over BK = 256 (768 codes) or 512 (1024)
    took 2.4-2.6 us on an H100 against 3.4 us over BK = 128 (640); bench/kernel_sweep.py. The
    half-K cap keeps the padding's memory cost bounded (576 -> 768, not 1024).
    """
    fits = [bk for bk in BLOCK_K_CHOICES if group_size % (bk // 8) == 0]
    if not fits:
        raise ValueError(f"group size {group_size} must be a multiple of 16")
    padded = {bk: -(-in_features // bk) * bk for bk in fits}
    ok = [bk for bk in fits if 2 * (padded[bk] - in_features) <= in_features]
    return max(ok) if ok else min(fits, key=lambda bk: (padded[bk], -bk))


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
    # per-weight launch objects made once (gluon_gemv's TMA descriptors), not part of the weight
    cache: dict = field(default_factory=dict, repr=False, compare=False)

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
    nib = codes.reshape(n, kp // bk, 8, sub) << (4 * np.array(NIBBLE, dtype=np.uint32))[:, None]
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
    """Slice ``i``'s code (nibble ``NIBBLE[i]``) of int32 words as the float32 ``1 + q / 16``.

    One shift and one LOP3: the nibble lands in the top mantissa bits of 1.0 (bits 19..22);
    ``q * s - o`` is then one FMA, ``(1 + q/16) * 16s - (16s + o)``, exact in fp32 like the
    contract's ``q * s - o``.
    """
    b: tl.constexpr = 4 * (i // 2 + 4 * (i % 2))  # NIBBLE[i]'s first bit
    if b <= 19:
        v = w << (19 - b)
    else:
        v = w >> (b - 19)
    return ((v & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _group_affine(s_ptrs, o_ptrs, mask, HAS_ZERO: tl.constexpr):
    """``(16 s, 16 s + o)`` of one group for the FMA in :func:`_nibble_1p`'s docstring.

    Symmetric weights store no offsets: ``o = 8 s``, exact in fp16, so ``c = 1.5 * 16 s``.
    """
    s16 = 16.0 * _load(s_ptrs, mask).to(tl.float32)
    if HAS_ZERO:
        c = s16 + _load(o_ptrs, mask).to(tl.float32)
    else:
        c = 1.5 * s16
    return s16, c


@triton.jit
def _load(ptrs, mask):
    """``tl.load``, masked (zeros) unless ``mask`` is None."""
    if mask is None:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v


@triton.jit
def _store_split(y_ptrs, ws_ptrs, cnt_ptr, acc, row_ok, col_ok, slot, SPLIT: tl.constexpr,
                 SPLIT_SUM: tl.constexpr):
    """Write one output tile; with split-K, the last of its SPLIT programs writes it.

    ``SPLIT_SUM == "atomic"`` (the default): the partial sums are added into one fp32 workspace
    tile by atomics; a per-tile counter tells the last arrival, which reads the sums by atomics
    (adding zero), stores y and zeroes the workspace tile and the counter again. ``"slots"``: each
    program stores its partials in a slot of its own (``ws_ptrs + pid_k * slot``) and the last
    adds the slots in split order, so every call gives the same bits whatever the order of arrival
    (H100, 4096 x 4096: 1 us slower at M = 4 and 16, bench/results/splitk_sum_ab_h100.md).
    ``"atomic_masked"``: the atomic sums with the workspace masked by row as well (rows past M left
    out). Either way a call is one launch: no memset before it and no cast after it (each costs
    about as much as the whole GEMV at small N), and the same kernel replays in a CUDA graph.
    Publishing the partials: a CTA barrier after every thread's workspace writes, then the counter's
    acq_rel atomic by one thread; the last arrival's barrier after that atomic, then its reads (the
    pattern of cooperative groups' grid sync: the barrier orders the CTA's writes before that one
    thread's release, and the release covers them). A ``fence.acq_rel.gpu`` in every thread before
    the barrier (until 2026-12-07) cost 6-8% at M = 16 and changed no outcome of
    bench/splitk_race.py (bench/results/splitk_fence_ab_h100.md). ``row_ok`` ``[BM, 1]``
    and ``col_ok`` ``[1, BN]`` mark the rows and columns of y; the workspace takes every row of the
    tile (rows past M repeat row M - 1 and are never stored to y) except with ``"atomic_masked"``.
    """
    mask = row_ok & col_ok
    ws_mask = mask
    if SPLIT_SUM != "atomic_masked":
        ws_mask = tl.broadcast_to(col_ok, mask.shape)
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    elif SPLIT_SUM == "slots":
        pid_k = tl.program_id(1)
        tl.store(ws_ptrs + pid_k * slot, acc, mask=ws_mask)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == SPLIT - 1:
            tl.debug_barrier()
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT):
                if s == pid_k:
                    total += acc
                else:
                    total += tl.load(ws_ptrs + s * slot, mask=ws_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr, 0)
    else:
        tl.atomic_add(ws_ptrs, acc, mask=ws_mask, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == SPLIT - 1:
            tl.debug_barrier()
            # read the sums by atomics (adding zero), performed where the adds were: with a plain .cg
            # load here 15-17 of 400 calls at 14336 x 4096, M = 4 came out wrong on an H100, by
            # atomics none of 200 (bench/results/splitk_race_h100.txt)
            total = tl.where(ws_mask, tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=ws_mask, sem="relaxed"), 0.0)
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.store(ws_ptrs, tl.zeros_like(acc), mask=ws_mask)
            tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, stride_xm, stride_ym,
                 group_size, tiles_per_split, n_tiles, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                 PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                 PDL_LATE: tl.constexpr = False, SPLIT_SUM: tl.constexpr = "atomic"):
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
    pdl_enter_rows(w_ptr, pid_n * BLOCK_N, N, Kw, t0 * SUB, tl.minimum(t0 + tiles_per_split, n_tiles) * SUB, BLOCK_N,
                   PDL, PREFETCH, PDL_LATE)
    for t in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
        w = tl.load(w_ptrs + t * SUB, eviction_policy="evict_first")
        for i in tl.static_range(8):
            k0 = t * 8 * SUB + i * SUB
            if EVEN_K:
                xk = tl.load(x_ptrs + k0)
            else:
                xk = tl.load(x_ptrs + k0, mask=k0 + j3 < K, other=0.0)
            g = k0 // group_size
            s16, c = _group_affine(s_ptrs + g * N, o_ptrs + g * N, None, HAS_ZERO)
            wd = _nibble_1p(w, i) * s16 - c  # q * s - o
            acc += wd * xk.to(tl.float32)
    pdl_trigger(PDL, PDL_LATE)
    out = tl.sum(acc, axis=2)
    m2 = tl.arange(0, BLOCK_M)[:, None]
    n2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    _store_split(y_ptr + m2 * stride_ym + n2, ws_ptr + m2 * N + n2, cnt_ptr + pid_n, out, m2 < M, n2 < N,
                 BLOCK_M * N, SPLIT, SPLIT_SUM)


def _dequant_ptx(sym: bool, word: str, scale: str, neg_offset: str) -> str:
    """PTX: one half2 pair of codes (``word`` shifted so they sit in bits 0-3 and 16-19) into ``t``
    as the contract's weights ``q * s - o`` rounded once to fp16, from the two codes' scales and -o.

    One LOP3 makes the fp16 1024 + q (0x6400 | q). Symmetric: (1024 + q) - 1032 = q - 8 exactly,
    then * s, one rounding like q * s - 8 s. Zero points: (1024 + q) - 1024 = q exactly, then
    fma(q, s, -o), one rounding of q * s - o.
    """
    bias, scaled = ("0x64086408", f"mul.f16x2 t, t, {scale};") if sym else (
        "0x64006400", f"fma.rn.f16x2 t, t, {scale}, {neg_offset};")
    return (f".reg .b32 t, m;\nmov.b32 m, {bias};\nlop3.b32 t, {word}, 0x000f000f, 0x64006400, 0xea;\n"
            f"sub.f16x2 t, t, m;\n{scaled}\n")


# One pair times its two activations ($2), added to the half2 sum $5 (the GEMV with zero points):
# $1 the shifted word, $3 the scales, $4 the -o.
_H2_ASYM = tl.constexpr("{\n" + _dequant_ptx(False, "$1", "$3", "$4") + "fma.rn.f16x2 $0, t, $2, $5;\n}\n")
# A word's half2 sum into one fp32.
_H2_SUM = tl.constexpr("""
{
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 {lo, hi}, $1;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")


def _colsum_ptx(odd: bool, words: int = 1, xs: int = 5, scale: int = 9, acc: int = 10,
                zero_outs: tuple[int, ...] = ()) -> str:
    """PTX: pair p of 4 words ($1-$4) of one row, symmetric weights, times their x pairs ($5-$8),
    summed in half2, scaled once by the pair's scales ($9) and added to the half2 sum $10, into $0.
    The operand numbers are arguments for a caller with other operands (bench/gluon_gemv_probe.py's
    ``pack=4`` form, whose other outputs ``zero_outs`` are set to 0).

    Each pair becomes (q - 8) / 4 exactly with one LOP3 and one FMA: even p take the nibbles at bits
    0-3 / 16-19 (fp16 1024 + q; * 1/4 - 258), odd p those at bits 4-7 / 20-23 (1024 + 16 q;
    * 1/64 - 18), so a word needs one shift (by 8, for p = 2, 3) instead of three. The 4 words'
    products meet before the scale multiply, which 4 words share. x comes halved: with the / 4
    the half2 sums stay within 4 |x|, far from fp16's limit; the kernel's fp32 result is * 8.
    (The halving also keeps each x pair a computed value, which ptxas keeps in a register; a bare
    pack of two loaded halves it re-packs for every row.)
    """
    mask, mul, add = ("0x00f000f0", "0x24002400", "0xcc80cc80") if odd else ("0x000f000f", "0x34003400",
                                                                             "0xdc08dc08")
    lines = [".reg .b32 t0, t1, t2, t3, a, k, m, c;", "mov.b32 k, 0x64006400;", f"mov.b32 m, {mul};",
             f"mov.b32 c, {add};"]
    for i in range(4):
        lines += [f"lop3.b32 t{i}, ${words + i}, {mask}, k, 0xea;", f"fma.rn.f16x2 t{i}, t{i}, m, c;"]
    lines += [f"mul.f16x2 a, t0, ${xs};"] + [f"fma.rn.f16x2 a, t{i}, ${xs + i}, a;" for i in (1, 2, 3)]
    lines += [f"fma.rn.f16x2 $0, a, ${scale}, ${acc};"] + [f"mov.b32 ${o}, 0;" for o in zero_outs]
    return "{\n" + "\n".join(lines) + "\n}\n"


_H2C_EVEN = tl.constexpr(_colsum_ptx(False))
_H2C_ODD = tl.constexpr(_colsum_ptx(True))


@triton.jit
def _quarters(v):
    """``v [..., SUB]`` as four ``[..., SUB // 4]`` tensors: columns 4m, 4m + 2, 4m + 1, 4m + 3.

    Reshape and split, so which elements meet in ``_H2C_EVEN`` / ``_H2C_ODD`` is fixed by the program, not by
    the register layout the compiler picks (an ``inline_asm_elementwise`` with ``pack=4`` would
    group whatever 4 values a thread happens to hold).
    """
    shape: tl.constexpr = v.shape
    v5 = tl.reshape(v, [shape[0], shape[1], shape[2] // 4, 2, 2])
    even, odd = tl.split(v5)
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c2, c1, c3


# The pair's weights as two fp16 values $0, $1 (for tl.dot): $2 the shifted word, $3 scales, $4 -o.
_DQ_SYM = tl.constexpr("{\n" + _dequant_ptx(True, "$2", "$3", "$4") + "mov.b32 {$0, $1}, t;\n}\n")
_DQ_ASYM = tl.constexpr("{\n" + _dequant_ptx(False, "$2", "$3", "$4") + "mov.b32 {$0, $1}, t;\n}\n")


@triton.jit
def _half2(a, b):
    """Two fp16 tensors as one int32 tensor of half2s (``a`` in the low half)."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [a, b], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _pair_scales(s_ptr, o_ptr, ka, offs_n, N, group_size, SUB: tl.constexpr, HAS_ZERO: tl.constexpr,
                 PAIR_GROUP: tl.constexpr, mask=None):
    """Scales and -offsets ``[len(offs_n)]`` of slices starting at codes ``ka`` and ``ka + SUB``.

    PAIR_GROUP: 2 * SUB divides the group size, so both slices are in one group (one load).
    Symmetric weights have no offsets: the scales stand in (the _SYM assembly ignores them).
    ``mask``: loads to skip (zeros), for a step whose scales were loaded earlier.
    """
    ga = ka // group_size
    sa = _load(s_ptr + ga * N + offs_n, mask)
    noa = -_load(o_ptr + ga * N + offs_n, mask) if HAS_ZERO else sa
    if PAIR_GROUP:
        sb = sa
        nob = noa
    else:
        gb = (ka + SUB) // group_size
        sb = _load(s_ptr + gb * N + offs_n, mask)
        nob = -_load(o_ptr + gb * N + offs_n, mask) if HAS_ZERO else sb
    return sa, sb, noa, nob


@triton.jit
def _pick(first, early, later):
    """``early`` (a pair's scales loaded before the PDL wait) on the first step, else ``later``."""
    return (tl.where(first, early[0], later[0]), tl.where(first, early[1], later[1]),
            tl.where(first, early[2], later[2]), tl.where(first, early[3], later[3]))


@triton.jit
def _h2_pair_emulated(q_a, q_b, xa, xb, sa, sb, noa, nob, acc_a, acc_b, HAS_ZERO: tl.constexpr):
    """The interpreter's stand-in for the GEMV's PTX: each weight rounded once to fp16 (as the
    contract's ``q * s - o``), its product with x added to a half2 sum, in tl ops."""
    if HAS_ZERO:
        wa = (q_a.to(tl.float32) * sa.to(tl.float32) + noa.to(tl.float32)).to(tl.float16)  # fma: one rounding
        wb = (q_b.to(tl.float32) * sb.to(tl.float32) + nob.to(tl.float32)).to(tl.float16)
    else:
        wa = ((q_a.to(tl.float32) - 8.0) * sa.to(tl.float32)).to(tl.float16)
        wb = ((q_b.to(tl.float32) - 8.0) * sb.to(tl.float32)).to(tl.float16)
    pa = wa.to(tl.float32) * xa.to(tl.float32) + acc_a.to(tl.float32)  # product exact; one rounding
    pb = wb.to(tl.float32) * xb.to(tl.float32) + acc_b.to(tl.float32)
    return pa.to(tl.float16), pb.to(tl.float16)


@triton.jit
def _step_words(w_ptr, n3, Kw, t0, t3, t_end, j3, SUB: tl.constexpr):
    """One step of the wide GEMVs: tiles ``t0 + t3`` ``[1, TILES, 1]``, which of them are before
    ``t_end``, and their words ``[BLOCK_N, TILES, SUB]`` (zeros for tiles past the end)."""
    tt = t0 + t3
    live = tt < t_end
    w = tl.load(w_ptr + n3 * Kw + tt * SUB + j3, mask=live, other=0, eviction_policy="evict_first")
    return tt, live, w


@triton.jit
def _early_words(w_ptr, n3, Kw, t_start, t3, t_end, j3, zero, SUB: tl.constexpr, EARLY: tl.constexpr):
    """With ``EARLY``, the words of a program's first step (called before PDL's wait); else zeros."""
    if EARLY:
        w_e = _step_words(w_ptr, n3, Kw, t_start, t3, t_end, j3, SUB)[2]
    else:
        w_e = zero
    return w_e


@triton.jit
def _step_words_after(w_ptr, n3, Kw, t0, t_start, t3, t_end, j3, w_e, SUB: tl.constexpr, EARLY: tl.constexpr):
    """:func:`_step_words`, except that with ``EARLY`` the first step takes ``w_e`` (loaded by
    :func:`_early_words`) instead of loading its words again."""
    if EARLY:
        first = t0 == t_start
        tt, live, w = _step_words(w_ptr, n3, Kw, t0, t3, tl.where(first, t0, t_end), j3, SUB)
        w = tl.where(first, w_e, w)
        live = tt < t_end
    else:
        tt, live, w = _step_words(w_ptr, n3, Kw, t0, t3, t_end, j3, SUB)
    return tt, live, w


@triton.jit
def _x_pair(x_ptr, tt, live, p: tl.constexpr, j3, K, SUB: tl.constexpr, EVEN_K: tl.constexpr):
    """x at slices 2p and 2p + 1 of tiles ``tt`` (zeros for dead tiles and past K)."""
    ka = tt * (8 * SUB) + 2 * p * SUB + j3
    if EVEN_K:
        return tl.load(x_ptr + ka, mask=live, other=0.0), tl.load(x_ptr + ka + SUB, mask=live, other=0.0)
    return (tl.load(x_ptr + ka, mask=live & (ka < K), other=0.0),
            tl.load(x_ptr + ka + SUB, mask=live & (ka + SUB < K), other=0.0))


@triton.jit
def _gemv_h2_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, stride_xm, stride_ym,
                    group_size, tiles_per_split, n_tiles, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                    TILES: tl.constexpr, SUB: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                    PAIR_GROUP: tl.constexpr, ASM: tl.constexpr = True, X_AHEAD: tl.constexpr = False,
                    S_AHEAD: tl.constexpr = False, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                    PDL_LATE: tl.constexpr = False, EARLY: tl.constexpr = False,
                    SPLIT_SUM: tl.constexpr = "atomic"):
    # M = 1, fp16 activations. Each step takes TILES K-tiles of BLOCK_N rows ([BLOCK_N, TILES, SUB]
    # words, contiguous per row); per half2 pair (slices 2p, 2p + 1) of a tile the x pair is loaded
    # once ([1, TILES, SUB], shared by a thread's rows) and the scales once per row.
    # Symmetric weights (COLSUM): 4 words of a row share a pair's scale, so their products are
    # summed before it is applied (_H2C_EVEN / _H2C_ODD). Zero points: each word's weights q * s - o are built
    # in half2 and multiplied by x (_H2_ASYM); a word's 8 products meet in half2, then in fp32.
    # ASM=False (the interpreter, which runs no PTX) does the per-word fp16 arithmetic in tl ops.
    COLSUM: tl.constexpr = ASM and not HAS_ZERO
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n3 = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)[:, None, None]
    t3 = tl.arange(0, TILES)[None, :, None]
    j3 = tl.max_contiguous(tl.arange(0, SUB), SUB)[None, None, :]
    zero = tl.zeros((BLOCK_N, TILES, SUB), dtype=tl.int32)
    if COLSUM:
        acc = tl.zeros((BLOCK_N, TILES, SUB // 4), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, TILES, SUB), dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    # EARLY: the first step's words, and with S_AHEAD its scales, are loaded before PDL's wait, since
    # no weight depends on the previous kernel; x and everything else come after it (without PDL the
    # same loads, only peeled off the loop).
    w_e = _early_words(w_ptr, n3, Kw, t_start, t3, t_end, j3, zero, SUB, EARLY)
    if EARLY:
        if S_AHEAD:
            kg_e = tl.minimum(t_start + t3, t_end - 1) * (8 * SUB)
            se0 = _pair_scales(s_ptr, o_ptr, kg_e, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
            se1 = _pair_scales(s_ptr, o_ptr, kg_e + 2 * SUB, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
            se2 = _pair_scales(s_ptr, o_ptr, kg_e + 4 * SUB, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
            se3 = _pair_scales(s_ptr, o_ptr, kg_e + 6 * SUB, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
    pdl_enter_rows(w_ptr, pid_n * BLOCK_N, N, Kw, t_start * SUB, t_end * SUB, BLOCK_N, PDL, PREFETCH, PDL_LATE)
    # X_AHEAD: the next step's x is loaded at the top of this one (its latency off the FMA chain)
    tt0 = t_start + t3
    xa0, xb0 = _x_pair(x_ptr, tt0, tt0 < t_end, 0, j3, K, SUB, EVEN_K)
    xa1, xb1 = _x_pair(x_ptr, tt0, tt0 < t_end, 1, j3, K, SUB, EVEN_K)
    xa2, xb2 = _x_pair(x_ptr, tt0, tt0 < t_end, 2, j3, K, SUB, EVEN_K)
    xa3, xb3 = _x_pair(x_ptr, tt0, tt0 < t_end, 3, j3, K, SUB, EVEN_K)
    for t0 in range(t_start, t_end, TILES):
        tt, live, w = _step_words_after(w_ptr, n3, Kw, t0, t_start, t3, t_end, j3, w_e, SUB, EARLY)
        first = t0 == t_start
        if X_AHEAD:
            ttn = tt + TILES
            na0, nb0 = _x_pair(x_ptr, ttn, ttn < t_end, 0, j3, K, SUB, EVEN_K)
            na1, nb1 = _x_pair(x_ptr, ttn, ttn < t_end, 1, j3, K, SUB, EVEN_K)
            na2, nb2 = _x_pair(x_ptr, ttn, ttn < t_end, 2, j3, K, SUB, EVEN_K)
            na3, nb3 = _x_pair(x_ptr, ttn, ttn < t_end, 3, j3, K, SUB, EVEN_K)
        kg = tl.minimum(tt, t_end - 1) * (8 * SUB)  # a dead tile reads a live tile's (finite) scales
        if S_AHEAD and EARLY:  # the first step's scales came before the wait
            later = (tt >= t_start + TILES) & (n3 >= 0)  # not the first step: [BLOCK_N, TILES, 1]
            sc0 = _pick(first, se0, _pair_scales(s_ptr, o_ptr, kg, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP,
                                                 later))
            sc1 = _pick(first, se1, _pair_scales(s_ptr, o_ptr, kg + 2 * SUB, n3, N, group_size, SUB, HAS_ZERO,
                                                 PAIR_GROUP, later))
            sc2 = _pick(first, se2, _pair_scales(s_ptr, o_ptr, kg + 4 * SUB, n3, N, group_size, SUB, HAS_ZERO,
                                                 PAIR_GROUP, later))
            sc3 = _pick(first, se3, _pair_scales(s_ptr, o_ptr, kg + 6 * SUB, n3, N, group_size, SUB, HAS_ZERO,
                                                 PAIR_GROUP, later))
        elif S_AHEAD:  # all four pairs' scales issued with the words, before any arithmetic
            sc0 = _pair_scales(s_ptr, o_ptr, kg, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
            sc1 = _pair_scales(s_ptr, o_ptr, kg + 2 * SUB, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
            sc2 = _pair_scales(s_ptr, o_ptr, kg + 4 * SUB, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
            sc3 = _pair_scales(s_ptr, o_ptr, kg + 6 * SUB, n3, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
        if COLSUM:
            w0, w1, w2, w3 = _quarters(w)
            v0, v1, v2, v3 = w0 >> 8, w1 >> 8, w2 >> 8, w3 >> 8  # pairs 2, 3 at pairs 0, 1's bits
            acc2 = tl.zeros((BLOCK_N, TILES, SUB // 4), dtype=tl.int32)
        else:
            acc2 = zero
            acc_a = zero.to(tl.float16)
            acc_b = zero.to(tl.float16)
        for p in tl.static_range(4):
            if not X_AHEAD:
                xa, xb = _x_pair(x_ptr, tt, live, p, j3, K, SUB, EVEN_K)
            elif p == 0:
                xa, xb = xa0, xb0
            elif p == 1:
                xa, xb = xa1, xb1
            elif p == 2:
                xa, xb = xa2, xb2
            else:
                xa, xb = xa3, xb3
            if not S_AHEAD:
                sa, sb, noa, nob = _pair_scales(s_ptr, o_ptr, kg + 2 * p * SUB, n3, N, group_size, SUB, HAS_ZERO,
                                                PAIR_GROUP)
            elif p == 0:
                sa, sb, noa, nob = sc0
            elif p == 1:
                sa, sb, noa, nob = sc1
            elif p == 2:
                sa, sb, noa, nob = sc2
            else:
                sa, sb, noa, nob = sc3
            if COLSUM:
                z = tl.zeros_like(acc2)
                x0, x1, x2, x3 = _quarters(_half2(xa * 0.5, xb * 0.5))
                words = [w0, w1, w2, w3] if p < 2 else [v0, v1, v2, v3]
                args = words + [x0 + z, x1 + z, x2 + z, x3 + z, _half2(sa, sb) + z, acc2]
                if p % 2 == 0:
                    acc2 = tl.inline_asm_elementwise(_H2C_EVEN, "=r,r,r,r,r,r,r,r,r,r,r", args, dtype=tl.int32,
                                                     is_pure=True, pack=1)
                else:
                    acc2 = tl.inline_asm_elementwise(_H2C_ODD, "=r,r,r,r,r,r,r,r,r,r,r", args, dtype=tl.int32,
                                                     is_pure=True, pack=1)
            elif ASM:
                args = [w >> (4 * p), _half2(xa, xb) + zero, _half2(sa, sb) + zero, _half2(noa, nob) + zero, acc2]
                acc2 = tl.inline_asm_elementwise(_H2_ASYM, "=r,r,r,r,r,r", args, dtype=tl.int32, is_pure=True,
                                                 pack=1)
            else:
                acc_a, acc_b = _h2_pair_emulated((w >> (4 * p)) & 0xF, (w >> (4 * p + 16)) & 0xF, xa, xb, sa, sb,
                                                 noa, nob, acc_a, acc_b, HAS_ZERO)
        if ASM:
            acc += tl.inline_asm_elementwise(_H2_SUM, "=f,r", [acc2], dtype=tl.float32, is_pure=True, pack=1)
        else:
            acc += acc_a.to(tl.float32) + acc_b.to(tl.float32)
        if X_AHEAD:
            xa0, xb0, xa1, xb1, xa2, xb2, xa3, xb3 = na0, nb0, na1, nb1, na2, nb2, na3, nb3
    pdl_trigger(PDL, PDL_LATE)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    if COLSUM:
        out = out * 8.0  # the weights were (q - 8) / 4 and x / 2
    m2 = tl.arange(0, 1)[:, None]
    n2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    _store_split(y_ptr + m2 * stride_ym + n2, ws_ptr + m2 * N + n2, cnt_ptr + pid_n, out, m2 < M, n2 < N, N, SPLIT,
                 SPLIT_SUM)


@triton.jit
def _dq_pair(w, p: tl.constexpr, ka, s_ptr, o_ptr, offs_n, N, group_size, N_AXIS: tl.constexpr,
             SUB: tl.constexpr, HAS_ZERO: tl.constexpr, PAIR_GROUP: tl.constexpr):
    """Slices 2p and 2p + 1 (from code ``ka``) of the words ``w`` as two fp16 tensors (_DQ_*).

    ``offs_n`` runs along axis ``N_AXIS`` of ``w``; PAIR_GROUP: both slices share one group.
    """
    zero = tl.zeros_like(w)
    sa, sb, noa, nob = _pair_scales(s_ptr, o_ptr, ka, offs_n, N, group_size, SUB, HAS_ZERO, PAIR_GROUP)
    s2 = _half2(sa, sb)
    o2 = _half2(noa, nob)
    if N_AXIS == 1:
        s2 = s2[None, :]
        o2 = o2[None, :]
    else:
        s2 = s2[:, None]
        o2 = o2[:, None]
    args = [w >> (4 * p), s2 + zero, o2 + zero]
    if HAS_ZERO:
        wa, wb = tl.inline_asm_elementwise(_DQ_ASYM, "=h,=h,r,r,r", args, dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
    else:
        wa, wb = tl.inline_asm_elementwise(_DQ_SYM, "=h,=h,r,r,r", args, dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
    return wa, wb


@triton.jit
def _x_tile(x_ptr, offs_m, stride_xm, kk, K, EVEN_K: tl.constexpr):
    """x ``[BLOCK_M, SUB]`` at columns ``kk`` (zeros past K)."""
    if EVEN_K:
        v = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :])
    else:
        v = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=(kk < K)[None, :], other=0.0)
    return v


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, stride_xm, stride_ym,
                 group_size, tiles_per_split, n_tiles, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                 DOT_F32: tl.constexpr = False, H2: tl.constexpr = False, PAIR_GROUP: tl.constexpr = False,
                 SPLIT_SUM: tl.constexpr = "atomic"):
    # H2 (fp16 activations, not the interpreter): the weight dequantized two slices at a time in
    # half2 (_DQ_SYM / _DQ_ASYM), the same fp16 weights as the fp32 path (one rounding of q*s - o).
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
        if H2:  # fp16 on a GPU: a pair of slices per shift + LOP3, dequantized in half2 (_DQ_*)
            for p in tl.static_range(4):
                ka = t * 8 * SUB + 2 * p * SUB
                wa, wb = _dq_pair(w, p, ka, s_ptr, o_ptr, offs_n, N, group_size, 1, SUB, HAS_ZERO, PAIR_GROUP)
                acc = tl.dot(_x_tile(x_ptr, offs_m, stride_xm, ka + offs_j, K, EVEN_K), wa, acc)
                acc = tl.dot(_x_tile(x_ptr, offs_m, stride_xm, ka + SUB + offs_j, K, EVEN_K), wb, acc)
        else:
            for i in tl.static_range(8):
                k0 = t * 8 * SUB + i * SUB
                xk = _x_tile(x_ptr, offs_m, stride_xm, k0 + offs_j, K, EVEN_K)
                g = k0 // group_size
                s16, c = _group_affine(s_ptr + g * N + offs_n, o_ptr + g * N + offs_n, None, HAS_ZERO)
                # One rounding, as the contract has it: q * s - o in fp32, then to x's dtype.
                wd = (_nibble_1p(w, i) * s16[None, :] - c[None, :]).to(dtype)
                if DOT_F32:  # same products, exact in fp32: the interpreter's bf16 dot is wrong
                    acc += tl.dot(xk.to(tl.float32), wd.to(tl.float32))
                else:
                    acc = tl.dot(xk, wd, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    _store_split(y_ptrs, ws_ptrs, cnt_ptr + pid, acc, (offs_m < M)[:, None], (offs_n < N)[None, :],
                 tl.cdiv(M, BLOCK_M) * BLOCK_M * N, SPLIT, SPLIT_SUM)


@triton.jit
def _gemv_wide_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, stride_xm, stride_ym,
                      group_size, tiles_per_split, n_tiles, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                      TILES: tl.constexpr, SUB: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                      PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                      PDL_LATE: tl.constexpr = False, EARLY: tl.constexpr = False,
                      SPLIT_SUM: tl.constexpr = "atomic"):
    # M = 1 only. Like _gemv_kernel, but each step loads TILES K-tiles of BLOCK_N rows at once
    # ([BLOCK_N, TILES, SUB] words): more bytes in flight per program, so few programs (small N,
    # no split-K) still keep enough loads outstanding to cover DRAM latency.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n3 = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)[:, None, None]
    t3 = tl.arange(0, TILES)[None, :, None]
    j3 = tl.max_contiguous(tl.arange(0, SUB), SUB)[None, None, :]
    jx = tl.max_contiguous(tl.multiple_of(tl.arange(0, SUB), 4), 4)[None, None, :]
    zero = tl.zeros((BLOCK_N, TILES, SUB), dtype=tl.int32)
    acc = tl.zeros((BLOCK_N, TILES, SUB), dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
    w_e = _early_words(w_ptr, n3, Kw, t_start, t3, t_end, j3, zero, SUB, EARLY)  # EARLY: before the wait
    pdl_enter_rows(w_ptr, pid_n * BLOCK_N, N, Kw, t_start * SUB, t_end * SUB, BLOCK_N, PDL, PREFETCH, PDL_LATE)
    for t0 in range(t_start, t_end, TILES):
        tt, live, w = _step_words_after(w_ptr, n3, Kw, t0, t_start, t3, t_end, j3, w_e, SUB, EARLY)
        for i in tl.static_range(8):
            kb = tt * (8 * SUB) + i * SUB  # [1, TILES, 1]: first code of each slice
            if EVEN_K:
                xk = tl.load(x_ptr + kb + jx + zero, mask=live, other=0.0)
            else:
                xk = tl.load(x_ptr + kb + jx + zero, mask=live & (kb + j3 < K), other=0.0)
            g = kb // group_size
            s16, c = _group_affine(s_ptr + g * N + n3, o_ptr + g * N + n3, live, HAS_ZERO)
            acc += (_nibble_1p(w, i) * s16 - c) * xk.to(tl.float32)
    pdl_trigger(PDL, PDL_LATE)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    m2 = tl.arange(0, 1)[:, None]
    n2 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    _store_split(y_ptr + m2 * stride_ym + n2, ws_ptr + m2 * N + n2, cnt_ptr + pid_n, out, m2 < M, n2 < N, N, SPLIT,
                 SPLIT_SUM)


@triton.jit
def _x_cols(x_cols, k0, offs_j, K, EVEN_K: tl.constexpr):
    """x^T ``[SUB, BLOCK_M]`` from code ``k0`` (zeros past K), for the swapped GEMM."""
    if EVEN_K:
        v = tl.load(x_cols + k0)
    else:
        v = tl.load(x_cols + k0, mask=(k0 + offs_j < K)[:, None], other=0.0)
    return v


@triton.jit
def _gemm_swap_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, stride_xm, stride_ym,
                      group_size, tiles_per_split, n_tiles, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, SUB: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT_F32: tl.constexpr = False, H2: tl.constexpr = False,
                      PAIR_GROUP: tl.constexpr = False, SPLIT_SUM: tl.constexpr = "atomic"):
    # Y^T = W X^T: the dequantized weight slice [BLOCK_N, SUB] is the *left* operand. On Hopper the
    # left wgmma operand may come from registers (the right one must sit in shared memory), so the
    # freshly dequantized weight goes straight into the tensor core and only x is staged; weight
    # rows fill the instruction's 64-wide M side, tokens its narrow N side (>= 16).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_n, pid_m = pid // grid_m, pid % grid_m  # neighbours share a weight tile: one DRAM read
    offs_n = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    offs_m = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1)
    offs_j = tl.max_contiguous(tl.arange(0, SUB), SUB)
    dtype = x_ptr.dtype.element_ty
    w_rows = w_ptr + offs_n[:, None] * Kw + offs_j[None, :]  # [BLOCK_N, SUB]
    x_cols = x_ptr + offs_m[None, :] * stride_xm + offs_j[:, None]  # [SUB, BLOCK_M]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    t_end = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t_end):
        w = tl.load(w_rows + t * SUB, eviction_policy="evict_first")
        if H2:  # as in _gemm_kernel: two slices per shift + LOP3, dequantized in half2
            for p in tl.static_range(4):
                ka = t * 8 * SUB + 2 * p * SUB
                wa, wb = _dq_pair(w, p, ka, s_ptr, o_ptr, offs_n, N, group_size, 0, SUB, HAS_ZERO, PAIR_GROUP)
                acc = tl.dot(wa, _x_cols(x_cols, ka, offs_j, K, EVEN_K), acc)
                acc = tl.dot(wb, _x_cols(x_cols, ka + SUB, offs_j, K, EVEN_K), acc)
        else:
            for i in tl.static_range(8):
                k0 = t * 8 * SUB + i * SUB
                xk = _x_cols(x_cols, k0, offs_j, K, EVEN_K)
                g = k0 // group_size
                s16, c = _group_affine(s_ptr + g * N + offs_n, o_ptr + g * N + offs_n, None, HAS_ZERO)
                wd = (_nibble_1p(w, i) * s16[:, None] - c[:, None]).to(dtype)
                if DOT_F32:
                    acc += tl.dot(wd.to(tl.float32), xk.to(tl.float32))
                else:
                    acc = tl.dot(wd, xk, acc)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    _store_split(y_ptrs, ws_ptrs, cnt_ptr + pid, out, (offs_m < M)[:, None], (offs_n < N)[None, :],
                 tl.cdiv(M, BLOCK_M) * BLOCK_M * N, SPLIT, SPLIT_SUM)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, out_ptr, N, K, Kw, group_size, HAS_ZERO: tl.constexpr,
                    BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    # One [BLOCK_N, 8 * SUB] tile of W in the activation dtype, for the dequantize + cuBLAS path.
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(offs_n, N - 1)[:, None]
    j = tl.arange(0, SUB)[None, :]
    w = tl.load(w_ptr + n * Kw + t * SUB + j, eviction_policy="evict_first")
    for i in tl.static_range(8):
        k0 = t * 8 * SUB + i * SUB
        g = k0 // group_size
        s16, c = _group_affine(s_ptr + g * N + n, o_ptr + g * N + n, None, HAS_ZERO)
        wd = _nibble_1p(w, i) * s16 - c
        mask = (offs_n < N)[:, None] & (k0 + j < K)
        tl.store(out_ptr + n * K + k0 + j, wd.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(w: TritonW4, dtype=torch.float16, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight ``[N, K]`` in ``dtype`` (same rounding as the fused kernels)."""
    out = torch.empty((w.out_features, w.in_features), device=w.qweight.device, dtype=dtype) if out is None else out
    block_n = 32
    grid = (triton.cdiv(w.out_features, block_n), w.n_tiles)
    offsets = w.offsets if w.offsets is not None else w.scales
    _dequant_kernel[grid](w.qweight, w.scales, offsets, out, w.out_features, w.in_features, w.qweight.shape[1],
                          w.group_size, HAS_ZERO=w.offsets is not None, BLOCK_N=block_n, SUB=w.block_k // 8,
                          num_warps=4)
    return out


def default_config(m: int, n: int, k: int, dtype=torch.float16) -> dict:
    """Launch parameters by batch size, from bench/kernel_sweep.py on an H100 (bench/results/).

    * M = 1, small layers (N * K < 4M, SmolLM2's): ``gemv_wide``, no split-K: 2.4-3.4 us, 1.35-1.5x
      cuBLAS, where the split-K GEMV took 4.0-4.8 us (its atomics and tile counter are latency).
      With PDL its first step of words is loaded before the wait (``early``: SmolLM2's decode step
      1345 -> 1376 tokens/s on an H100, bench/pdl_decode_check.py); ``gemv_h2`` keeps it off (its
      8 x 2 config went from 7.1 to 9.9 us per call at 4096 x 4096 in a chain, bench/pdl_sweep.py).
    * M = 1, large layers, fp16: ``gemv_h2`` (half2 dequantization), 2.5-3.1x cuBLAS on Llama-3-8B
      shapes (symmetric weights) where the fp32 ``gemv`` reached 1.6-1.8x. Narrow row blocks and
      wide steps over split-K: 8 rows x 2 K-tiles per program up to N = 4096, 16 x 4 above, 32 x 2
      for K >= 8192, split-K 4 only for long K with N <= 4096 (each within 4% of the shape's best
      of 96 configs, bench/kernel_sweep.py --kernels gemv_h2; re-chosen with ``s_ahead`` over four
      H100 runs: 4096 x 4096 8 x 2 6.66-6.79 us against 8 x 4 6.80-7.07, 14336 x 4096 16 x 4
      15.3-16.2 us against 32 x 2 15.8-16.6). The next step's x is loaded at the top of the
      current one (``x_ahead``: 6144 x 4096 9.1 -> 8.5 us, the other Llama shapes within 3%), and a
      step's four pairs of scales right after its words, before any arithmetic (``s_ahead``:
      4096 x 4096 7.34 -> 6.87 and 7.42 -> 7.03 us, 14336 x 4096 17.1 -> 15.8 us, 6144 x 4096 1-3%;
      long K, split-K, 1-2% slower, so not there). Not kept: the next step's words loaded early in
      registers (7-60% slower), a TMA prefetch of the program's words into L2 (5-35% slower), x
      loaded in the words' layout (10-60% slower). bf16 activations take the ``gemv``.
    * M = 1 on Hopper, K < 8192, symmetric weights (fp16): ``gemv_reg`` replaces ``gemv_h2``
      in :func:`w4a16_matmul` (gluon_gemv.py; :func:`tma_gemv_default`).
    * M = 2-16: ``gemm`` with M padded to 16, fp16 weights dequantized in half2 (``_DQ_*``):
      1.5-2.0x cuBLAS at M = 16, 1.4-1.7x at M = 4 (1.45-1.58x and 1.2-1.3x with the fp32 dequant).
      64 rows x 4 K-splits per program; for N >= 8192 (2048 <= K < 8192, the range around the one
      measured K) 128 rows x 2 K-splits, a quarter of the programs: 14336 x 4096 at M = 16
      28.9 -> 24.3 us (1.49x -> 1.77x; 36 configs, bench/results/gemm_m16_sweep_h100.jsonl),
      M = 2-8 1.41-1.53x -> 1.61-1.73x.
    * M = 17-128: ``gemm_swap`` (weight rows on the tensor core's wide side), fp16 weights
      dequantized in half2: 0.8-1.2x at M = 64 (0.7-1.0x with the fp32 dequant; ``gemm`` 0.5-0.65x).
    * On Hopper with fp16 activations, M > 16 goes to ``wgmma`` instead (see w4a16_matmul).
    * M > 128: ``dequant`` + cuBLAS, 0.5-0.6x at M = 256; every fused variant swept (``gemm``,
      ``gemm_swap``, and a ``gemm_swap`` staging x one K-slice per pipelined step, since removed)
      stayed at or below 0.47x there, with half2 dequantization too.
    """
    if m == 1:
        if n * k < 1 << 22:
            return dict(kernel="gemv_wide", block_n=8 if k < 1024 else 4, tiles=4, split=1, num_warps=4,
                        num_stages=1, early=True)
        if dtype == torch.float16:
            long_k = k >= 8192
            block_n, tiles = (32, 2) if long_k else (16, 4) if n > 4096 else (8, 2)
            return dict(kernel="gemv_h2", block_n=block_n, tiles=tiles, split=4 if long_k and n <= 4096 else 1,
                        num_warps=4, num_stages=1, x_ahead=True, s_ahead=not long_k)
        return dict(kernel="gemv", block_m=1, block_n=64, split=4, num_warps=4, num_stages=1)
    if m <= 16:
        if n >= 8192 and 2048 <= k < 8192:  # 14336 x 4096, M = 16: 28.9 -> 24.3 us (112 x 2 programs, not 224 x 4)
            return dict(kernel="gemm", block_m=16, block_n=128, split=2, num_warps=4, num_stages=3)
        return dict(kernel="gemm", block_m=16, block_n=64, split=4, num_warps=4, num_stages=3)
    if m <= 128:
        return dict(kernel="gemm_swap", block_m=32 if m <= 32 else 64, block_n=128, split=4, num_warps=8,
                    num_stages=2)
    return dict(kernel="dequant")


KERNELS = ("gemv", "gemv_h2", "gemv_wide", "gemm", "gemm_swap", "dequant", "wgmma", "gemv_tma", "gemv_reg")
_GLUON: list = []  # the optional Gluon modules, imported once: [module] or [None] (see _optional)
_TMA: list = []


def _optional(slot: list, name: str):
    """``klaq.kernels.<name>``, imported on first use into ``slot`` (None where this Triton has no
    Gluon); :func:`_try_optional` empties it for good when the kernel fails to build."""
    if not slot:
        try:
            slot.append(importlib.import_module(f"klaq.kernels.{name}"))
        except ImportError:
            slot.append(None)
    return slot[0]


def _try_optional(slot: list, what: str, fallback: str, call):
    """``call()`` (an optional Gluon kernel), or None after a warning, once, where it fails to build
    or launch (another Triton's Gluon API); ``slot`` then holds None, so it is never tried again."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - any build or launch failure of the optional kernel
        warnings.warn(f"the {what} is unavailable here ({type(exc).__name__}: {str(exc)[:200]}); using {fallback}",
                      RuntimeWarning, stacklevel=3)
        slot[0] = None
        return None


def wgmma_ok(x: torch.Tensor, k: int) -> bool:
    """Whether the Hopper kernel (gluon_w4a16.py) can take ``x``: fp16 on an sm_90 GPU, K a multiple
    of 8 (TMA's 16-byte row stride), and Triton's Gluon importable (not the interpreter)."""
    if _INTERPRET or not x.is_cuda or x.dtype != torch.float16 or k % 8:
        return False
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return False
    return _optional(_GLUON, "gluon_w4a16") is not None


def tma_gemv_default(k: int) -> bool:
    """Whether the dispatch sends ``gemv_h2``'s calls to gluon_gemv's ``gemv_reg`` (before it, ``gemv_tma``,
    whose numbers follow): for K below 8192, unless
    ``KLAQ_TMA_GEMV=0`` (read at each call). H100 (bench/results/kernels_h100_rb.md): a dependent chain
    with PDL as in a decode step, 4096x4096 4.8 us against gemv_h2's 7.0 (an earlier run), 6144x4096
    7.2 against 8.9, 14336x4096 14.6 against 14.8, but 4096x14336 21.2 against 17.4
    (bench/results/kernels_h100_tma.md); calls alone without PDL 6.18 / 8.26 / 15.02 us against
    gemv_h2's 6.66 / 8.36 / 15.14 (the first tile's scales, like its words, load at the start)."""
    return os.environ.get("KLAQ_TMA_GEMV", "1") != "0" and k < 8192


def tma_gemv_ok(x: torch.Tensor, w: TritonW4) -> bool:
    """Whether the Hopper Gluon GEMVs (gluon_gemv.py) can take this call: on what they take
    (:func:`gluon_gemv.gemv_tma_ok`) and where Gluon is importable (not the interpreter)."""
    if _INTERPRET or not x.is_cuda:
        return False
    module = _optional(_TMA, "gluon_gemv")
    return module is not None and module.gemv_tma_ok(x, w)


def early_words(early: bool | None, use_pdl: bool, cfg: dict) -> bool:
    """Whether a GEMV loads its first step of words before PDL's wait: as asked, else the config's
    choice, and that only with PDL (where the loads overlap the previous kernel; without it they are
    the loop's first step peeled off)."""
    return bool(early) if early is not None else use_pdl and bool(cfg.get("early", False))


def w4a16_matmul(x: torch.Tensor, w: TritonW4, kernel: str | None = None, block_m: int | None = None,
                 block_n: int | None = None, split: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, tiles: int | None = None,
                 h2: bool | None = None, x_ahead: bool | None = None,
                 s_ahead: bool | None = None, pdl: bool | None = None,
                 prefetch: bool | None = None, pdl_late: bool | None = None,
                 early: bool | None = None) -> torch.Tensor:
    """``x @ W.T`` for fp16/bf16 ``x [..., K]``; keyword arguments override :func:`default_config`.

    ``kernel``: ``gemv`` (CUDA cores, any small M), ``gemv_h2`` (M = 1, fp16, half2 arithmetic;
    ``tiles`` K-tiles per step), ``gemv_wide`` (M = 1, ``tiles`` K-tiles per step, fp32), ``gemm`` /
    ``gemm_swap`` (tensor cores, x or the weight as the left operand; ``h2=False`` keeps their fp32
    dequantization for fp16 x), or ``dequant`` (whole weight to x's dtype in a scratch buffer, then cuBLAS).
    ``pdl``: launch the GEMVs with programmatic dependent launch where supported (kernels/pdl.py;
    default: on unless ``KLAQ_PDL=0``), ``prefetch``: with it, their weight rows go to L2 before the wait,
    ``pdl_late``: the next kernel may launch only after the main loop (default: at the start),
    ``early``: ``gemv_h2`` and ``gemv_wide`` load their first step's words (``gemv_h2`` with
    ``s_ahead`` its scales too) before that wait (default: :func:`early_words`).
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"activations must be fp16 or bf16, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features).contiguous()
    m, n, k = x2.shape[0], w.out_features, w.in_features
    cfg = default_config(m, n, k, x.dtype)
    if kernel is not None and kernel != cfg["kernel"]:
        cfg = dict(kernel=kernel, block_m=16, block_n=32, split=1, num_warps=4, num_stages=2, tiles=1)
    if cfg["kernel"] == "gemv" and block_m is None:
        cfg["block_m"] = triton.next_power_of_2(m)
    for key, val in dict(block_m=block_m, block_n=block_n, split=split, num_warps=num_warps,
                         num_stages=num_stages, tiles=tiles, h2=h2, x_ahead=x_ahead,
                         s_ahead=s_ahead).items():
        if val is not None:
            cfg[key] = val
    kind = cfg["kernel"]
    if kind not in KERNELS:
        raise ValueError(f"unknown kernel {kind!r}; choose from {KERNELS}")
    if kind in ("gemv_wide", "gemv_h2", "gemv_tma", "gemv_reg") and m != 1:
        raise ValueError(f"{kind} takes one row of activations")
    if kind == "gemv_h2" and x.dtype != torch.float16:
        raise ValueError("gemv_h2 takes fp16 activations")
    if kind in ("gemm_swap", "dequant") and kernel is None and wgmma_ok(x2, k):
        # M > 16 on Hopper: 1.1-1.4x at M = 64, 0.8-0.94x at M = 256 (bench/kernels.py); from M = 129 the
        # 128 x 256 tiles where they fill the SMs (gluon_w4a16.gemm_prefill). A Triton whose Gluon cannot
        # build them (another version's API) falls back to the Triton GEMMs, once, with a warning.
        y = _try_optional(_GLUON, "Hopper wgmma kernel", "the Triton GEMMs", lambda: _GLUON[0].gemm_prefill(x2, w))
        if y is not None:
            return y.reshape(*lead, n)
    gemv = kind.startswith("gemv")
    use_pdl = gemv and pdl_for(x.device, pdl)
    if kind in ("gemv_tma", "gemv_reg"):
        if not tma_gemv_ok(x2, w):
            raise ValueError(f"the {kind} kernel needs one fp16 row on an sm_90 GPU, symmetric weights whose "
                             "group size is a multiple of block_k / 4, and Triton's Gluon")
        return getattr(_TMA[0], kind)(x2, w, pdl=use_pdl).reshape(*lead, n)
    if kind == "gemv_h2" and kernel is None and tma_gemv_default(k) and tma_gemv_ok(x2, w):
        # M = 1 on Hopper: gluon_gemv's register-load GEMV, every load issued before its arithmetic (with
        # PDL the words and scales before the wait). A Triton whose Gluon cannot build it falls back to
        # gemv_h2, once, with a warning.
        y = _try_optional(_TMA, "Hopper Gluon GEMV", "gemv_h2", lambda: _TMA[0].gemv_reg(x2, w, pdl=use_pdl))
        if y is not None:
            return y.reshape(*lead, n)
    if kind == "wgmma":
        if not wgmma_ok(x2, k):
            raise ValueError("the wgmma kernel needs fp16 activations on an sm_90 GPU, K % 8 == 0 and Triton's Gluon")
        return _GLUON[0].gemm_wgmma(x2, w).reshape(*lead, n)
    if kind == "dequant":
        y = torch.nn.functional.linear(x2, dequantize(w, x.dtype, _scratch(x.device, x.dtype, n * k).view(n, k)))
        return y.reshape(*lead, n)
    step = cfg.get("tiles", 1) if kind in ("gemv_wide", "gemv_h2") else 1
    split = max(1, min(cfg["split"], -(-w.n_tiles // step)))
    tps = -(-w.n_tiles // split)
    tps = -(-tps // step) * step  # whole steps per split
    split = -(-w.n_tiles // tps)  # no empty programs
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    pdl_meta = dict(PDL=use_pdl, PREFETCH=use_pdl and bool(prefetch), PDL_LATE=use_pdl and bool(pdl_late),
                    **launch_kwargs(use_pdl))
    use_early = early_words(early, use_pdl, cfg)
    tiles_out = triton.cdiv(n, cfg["block_n"]) * (1 if gemv else triton.cdiv(m, cfg["block_m"]))
    # split-K's workspace holds whole row tiles (rows past M too), one per split with "slots" (_SPLIT_SUM)
    ws_rows = triton.cdiv(m, cfg["block_m"]) * cfg["block_m"] if kind in ("gemv", "gemm", "gemm_swap") else m
    slots = split if _SPLIT_SUM == "slots" else 1
    ws, counters = _workspace(x.device, slots * ws_rows * n if split > 1 else 0, tiles_out)
    offsets = w.offsets if w.offsets is not None else w.scales  # unused when symmetric
    args = (x2, w.qweight, w.scales, offsets, y, ws, counters, m, n, k, w.qweight.shape[1], x2.stride(0),
            y.stride(0), w.group_size, tps, w.n_tiles)
    meta = dict(HAS_ZERO=w.offsets is not None, EVEN_K=k % w.block_k == 0, BLOCK_N=cfg["block_n"],
                SUB=w.block_k // 8, SPLIT=split, SPLIT_SUM=_SPLIT_SUM, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    dot_f32 = _INTERPRET and x.dtype == torch.bfloat16
    pair_group = w.group_size % (w.block_k // 4) == 0  # slices 2p and 2p + 1 always share a group
    if kind == "gemv":
        _gemv_kernel[(triton.cdiv(n, cfg["block_n"]), split)](*args, BLOCK_M=cfg["block_m"], **meta, **pdl_meta)
    elif kind == "gemv_h2":
        _gemv_h2_kernel[(triton.cdiv(n, cfg["block_n"]), split)](
            *args, TILES=step, PAIR_GROUP=pair_group, ASM=not _INTERPRET, X_AHEAD=bool(cfg.get("x_ahead", False)),
            S_AHEAD=bool(cfg.get("s_ahead", False)), EARLY=use_early, **meta, **pdl_meta)
    elif kind == "gemv_wide":
        _gemv_wide_kernel[(triton.cdiv(n, cfg["block_n"]), split)](*args, TILES=step,
                                                                   EARLY=use_early, **meta, **pdl_meta)
    else:
        grid = (triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"]), split)
        use_h2 = x.dtype == torch.float16 and not _INTERPRET and cfg.get("h2", True)
        kern = _gemm_kernel if kind == "gemm" else _gemm_swap_kernel
        kern[grid](*args, BLOCK_M=cfg["block_m"], DOT_F32=dot_f32, H2=use_h2, PAIR_GROUP=pair_group, **meta)
    return y.reshape(*lead, n)


_SCRATCH: dict = {}


def _scratch(device, dtype, numel: int) -> torch.Tensor:
    """One growing buffer per device and dtype for the dequantized weight (``dequant`` kernel)."""
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, device=device, dtype=dtype)
        _SCRATCH[(device, dtype)] = buf
    return buf[:numel]


_WORKSPACES: dict = {}

# How split-K adds up a tile (_store_split). "atomic" (the default): fp32 atomic adds into one
# workspace tile covering every row of the row tile, read back by atomics. "atomic_masked": the
# workspace masked by row too (rows past M left out), the layout of the sums that gave 15-17 wrong
# calls in 400 on an H100 at 14336 x 4096, M = 4 while the last program read them with a .cg load;
# with the atomic read none in 200, as for "atomic" (bench/results/splitk_race_h100.txt). "slots":
# one slot per split, added in split order: bit-identical calls for any split, 1 us slower at
# 4096 x 4096, M = 4 and 16 (bench/results/splitk_sum_ab_h100.md). The last two are kept for
# bench/splitk_race.py.
_SPLIT_SUM = "atomic"


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
