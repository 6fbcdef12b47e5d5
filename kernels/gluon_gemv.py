"""Hopper M = 1 GEMVs (Gluon): ``gemv_reg``, the dispatch's, and ``gemv_tma``, whose words arrive by TMA.

Why: at batch 1 a GEMV of a Llama-sized layer is a few microseconds, and about 2 us of it is fixed
cost: the launch, the first DRAM round trip, and the tail while the last programs finish
(BENCHMARKS.md, "M = 1"). Both kernels read a program's whole weight range at its start (with
programmatic dependent launch *before* ``griddepcontrol.wait``: the weights never depend on the
previous kernel, so in a chain of GEMVs, a decode step, each call's weights stream in while the call
before it computes) and share their arithmetic: each thread holds ``BLOCK_N / WR`` rows x one quad of 4
consecutive words of a chunk; x's pairs are loaded once per thread and broadcast over its rows in
registers, a pair's scales for those rows are one contiguous load from the ``[G, N]`` layout, and the
4 words of a quad share a pair's scale, so gemv_h2's symmetric half2 column sum (``_colsum_ptx``)
applies to the quad as it sits in registers.

* ``gemv_reg``: 4-row programs load their words straight into registers (16-byte loads, evict-first)
  and their scales, then x, all before any arithmetic. Written in that order on purpose: with x loaded
  at each pair's turn ptxas sank those loads past the earlier pairs' arithmetic, one L2 round trip
  after another once the words had landed (bench/wgmma_ptxas.py ``--kernel gemv_reg`` checks the SASS).
  H100 (bench/results/reg_gemv_probe_h100.txt): 5.41 / 7.04 / 12.73 us alone on 4096x4096 / 6144x4096
  / 14336x4096 (3.06x / 3.07x / 3.32x cuBLAS; ``gemv_tma`` 6.21 / 8.06 / 14.16 in the same run), read
  floor 4.85 us at 4096x4096 against the TMA kernel's 5.13.
* ``gemv_tma``: one thread per program issues TMA copies of the words into shared memory. A program
  owns ``RB`` blocks of ``BLOCK_N`` rows; the first tile's scales are loaded before the wait too.
  (Programs of several row blocks stay slower than one block even with all their scales in the words'
  TMA transaction, and so does their read floor: BENCHMARKS.md, "M = 1, scales by TMA with the words";
  that variant is bench/results/gluon_gemv_tma_scales.diff.) By name (``kernel="gemv_tma"``);
  :func:`config_for` picks its launch.

Symmetric weights, fp16 x, and both slices of a pair in one group (``2 * SUB`` divides the group
size); anything else takes ``gemv_h2``. The dispatch (triton_w4a16.w4a16_matmul) takes ``gemv_reg`` in
place of ``gemv_h2`` where K < 8192, with PDL or without (:func:`triton_w4a16.tma_gemv_default`;
``KLAQ_TMA_GEMV=0`` turns it off); at 4096x14336 the TMA kernel was slower than gemv_h2 (2.16x against
2.65x in a chain), hence the K rule. Between K = 4096 and 8192 (512-code tiles) a ``gemv_reg`` row is
two chunks, and ptxas then places 11-13 of its 32 loads after the first arithmetic (unmeasured there).
Gluon has no interpreter mode, so the kernels are tested on a Hopper GPU only
(tests/kernels/test_gluon_gemv.py); the rules that pick them and size the TMA ring are tested everywhere.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from klaq.kernels.gluon_w4a16 import _cta_barrier, _half2, _sm_count, _tma_load
from klaq.kernels.pdl import launch_kwargs, pdl_for
from klaq.kernels.triton_w4a16 import _H2_SUM, TritonW4, _colsum_ptx

# gemv_h2's column sum for one quad under ``pack=4``: $4-$7 the 4 words, $8-$11 their x pairs
# (halved), $12 the pair's scales, $16 the half2 sum; the sum goes to $0, $1-$3 are set to 0.
_C4_EVEN = gl.constexpr(_colsum_ptx(False, words=4, xs=8, scale=12, acc=16, zero_outs=(1, 2, 3)))
_C4_ODD = gl.constexpr(_colsum_ptx(True, words=4, xs=8, scale=12, acc=16, zero_outs=(1, 2, 3)))
_CONS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 16))
_SUM = gl.constexpr(_H2_SUM.value)
MAX_SMEM = 96 * 1024  # a program's ring: at most this much, so two kernels' programs share an SM


@gluon.jit
def _issue(w_desc, w_smem, bars, row0, t, n_chunks, n_tiles, CW: gl.constexpr, BLOCK_N: gl.constexpr,
           STAGES: gl.constexpr):
    """TMA tile ``t`` (row block ``t // n_chunks``, chunk ``t % n_chunks``: CW words of each of its
    rows) into its stage, in boxes of at most 256 words (TMA's box limit); rows past N and words past
    the row are zero-filled."""
    BOX: gl.constexpr = w_desc.block_type.shape[1]
    ok = t < n_tiles
    st = t % STAGES
    row = row0 + (t // n_chunks) * BLOCK_N
    col = (t % n_chunks) * CW
    mbarrier.expect(bars.index(st), w_desc.block_type.nbytes * (CW // BOX), pred=ok)
    for j in gl.static_range(CW // BOX):
        _tma_load(w_desc, [row, col + j * BOX], bars.index(st), w_smem.index(st).slice(j * BOX, BOX, dim=1),
                  pred=ok)


@gluon.jit
def _x(x_ptr, c, quad_x, c_x, p: gl.constexpr, zero, K, Q: gl.constexpr, SUB: gl.constexpr):
    """Pair p's x of chunk c (halved, as half2, broadcast over the rows)."""
    wx = (c * Q + gl.expand_dims(quad_x, 1)) * 4 + gl.expand_dims(c_x, 0)
    ka = (wx // SUB) * (8 * SUB) + wx % SUB + 2 * p * SUB
    xa = gl.load(x_ptr + ka, mask=ka < K, other=0.0)
    xb = gl.load(x_ptr + ka + SUB, mask=ka + SUB < K, other=0.0)
    return gl.expand_dims(_half2(xa * 0.5, xb * 0.5), 0) + zero


@gluon.jit
def _s(s_ptr, c, quad_s, p: gl.constexpr, s_rows, N, Kw, group_size, Q: gl.constexpr, SUB: gl.constexpr):
    """Pair p's raw scales ``[BLOCK_N, Q]`` of chunk c (both slices of a pair share a group)."""
    ks = ((c * Q + quad_s) * 4 // SUB) * (8 * SUB)
    live = gl.expand_dims(c * Q + quad_s < Kw // 4, 0)
    g = gl.expand_dims((ks + 2 * p * SUB) // group_size, 0)
    return gl.load(s_ptr + g * N + s_rows, mask=(s_rows < N) & live, other=0.0)


@gluon.jit
def _scales(s_ptr, c, quad_s, s_rows, N, Kw, group_size, Q: gl.constexpr, SUB: gl.constexpr):
    """The 4 pairs' raw scales of chunk c (:func:`_s`)."""
    return (_s(s_ptr, c, quad_s, 0, s_rows, N, Kw, group_size, Q, SUB),
            _s(s_ptr, c, quad_s, 1, s_rows, N, Kw, group_size, Q, SUB),
            _s(s_ptr, c, quad_s, 2, s_rows, N, Kw, group_size, Q, SUB),
            _s(s_ptr, c, quad_s, 3, s_rows, N, Kw, group_size, Q, SUB))


@gluon.jit
def _colsum(words, x2, s, a2, p: gl.constexpr):
    """Pair p's symmetric half2 column sum over each quad (the sum in slot 0 of the quad)."""
    s2 = gl.expand_dims(_half2(s, s), 2) + gl.zeros_like(words)
    if p < 2:
        v = words
    else:
        v = words >> 8
    if p % 2 == 0:
        return gl.inline_asm_elementwise(_C4_EVEN, _CONS, [v, x2, s2, a2], dtype=gl.int32, is_pure=True, pack=4)
    return gl.inline_asm_elementwise(_C4_ODD, _CONS, [v, x2, s2, a2], dtype=gl.int32, is_pure=True, pack=4)


@gluon.jit
def _words(w_desc, w_smem, bars, row0, t, n_chunks, n_tiles, BLOCK_N: gl.constexpr, Q: gl.constexpr,
           STAGES: gl.constexpr, L3: gl.constexpr):
    """Tile t's words ``[BLOCK_N, Q, 4]`` once they have landed; its stage then takes tile t + STAGES."""
    st = t % STAGES
    mbarrier.wait(bars.index(st), (t // STAGES) & 1)
    words = w_smem.index(st).reshape([BLOCK_N, Q, 4]).load(L3)
    if n_tiles > STAGES:  # refill this stage (all warps have read it)
        _cta_barrier()
        _issue(w_desc, w_smem, bars, row0, t + STAGES, n_chunks, n_tiles, 4 * Q, BLOCK_N, STAGES)
    return words


@gluon.jit
def _chunk(w_desc, w_smem, bars, x_ptr, ss0, ss1, ss2, ss3, acc, row0, t, c, n_chunks, n_tiles, quad_x, c_x,
           zero, K, BLOCK_N: gl.constexpr, Q: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr,
           L3: gl.constexpr):
    """``acc`` plus tile t's sums (chunk c of its row block, whose scales are ``ss0``-``ss3``): x is
    loaded before waiting for the words."""
    xs0 = _x(x_ptr, c, quad_x, c_x, 0, zero, K, Q, SUB)
    xs1 = _x(x_ptr, c, quad_x, c_x, 1, zero, K, Q, SUB)
    xs2 = _x(x_ptr, c, quad_x, c_x, 2, zero, K, Q, SUB)
    xs3 = _x(x_ptr, c, quad_x, c_x, 3, zero, K, Q, SUB)
    words = _words(w_desc, w_smem, bars, row0, t, n_chunks, n_tiles, BLOCK_N, Q, STAGES, L3)
    a2 = _colsum(words, xs0, ss0, zero, 0)
    a2 = _colsum(words, xs1, ss1, a2, 1)
    a2 = _colsum(words, xs2, ss2, a2, 2)
    a2 = _colsum(words, xs3, ss3, a2, 3)
    return acc + gl.inline_asm_elementwise(_SUM, "=f,r", [gl.sum(a2, axis=2)], dtype=gl.float32, is_pure=True,
                                           pack=1)


@gluon.jit
def _chunk_floor(w_desc, w_smem, bars, chk, row0, t, n_chunks, n_tiles, BLOCK_N: gl.constexpr, Q: gl.constexpr,
                 STAGES: gl.constexpr, L3: gl.constexpr):
    """The read floor's tile: the same waits, the words XORed into ``chk``."""
    return chk ^ _words(w_desc, w_smem, bars, row0, t, n_chunks, n_tiles, BLOCK_N, Q, STAGES, L3)


@gluon.jit
def _gemv_tma_kernel(w_desc, x_ptr, s_ptr, y_ptr, N, K, Kw, group_size, BLOCK_N: gl.constexpr, WR: gl.constexpr,
                     WQ: gl.constexpr, RB: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr,
                     PDL: gl.constexpr, num_warps: gl.constexpr, COMPUTE: gl.constexpr = True,
                     EARLY_S: gl.constexpr = True):
    # A program owns RB blocks of BLOCK_N rows, one after the other; its tiles (row block, chunk) go
    # through a ring of STAGES buffers. COMPUTE=False (bench/tma_gemv_probe.py --floor): the same
    # loads and waits, no arithmetic; each row's output is then the XOR of its words (the read floor).
    # EARLY_S: the first tile's scales are loaded before the PDL wait, like the words (the other tiles'
    # at their turn: loading the second row block's early too took 71 -> 125 registers at 4:1:4 x 2).
    RPT: gl.constexpr = BLOCK_N // WR  # rows per thread
    Q: gl.constexpr = 32 * WQ  # quads (4 words) per chunk and row
    L3: gl.constexpr = gl.BlockedLayout([RPT, 1, 4], [1, 32, 1], [WR, WQ, 1], [2, 0, 1])
    LS: gl.constexpr = gl.SliceLayout(2, L3)  # [BLOCK_N, Q]
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # [Q, 4]
    pid = gl.program_id(0)
    row0 = pid * (RB * BLOCK_N)
    n_chunks = gl.cdiv(Kw, 4 * Q)
    n_tiles = RB * n_chunks

    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 4 * Q], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    for b in gl.static_range(STAGES):
        _issue(w_desc, w_smem, bars, row0, b, n_chunks, n_tiles, 4 * Q, BLOCK_N, STAGES)
    quad_s = gl.arange(0, Q, layout=gl.SliceLayout(0, LS))
    quad_x = gl.arange(0, Q, layout=gl.SliceLayout(1, LX))
    c_x = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))
    zero = gl.zeros([BLOCK_N, Q, 4], gl.int32, layout=L3)
    rows_b = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    if EARLY_S:  # the first tile's scales are in flight during the wait, like its words
        e0, e1, e2, e3 = _scales(s_ptr, 0, quad_s, gl.expand_dims(row0 + rows_b, 1), N, Kw, group_size, Q, SUB)
    if PDL:  # the words and scales never depend on an earlier kernel; x (and y's buffer) may
        gdc_launch_dependents()
        gdc_wait()

    for r in gl.static_range(RB):
        rows = row0 + r * BLOCK_N + rows_b
        s_rows = gl.expand_dims(rows, 1)
        acc = gl.zeros([BLOCK_N, Q], gl.float32, layout=LS)
        chk = gl.zeros([BLOCK_N, Q, 4], gl.int32, layout=L3)
        c0 = 0
        if COMPUTE and EARLY_S and r == 0:
            acc = _chunk(w_desc, w_smem, bars, x_ptr, e0, e1, e2, e3, acc, row0, 0, 0, n_chunks, n_tiles, quad_x, c_x,
                         zero, K, BLOCK_N, Q, SUB, STAGES, L3)
            c0 = 1
        for c in range(c0, n_chunks):
            t = r * n_chunks + c
            if COMPUTE:
                ss0, ss1, ss2, ss3 = _scales(s_ptr, c, quad_s, s_rows, N, Kw, group_size, Q, SUB)
                acc = _chunk(w_desc, w_smem, bars, x_ptr, ss0, ss1, ss2, ss3, acc, row0, t, c, n_chunks, n_tiles,
                             quad_x, c_x, zero, K, BLOCK_N, Q, SUB, STAGES, L3)
            else:
                chk = _chunk_floor(w_desc, w_smem, bars, chk, row0, t, n_chunks, n_tiles, BLOCK_N, Q, STAGES, L3)
        if COMPUTE:
            out = gl.sum(acc, axis=1) * 8.0  # weights were (q - 8) / 4, x / 2
        else:
            out = gl.sum(gl.sum(chk, axis=2), axis=1).to(gl.float32)
        gl.store(y_ptr + rows, out.to(gl.float16), mask=rows < N)
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(b))


@gluon.jit
def _gemv_reg_kernel(w_ptr, x_ptr, s_ptr, y_ptr, N, K, Kw, group_size, BLOCK_N: gl.constexpr, WR: gl.constexpr,
                     WQ: gl.constexpr, NCH: gl.constexpr, SUB: gl.constexpr, PDL: gl.constexpr,
                     num_warps: gl.constexpr, COMPUTE: gl.constexpr = True):
    # One program: BLOCK_N rows x the whole row, as NCH chunks of 32 * WQ quads (each thread one quad of
    # each chunk for BLOCK_N / WR rows; the chunks are the layout's repetition). Every load is written
    # before any arithmetic, words and scales before the PDL wait, x's four pairs right after it: had x
    # been loaded at each pair's turn (as _chunk's order reads), ptxas would sink those loads past the
    # earlier pairs' arithmetic, one L2 round trip after another once the words land. K, the row's words
    # and the group size stay runtime values: compile-time ones cut the index arithmetic (534 -> 451 SASS
    # instructions) but were slower alone, 5.90 / 5.57 us against 5.42 at 4096x4096 with or without a
    # dependency that keeps x's loads first (bench/results/gemv_reg_ab_h100.txt).
    RPT: gl.constexpr = BLOCK_N // WR
    QT: gl.constexpr = NCH * 32 * WQ
    L3: gl.constexpr = gl.BlockedLayout([RPT, 1, 4], [1, 32, 1], [WR, WQ, 1], [2, 0, 1])
    LS: gl.constexpr = gl.SliceLayout(2, L3)
    LX: gl.constexpr = gl.SliceLayout(0, L3)
    rows = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    quad = gl.arange(0, QT, layout=gl.SliceLayout(0, LS))
    col = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))
    r3 = gl.expand_dims(gl.expand_dims(rows, 1), 2)
    q3 = gl.expand_dims(gl.expand_dims(quad, 0), 2)
    c3 = gl.expand_dims(gl.expand_dims(col, 0), 0)
    # streamed once per call: evict_first keeps x (read by every program) in the caches
    words = gl.load(w_ptr + r3 * Kw + q3 * 4 + c3, mask=(r3 < N) & (q3 < Kw // 4), other=0,
                    eviction_policy="evict_first")
    s_rows = gl.expand_dims(rows, 1)
    if COMPUTE:
        s0 = _s(s_ptr, 0, quad, 0, s_rows, N, Kw, group_size, QT, SUB)
        s1 = _s(s_ptr, 0, quad, 1, s_rows, N, Kw, group_size, QT, SUB)
        s2 = _s(s_ptr, 0, quad, 2, s_rows, N, Kw, group_size, QT, SUB)
        s3 = _s(s_ptr, 0, quad, 3, s_rows, N, Kw, group_size, QT, SUB)
    if PDL:  # the words and scales never depend on an earlier kernel; x (and y's buffer) may
        gdc_launch_dependents()
        gdc_wait()
    if COMPUTE:
        zero = gl.zeros([BLOCK_N, QT, 4], gl.int32, layout=L3)
        quad_x = gl.arange(0, QT, layout=gl.SliceLayout(1, LX))
        x0 = _x(x_ptr, 0, quad_x, col, 0, zero, K, QT, SUB)
        x1 = _x(x_ptr, 0, quad_x, col, 1, zero, K, QT, SUB)
        x2 = _x(x_ptr, 0, quad_x, col, 2, zero, K, QT, SUB)
        x3 = _x(x_ptr, 0, quad_x, col, 3, zero, K, QT, SUB)
        a2 = _colsum(words, x0, s0, zero, 0)
        a2 = _colsum(words, x1, s1, a2, 1)
        a2 = _colsum(words, x2, s2, a2, 2)
        a2 = _colsum(words, x3, s3, a2, 3)
        acc = gl.inline_asm_elementwise(_SUM, "=f,r", [gl.sum(a2, axis=2)], dtype=gl.float32, is_pure=True, pack=1)
        out = gl.sum(acc, axis=1) * 8.0  # weights were (q - 8) / 4, x / 2
    else:
        out = gl.sum(gl.sum(words, axis=2), axis=1).to(gl.float32)
    gl.store(y_ptr + rows, out.to(gl.float16), mask=rows < N)


# (BLOCK_N, WR, WQ, RB): 8 rows x one quad per thread, 4 warps, 512 words per chunk, one row block
# per program: the fastest with PDL on all three large Llama-3-8B shapes of 10 configs
# (bench/results/tma_gemv_probe_small_h100.txt).
DEFAULT_CONFIG = (8, 1, 4, 1)
# 4 rows per thread, two row blocks per program: as many programs as DEFAULT_CONFIG's, fewer registers each.
NARROW_CONFIG = (4, 1, 4, 2)
# Programs of each config one SM holds, by registers (x 128 threads; sm_90a builds with the launch's
# divisibility, bench/wgmma_ptxas.py --kernel gemv: DEFAULT_CONFIG 96 registers under Triton 3.6's ptxas, the
# H100's, so 5 of 65536 (80 under 3.9's: 6); NARROW_CONFIG 64, so 8, counted as 7, as measured when the rule was
# set; no Llama shape has programs between the two counts).
RESIDENT = {DEFAULT_CONFIG: 5, NARROW_CONFIG: 7}


def config_for(n: int, sms: int, pdl: bool = True) -> tuple[int, int, int, int]:
    """The launch for ``n`` rows on ``sms`` SMs: :data:`DEFAULT_CONFIG`, unless with PDL its programs
    overflow one wave while :data:`NARROW_CONFIG`'s (as many, on fewer registers) fit in one.

    Why: with PDL the next kernel's programs start (and issue their TMA) as this kernel's leave; a
    second wave of programs keeps them out until it ends. H100, dependent chain
    (bench/results/kernels_h100_rb.md): 6144x4096 (768 programs, 660 slots for 8-row programs, 924
    for 4-row x 2) 3.11x cuBLAS against 2.88x; where both fit (4096x4096: 3.70x against 2.96x) or
    neither does (14336x4096: 3.08x against 2.70x), the 8-row programs are faster, and without PDL
    they were faster on all three (6144x4096: 8.26 us against 9.69).
    """
    programs = triton.cdiv(n, DEFAULT_CONFIG[0] * DEFAULT_CONFIG[3])
    if pdl and RESIDENT[DEFAULT_CONFIG] * sms < programs <= RESIDENT[NARROW_CONFIG] * sms:
        return NARROW_CONFIG
    return DEFAULT_CONFIG


def _check_rows_per_thread(block_n: int, wr: int) -> None:
    """Both kernels' layouts give each thread ``block_n / wr`` rows, which Gluon needs as a power of two."""
    if block_n % wr or (block_n // wr) & (block_n // wr - 1):
        raise ValueError(f"block_n / wr must be a power of two, got {block_n} / {wr}")


def gemv_tma_ok(x: torch.Tensor, w: TritonW4) -> bool:
    """Whether ``gemv_tma`` takes ``x`` (one fp16 row on an sm_90 GPU) against ``w``: symmetric
    weights whose pairs of slices share a group."""
    sub = w.block_k // 8
    return (x.is_cuda and x.dtype == torch.float16 and w.offsets is None and w.group_size % (2 * sub) == 0
            and torch.cuda.get_device_capability(x.device)[0] == 9)


def _descriptor(w: TritonW4, block_n: int, box: int) -> TensorDescriptor:
    """The weight's TMA descriptor for a ``[block_n, box]`` box, made once per weight and box."""
    key = ("tma", block_n, box)
    desc = w.cache.get(key)
    if desc is None:
        n, kw = w.qweight.shape
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        desc = w.cache[key] = TensorDescriptor(w.qweight, [n, kw], [kw, 1], [block_n, box], layout)
    return desc


def tile_bytes(block_n: int, wq: int) -> int:
    """Shared memory of one ring stage: ``block_n`` rows x one chunk of ``128 * wq`` int32 words."""
    return block_n * 128 * wq * 4


def stages_for(kw: int, block_n: int, wq: int, stages: int | None = None, rb: int = 1,
               max_smem: int = MAX_SMEM) -> int:
    """Tiles in flight: all of the program's (``rb`` row blocks x chunks), or as many as ``max_smem``
    holds."""
    tiles = rb * triton.cdiv(kw, 128 * wq)
    return max(1, min(tiles, stages or tiles, max_smem // tile_bytes(block_n, wq)))


def gemv_tma(x: torch.Tensor, w: TritonW4, block_n: int | None = None, wr: int | None = None,
             wq: int | None = None, stages: int | None = None, pdl: bool | None = None,
             maxnreg: int | None = None, rb: int | None = None, max_smem: int = MAX_SMEM,
             compute: bool = True, early_scales: bool = True) -> torch.Tensor:
    """``x @ W.T`` for one fp16 row ``x [1, K]`` (see :func:`gemv_tma_ok`); ``rb`` blocks of ``block_n``
    rows per program in ``wr`` x ``wq`` warps (``wq`` quads of 32 per chunk row), ``stages`` tiles in
    flight (at most ``max_smem`` bytes). With none of the four given, the launch is
    :func:`config_for`'s; otherwise what is not given comes from :data:`DEFAULT_CONFIG`.
    ``compute=False`` (benchmarks only): the read floor, each row's output the XOR of its words;
    ``early_scales=False`` (benchmarks only): the first tile's scales are loaded after the PDL wait,
    as the other tiles'."""
    n, kw = w.qweight.shape
    use_pdl = pdl_for(x.device, pdl)
    chosen = block_n is None and wr is None and wq is None and rb is None
    cfg = config_for(n, _sm_count(x.device), use_pdl) if chosen and x.is_cuda else DEFAULT_CONFIG
    block_n, wr, wq, rb = block_n or cfg[0], wr or cfg[1], wq or cfg[2], rb or cfg[3]
    _check_rows_per_thread(block_n, wr)
    x2 = x.reshape(1, w.in_features).contiguous()
    st = stages_for(kw, block_n, wq, stages, rb, max_smem)
    y = torch.empty((1, n), device=x.device, dtype=torch.float16)
    desc = _descriptor(w, block_n, min(128 * wq, 256))
    _gemv_tma_kernel[(triton.cdiv(n, block_n * rb),)](desc, x2, w.scales, y, n, w.in_features, kw, w.group_size,
                                                      BLOCK_N=block_n, WR=wr, WQ=wq, RB=rb, SUB=w.block_k // 8,
                                                      STAGES=st, PDL=use_pdl, num_warps=wr * wq, COMPUTE=compute,
                                                      EARLY_S=early_scales and compute,
                                                      **launch_kwargs(use_pdl),
                                                      **({"maxnreg": maxnreg} if maxnreg else {}))
    return y.reshape(*x.shape[:-1], n)


# (BLOCK_N, WR, WQ): 4 rows x one quad per thread, 4 warps: of five register-load launches the fastest alone
# and in the chain on the three large Llama-3-8B shapes (bench/results/reg_gemv_probe_h100.txt); 56
# registers (sm_90a, Triton 3.6's ptxas and 3.9's), so 9 programs per SM.
REG_CONFIG = (4, 1, 4)


def gemv_reg(x: torch.Tensor, w: TritonW4, block_n: int | None = None, wr: int | None = None,
             wq: int | None = None, pdl: bool | None = None, compute: bool = True) -> torch.Tensor:
    """``x @ W.T`` for one fp16 row ``x [1, K]`` (what :func:`gemv_tma_ok` takes) with the words loaded
    straight into registers: ``block_n`` rows per program (default :data:`REG_CONFIG`), each thread
    ``block_n / wr`` rows x one quad of every ``128 * wq``-word chunk of the row. The same arithmetic in
    the same order as :func:`gemv_tma` at one chunk per row, so the same bits there. ``compute=False``
    (benchmarks only): the read floor, each row's output the (wrapping int32) sum of its words."""
    n, kw = w.qweight.shape
    block_n, wr, wq = block_n or REG_CONFIG[0], wr or REG_CONFIG[1], wq or REG_CONFIG[2]
    _check_rows_per_thread(block_n, wr)
    use_pdl = pdl_for(x.device, pdl)
    y = torch.empty((1, n), device=x.device, dtype=torch.float16)
    _gemv_reg_kernel[(triton.cdiv(n, block_n),)](w.qweight, x.reshape(1, w.in_features).contiguous(), w.scales, y,
                                                 n, w.in_features, kw, w.group_size, BLOCK_N=block_n, WR=wr, WQ=wq,
                                                 NCH=triton.next_power_of_2(triton.cdiv(kw, 128 * wq)), SUB=w.block_k // 8, PDL=use_pdl,
                                                 num_warps=wr * wq, COMPUTE=compute, **launch_kwargs(use_pdl))
    return y.reshape(*x.shape[:-1], n)
