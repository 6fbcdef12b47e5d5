"""M = 1 GEMV whose dot products run on the tensor cores (Gluon, ``mma.sync``): ``gemv_mma``. Not in the
dispatch: exact, but slower than ``gemv_tma`` on the Llama shapes (below).

Why it was built: at batch 1 the other GEMVs spend about 1.6 instructions per weight on arithmetic (a
LOP3 and an FMA per pair of codes to make ``(q - 8) / 4`` exactly, then a half2 FMA with x; gluon_gemv.py's
SASS), and the last programs' arithmetic lands after the read floor (BENCHMARKS.md, "M = 1"). Here a pair
of codes costs one LOP3: it becomes the fp16 pair ``1024 + q`` (or ``1024 + 16 q`` for the odd nibbles)
and goes straight into the A operand of an ``mma.sync.m16n8k16`` whose B operand is x (the same x in
all eight columns), accumulating in fp32. The bias comes out once per group: ``sum (q - 8) x = C - 1032
sum x`` (even nibbles) or ``C / 16 - 72 sum x`` (odd), times the row's scale, with x's group sums taken
once per program in fp32. Products of fp16 values are exact in fp32, so this is more accurate than the
half2 sums of the other kernels (rel err 3.2-4.4e-4 against 4.6-7.1e-4 for the default in the same runs).

klaq's layout as it is (no copy of the weight): word j of tile T of a row holds code j of the tile's 8
slices, slices 2p and 2p + 1 in nibbles p and p + 4, so one LOP3 of the word (shifted by 8 for p >= 2)
gives pair p, the two codes ``SUB`` apart. The MMA's K order is free as long as A and B agree, so a
pair is one of its k-pairs and the B half2 is ``(x[2p SUB + j], x[(2p + 1) SUB + j])``. Lane (g, t) of a
warp holds 4 consecutive words (one 16-byte load) of rows g and g + 8 of a program's 16: with those, for
each pair p, two MMAs (words 4t, 4t + 1 and 4t + 2, 4t + 3 as k-pairs t and t + 4) cover 16 rows x 16
k-pairs of one group, so the scale applies to the accumulator once per tile. A program is 16 rows; each
of its ``W`` warps takes one tile (512 codes) of those rows per round and the warps' sums meet at the
end. All of a program's first-round words (and scales) are loaded before ``griddepcontrol.wait`` (they
never depend on an earlier kernel); x after it, staged once per round in shared memory as the B half2s.

Measured (one H100, bench/mma_gemv_probe.py; raw bench/results/mma_gemv_probe_h100.txt): its arithmetic
tail is shorter than gemv_tma's (kernel minus its own read floor 0.75 us against 0.99 at 4096x4096), but
its 16-row programs of 8 warps read slowly: read floor 6.89-6.94 us at 4096x4096 against gemv_tma's TMA
floor 5.32-5.33, so 7.5-7.7 us alone against 6.2-6.3 (2.1-2.2x cuBLAS against 2.6x). Words by coalesced
cp.async read no faster (floor 7.29 us), nor with the other word order or ``.cg`` loads (dd3f2c1 and its
results file).

Symmetric weights, fp16 x, ``SUB`` = 64 (512-code tiles) and groups of whole pairs. Gluon has no
interpreter mode, so the kernel runs on a GPU only (tests/kernels/test_gluon_gemv_mma.py); :func:`emulate`
is its arithmetic in numpy and bench/wgmma_ptxas.py its sm_90a build, both tested everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from klaq.kernels.gluon_w4a16 import _cta_barrier, _half2
from klaq.kernels.pdl import launch_kwargs, pdl_for
from klaq.kernels.triton_w4a16 import TritonW4

ROWS = gl.constexpr(16)  # rows per program: one MMA's M
SUB = gl.constexpr(64)  # words per tile and row (512-code tiles)
MAX_WARPS = 8
# (mask, bias, scale) per nibble parity: LOP3 with 0x64006400 gives the fp16 pair 1024 + q (even
# nibbles, bits 0-3 / 16-19) or 1024 + 16 q (odd, bits 4-7 / 20-23); sum (q - 8) x = C * scale - bias * sum x.
PARITY = {False: ("0x000f000f", 1032.0, 1.0), True: ("0x00f000f0", 72.0, 1.0 / 16.0)}
_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"


def _pair_ptx(odd: bool) -> str:
    """PTX: two MMAs of pair p into the accumulator. $4-$7: the 4 words of row g (shifted by 8 for
    p >= 2), $8-$11 those of row g + 8, $12-$15 the x half2s of k-pairs (words) 4t .. 4t + 3,
    $16-$19 the accumulator in, $0-$3 out."""
    mask = PARITY[odd][0]
    lines = [".reg .b32 a0, a1, a2, a3, k;", "mov.b32 k, 0x64006400;"]
    for half, (a, b) in enumerate(((4, 5), (6, 7))):
        lines += [f"lop3.b32 a0, ${a}, {mask}, k, 0xea;", f"lop3.b32 a1, ${a + 4}, {mask}, k, 0xea;",
                  f"lop3.b32 a2, ${b}, {mask}, k, 0xea;", f"lop3.b32 a3, ${b + 4}, {mask}, k, 0xea;"]
        acc = "{$16, $17, $18, $19}" if half == 0 else "{$0, $1, $2, $3}"
        lines += [f"{_MMA} {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}}, {{${12 + 2 * half}, ${13 + 2 * half}}}, {acc};"]
    return "{\n" + "\n".join(lines) + "\n}\n"


_PAIR_EVEN = gl.constexpr(_pair_ptx(False))
_PAIR_ODD = gl.constexpr(_pair_ptx(True))
_PAIR_CONS = gl.constexpr(",".join(["=f"] * 4 + ["r"] * 12 + ["f"] * 4))


@gluon.jit
def _iota(n: gl.constexpr, dim: gl.constexpr, L4: gl.constexpr):
    """``arange(n)`` along ``dim`` of a 4-D tensor in layout ``L4`` (size 1 on the other dims); the kernel's
    ``[warp, g, t, m]`` indices and :func:`_stage_x`'s ``[p, c, tile, j]``."""
    if dim == 0:
        v = gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        r = gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 1), 2), 3)
    elif dim == 1:
        v = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
        r = gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 2), 3)
    elif dim == 2:
        v = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(3, L4))))
        r = gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 0), 3)
    else:
        v = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L4))))
        r = gl.expand_dims(gl.expand_dims(gl.expand_dims(v, 0), 0), 0)
    return r


@gluon.jit
def _words(w_ptr, rows, tile, c: gl.constexpr, t, m, N, Kw, NT):
    """Words 16c + 4t .. 16c + 4t + 3 of tile ``tile`` of ``rows`` (one 16-byte load per lane)."""
    off = tile * SUB + 16 * c + 4 * t + m
    return gl.load(w_ptr + rows * Kw + off, mask=(rows < N) & (tile < NT), other=0)


@gluon.jit
def _scales(s_ptr, rows_m, tile, p: gl.constexpr, N, group_size, NT):
    """Pair p's scales (fp32) for the accumulator's elements (rows g, g, g + 8, g + 8)."""
    grp = (tile * (8 * SUB) + 2 * p * SUB) // group_size
    return gl.load(s_ptr + grp * N + rows_m, mask=(rows_m < N) & (tile < NT), other=0.0).to(gl.float32)


@gluon.jit
def _load(w_ptr, s_ptr, ra, rb, rows_m, tile, t, m, N, Kw, group_size, NT):
    """A warp's tile: its 8 x 4 words per lane (chunks 0-3 of rows g and g + 8) and its 4 pairs' scales."""
    return (_words(w_ptr, ra, tile, 0, t, m, N, Kw, NT), _words(w_ptr, rb, tile, 0, t, m, N, Kw, NT),
            _words(w_ptr, ra, tile, 1, t, m, N, Kw, NT), _words(w_ptr, rb, tile, 1, t, m, N, Kw, NT),
            _words(w_ptr, ra, tile, 2, t, m, N, Kw, NT), _words(w_ptr, rb, tile, 2, t, m, N, Kw, NT),
            _words(w_ptr, ra, tile, 3, t, m, N, Kw, NT), _words(w_ptr, rb, tile, 3, t, m, N, Kw, NT),
            _scales(s_ptr, rows_m, tile, 0, N, group_size, NT), _scales(s_ptr, rows_m, tile, 1, N, group_size, NT),
            _scales(s_ptr, rows_m, tile, 2, N, group_size, NT), _scales(s_ptr, rows_m, tile, 3, N, group_size, NT))


@gluon.jit
def _stage_x(x_ptr, xs, sxs, tile0, K, NT, W: gl.constexpr):
    """x of tiles tile0 .. tile0 + W - 1 as the MMAs' B half2s, into shared memory: ``xs[(4p + c) W + w, 4t + m]``
    is ``(x[k], x[k + SUB])`` for k = tile w's first code + 2p SUB + 16c + 4t + m; ``sxs[p W + w]`` the fp32
    sum of the 128 x of pair p of tile w (both slices)."""
    LX: gl.constexpr = gl.BlockedLayout([1, 1, 1, 8], [4, 4, 1, 2], [1, 1, W, 1], [3, 2, 1, 0])
    p = _iota(4, 0, LX)
    c = _iota(4, 1, LX)
    tile = tile0 + _iota(W, 2, LX)
    j = _iota(16, 3, LX)
    k = tile * (8 * SUB) + 2 * p * SUB + 16 * c + j
    ok = tile < NT
    xa = gl.load(x_ptr + k, mask=ok & (k < K), other=0.0)
    xb = gl.load(x_ptr + k + SUB, mask=ok & (k + SUB < K), other=0.0)
    xs.store(gl.reshape(_half2(xa, xb), [16 * W, 16]))
    sxs.store(gl.reshape(gl.sum(gl.sum(xa.to(gl.float32) + xb.to(gl.float32), axis=3), axis=1), [4 * W]))


@gluon.jit
def _xpair(xs, p: gl.constexpr, c: gl.constexpr, W: gl.constexpr, L4: gl.constexpr):
    """Pair p's B half2s of chunk c for each warp's tile: ``[W, 1, 4, 4]`` (all g alike)."""
    LR: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [W, 1], [1, 0])  # lane 4g + t: row w, 4t .. 4t + 3
    v = xs.slice((4 * p + c) * W, W, dim=0).load(LR)
    return gl.expand_dims(gl.convert_layout(gl.reshape(v, [W, 4, 4]), gl.SliceLayout(1, L4)), 1)


@gluon.jit
def _pair(wa, wb, xp, acc, ODD: gl.constexpr):
    """Pair p's two MMAs into ``acc``."""
    if ODD:
        acc = gl.inline_asm_elementwise(_PAIR_ODD, _PAIR_CONS, [wa, wb, xp, acc], dtype=gl.float32, is_pure=True,
                                        pack=4)
    else:
        acc = gl.inline_asm_elementwise(_PAIR_EVEN, _PAIR_CONS, [wa, wb, xp, acc], dtype=gl.float32, is_pure=True,
                                        pack=4)
    return acc


@gluon.jit
def _chunk(xs, wa, wb, c: gl.constexpr, a0, a1, a2, a3, W: gl.constexpr, L4: gl.constexpr):
    """The 4 pairs of one chunk (words 16c .. 16c + 15 of the tile) into the accumulators."""
    wa8 = wa >> 8
    wb8 = wb >> 8
    a0 = _pair(wa, wb, _xpair(xs, 0, c, W, L4), a0, False)
    a1 = _pair(wa, wb, _xpair(xs, 1, c, W, L4), a1, True)
    a2 = _pair(wa8, wb8, _xpair(xs, 2, c, W, L4), a2, False)
    a3 = _pair(wa8, wb8, _xpair(xs, 3, c, W, L4), a3, True)
    return a0, a1, a2, a3


@gluon.jit
def _unbias(acc, sxs, sc, p: gl.constexpr, W: gl.constexpr, L4: gl.constexpr):
    """Pair p's ``scale * sum (q - 8) x`` from its accumulator and its tile's sum of x (see PARITY)."""
    sx = sxs.slice(p * W, W, dim=0).load(gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    sx = gl.expand_dims(gl.expand_dims(gl.expand_dims(sx, 1), 2), 3)
    if p % 2 == 1:
        v = acc * (1.0 / 16.0) - 72.0 * sx
    else:
        v = acc - 1032.0 * sx
    return sc * v


@gluon.jit
def _round(x_ptr, xs, sxs, tile0, K, nt, wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, sc0, sc1, sc2, sc3, res,
           W: gl.constexpr, L4: gl.constexpr):
    """One round: x of tiles tile0 .. tile0 + W - 1 staged, each warp's tile through its 32 MMAs, unbiased,
    scaled and added to ``res``."""
    _stage_x(x_ptr, xs, sxs, tile0, K, nt, W)
    _cta_barrier()
    a0 = gl.zeros([W, 8, 4, 4], gl.float32, layout=L4)
    a1 = gl.zeros([W, 8, 4, 4], gl.float32, layout=L4)
    a2 = gl.zeros([W, 8, 4, 4], gl.float32, layout=L4)
    a3 = gl.zeros([W, 8, 4, 4], gl.float32, layout=L4)
    a0, a1, a2, a3 = _chunk(xs, wa0, wb0, 0, a0, a1, a2, a3, W, L4)
    a0, a1, a2, a3 = _chunk(xs, wa1, wb1, 1, a0, a1, a2, a3, W, L4)
    a0, a1, a2, a3 = _chunk(xs, wa2, wb2, 2, a0, a1, a2, a3, W, L4)
    a0, a1, a2, a3 = _chunk(xs, wa3, wb3, 3, a0, a1, a2, a3, W, L4)
    res += _unbias(a0, sxs, sc0, 0, W, L4) + _unbias(a1, sxs, sc1, 1, W, L4)
    return res + _unbias(a2, sxs, sc2, 2, W, L4) + _unbias(a3, sxs, sc3, 3, W, L4)


@gluon.jit
def _gemv_mma_kernel(w_ptr, x_ptr, s_ptr, y_ptr, N, K, Kw, group_size, ONE_ROUND: gl.constexpr, PDL: gl.constexpr,
                     num_warps: gl.constexpr, FLOOR: gl.constexpr = False):
    # Tensors are [warp, g, t, m]: lane 4g + t of warp w; m is the element of a lane's 16-byte load and,
    # for the MMA's accumulator, c0..c3 (rows g, g, g + 8, g + 8; the columns all hold the same sum).
    # Warp w takes tiles w, w + W, ...: one per round of the loop, whose next round's words load after
    # this round's MMAs (loaded with them, ptxas would keep every round's words in registers).
    # ONE_ROUND (a row's tiles <= W): no loop (its carried words cost 23 registers: 103 against 80 at
    # 4096 x 4096, so 2 programs per SM instead of 3). FLOOR (benchmarks only): the same loads, each row's
    # output the XOR of its words (the read floor).
    W: gl.constexpr = num_warps
    L4: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 8, 4, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    SH2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    SH1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    xs = gl.allocate_shared_memory(gl.int32, [16 * W, 16], SH2)
    sxs = gl.allocate_shared_memory(gl.float32, [4 * W], SH1)
    nt = Kw // SUB
    row0 = gl.program_id(0) * ROWS
    wi = _iota(W, 0, L4)
    g = _iota(8, 1, L4)
    t = _iota(4, 2, L4)
    m = _iota(4, 3, L4)
    ra = row0 + g
    rb = ra + 8
    rows_m = ra + 8 * (m // 2)
    wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, sc0, sc1, sc2, sc3 = _load(w_ptr, s_ptr, ra, rb, rows_m, wi, t, m, N, Kw,
                                                                       group_size, nt)
    if FLOOR:
        chk = wa0 ^ wb0 ^ wa1 ^ wb1 ^ wa2 ^ wb2 ^ wa3 ^ wb3
        tot = gl.sum(gl.sum(gl.sum(chk, axis=0), axis=1), axis=1).to(gl.float16)
        gl.store(y_ptr + row0 + gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(1, gl.SliceLayout(0, L4)))),
                 tot)
    else:
        if PDL:  # the words and scales never depend on an earlier kernel; x may
            gdc_launch_dependents()
            gdc_wait()
        res = gl.zeros([W, 8, 4, 4], gl.float32, layout=L4)
        if ONE_ROUND:
            res = _round(x_ptr, xs, sxs, 0, K, nt, wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, sc0, sc1, sc2, sc3, res, W, L4)
        else:
            for tile0 in range(0, nt, W):
                res = _round(x_ptr, xs, sxs, tile0, K, nt, wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, sc0, sc1, sc2, sc3,
                             res, W, L4)
                _cta_barrier()  # every warp has read this round's x before the next round's overwrites it
                if tile0 + W < nt:
                    wa0, wb0, wa1, wb1, wa2, wb2, wa3, wb3, sc0, sc1, sc2, sc3 = _load(
                        w_ptr, s_ptr, ra, rb, rows_m, tile0 + W + wi, t, m, N, Kw, group_size, nt)
        # The warps' tiles meet; each row's sum sits in the 4 lanes t (equal copies, so * 0.25 is exact) and in
        # two columns (m = 0, 1 for row g; 2, 3 for g + 8), of which the even m is stored.
        tot = gl.sum(gl.sum(res, axis=0), axis=1) * 0.25  # [g, m]
        LT: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(0, L4))
        gg = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, LT)), 1)
        mm = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, LT)), 0)
        rows = row0 + gg + 8 * (mm // 2)
        gl.store(y_ptr + rows, tot.to(gl.float16), mask=(rows < N) & (mm % 2 == 0))


def gemv_mma_ok(x: torch.Tensor, w: TritonW4) -> bool:
    """Whether ``gemv_mma`` takes ``x`` (one fp16 row on an sm_80+ GPU) against ``w``: symmetric weights
    in 512-code tiles whose pairs of slices share a group."""
    return (x.is_cuda and x.dtype == torch.float16 and w.offsets is None and w.block_k == 8 * SUB.value
            and w.group_size % (2 * SUB.value) == 0 and torch.cuda.get_device_capability(x.device)[0] >= 8)


def warps_for(n_tiles: int) -> int:
    """Warps per program: one per tile of a row, at most :data:`MAX_WARPS`, a power of two."""
    return min(MAX_WARPS, triton.next_power_of_2(n_tiles))


def gemv_mma(x: torch.Tensor, w: TritonW4, pdl: bool | None = None, warps: int | None = None,
             floor: bool = False) -> torch.Tensor:
    """``x @ W.T`` for one fp16 row ``x [1, K]`` (see :func:`gemv_mma_ok`): programs of 16 rows, one
    warp per 512-code tile (``warps``, default :func:`warps_for`). ``floor=True`` (benchmarks only): the
    read floor, each row's output the XOR of its words (rows 0-7 of each program)."""
    n, kw = w.qweight.shape
    use_pdl = pdl_for(x.device, pdl)
    nt = kw // SUB.value
    x2 = x.reshape(1, w.in_features).contiguous()
    y = torch.empty((1, n), device=x.device, dtype=torch.float16)
    warps = warps or warps_for(nt)
    _gemv_mma_kernel[(triton.cdiv(n, ROWS.value),)](w.qweight, x2, w.scales, y, n, w.in_features, kw, w.group_size,
                                              ONE_ROUND=nt <= warps, PDL=use_pdl, num_warps=warps, FLOOR=floor,
                                              **launch_kwargs(use_pdl))
    return y.reshape(*x.shape[:-1], n)


def emulate(x: np.ndarray, words: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """The kernel's arithmetic in numpy, for one fp16 row ``x [K]``: per row, tile and pair, the fp32 sum
    of ``(1024 + q) x`` (``1024 + 16 q`` for odd nibbles) and of x, unbiased and scaled as the kernel
    does. ``words [N, Kw]`` int32 in klaq's layout (SUB = 64), ``scales [G, N]`` fp16. Returns fp32 [N]."""
    n, kw = words.shape
    sub = SUB.value
    nt = kw // sub
    kp = nt * 8 * sub
    xp = np.zeros(kp, dtype=np.float32)
    xp[: x.shape[0]] = x.astype(np.float32)
    w = words.view(np.uint32).reshape(n, nt, sub)
    out = np.zeros(n, dtype=np.float64)
    for tile in range(nt):
        for p in range(4):
            odd = bool(p % 2)
            shift = 4 * p  # nibble p's first bit (nibble p + 4 is 16 bits above)
            lo = ((w[:, tile] >> shift) & 0xF).astype(np.float32)
            hi = ((w[:, tile] >> (shift + 16)) & 0xF).astype(np.float32)
            f = 16.0 if odd else 1.0
            base = tile * 8 * sub + 2 * p * sub
            xa, xb = xp[base: base + sub], xp[base + sub: base + 2 * sub]
            acc = ((1024 + f * lo) * xa).sum(axis=1, dtype=np.float32) + ((1024 + f * hi) * xb).sum(axis=1,
                                                                                                 dtype=np.float32)
            sx = np.float32(xa.sum(dtype=np.float32) + xb.sum(dtype=np.float32))
            _, bias, scale = PARITY[odd]
            grp = base // group_size
            out += scales[grp].astype(np.float32) * (acc * np.float32(scale) - np.float32(bias) * sx)
    return out.astype(np.float32)
