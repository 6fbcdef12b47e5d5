"""Hopper M = 1 GEMV whose weights arrive by TMA before the PDL wait (Gluon): ``gemv_tma``.

Why: at batch 1 a GEMV of a Llama-sized layer is a few microseconds, and about 2 us of it is fixed
cost: the launch, the first DRAM round trip, and the tail while the last programs finish
(BENCHMARKS.md, "M = 1"). ``gemv_h2`` (triton_w4a16.py) holds its words in registers, so the bytes a
program has in flight are bounded by its registers, and with programmatic dependent launch only its
first step could be read before ``griddepcontrol.wait``. Here one thread per program issues TMA
copies of the program's whole weight range into shared memory at its start, *before* the wait: the
weights never depend on the previous kernel, so in a chain of GEMVs (a decode step) each call's
weights stream in while the call before it computes, and the fixed cost overlaps.

A program owns ``RB`` blocks of ``BLOCK_N`` rows; the first tile's scales are loaded before the wait
too, and only x (and y's buffer) wait for the previous kernel. (Programs of several row blocks stay
slower than one block even with all their scales in the words' TMA transaction, and so does their read
floor: BENCHMARKS.md, "M = 1, scales by TMA with the words"; that variant is
bench/results/gluon_gemv_tma_scales.diff.) Each thread holds ``BLOCK_N / WR`` rows x one quad of 4
consecutive words of a chunk: x's pairs are loaded once per thread and broadcast over its rows in
registers, a pair's scales for those rows are one contiguous load from
the ``[G, N]`` layout, and the 4 words of a quad share a pair's scale, so gemv_h2's symmetric half2
column sum (``_colsum_ptx``) applies to the quad as it sits in registers.

Symmetric weights, fp16 x, and both slices of a pair in one group (``2 * SUB`` divides the group
size); anything else takes ``gemv_h2``. The dispatch (triton_w4a16.w4a16_matmul) takes it in place of
``gemv_h2`` where K < 8192, with PDL or without (alone it was a little faster than gemv_h2 too;
:func:`triton_w4a16.tma_gemv_default`; ``KLAQ_TMA_GEMV=0`` turns it off), or when asked by name
(``kernel="gemv_tma"``); :func:`config_for` picks the launch. H100, a dependent chain as in a decode
step (bench/kernels.py, bench/results/kernels_h100_rb.md): 3.70x / 3.11x / 3.08x cuBLAS on 4096x4096
/ 6144x4096 / 14336x4096 with the launch config_for picks (gemv_h2: 2.39x / 2.56x / 2.95x in an
earlier run); at 4096x14336 it was slower (2.16x against 2.65x), hence the K rule.
Gluon has no interpreter mode, so the kernel is tested on a Hopper GPU only
(tests/kernels/test_gluon_gemv.py); the rules that pick it and size its ring are tested everywhere.
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
    if block_n % wr or (block_n // wr) & (block_n // wr - 1):
        raise ValueError(f"block_n / wr must be a power of two, got {block_n} / {wr}")
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
