"""Hopper W4A16 GEMM for M > 128 in Gluon: 128 weight rows x 256 tokens per program, two warpgroups.

``Y^T = W X^T`` as in gluon_w4a16 (dequantized weights as the wgmma's A operand in registers, x by
TMA into shared memory), but each warpgroup owns 64 weight rows and all 256 tokens (wgmma N = 256):

- a weight is dequantized once per 256 tokens (gluon_w4a16: once per 128), and
- x's shared-memory tile feeds 128 weight rows (gluon_w4a16: 64), so x moves half as often per MMA.

Registers: the 64 x 256 fp32 accumulator takes 128 per thread, so a K-slice is worked in two column
halves of ``SUB // 2`` codes (x by TMA in half-slices): a thread keeps 16 words (one half of its rows'
words), not 32, and a pair's A operands take 16 registers, not 32.

Order of work in an output tile: for each K-tile, for each column half, the four pairs of slices.

Measured on an H100 (bench/tall_probe.py; BENCHMARKS.md, "M > 128: 128 x 256 tiles"): 14.2-14.5 us
per 64 x 128 x 4096 unit of work per SM against gluon_w4a16's 16.5, so 9-45% faster where its
tiles fill the SMs (:func:`use_tall`, the dispatch's rule). Gluon has no interpreter mode: the kernel
runs in tests on a Hopper GPU only (tests/kernels/test_gluon_w4a16_tall.py); CI compiles it for
sm_90a on the CPU (bench/wgmma_ptxas.py --kernel tall).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from klaq.kernels.gluon_w4a16 import (
    _begin,
    _cta_barrier,
    _dq_pair,
    _mma_pair,
    _owner,
    _packed,
    _segment,
    _slot_of,
    _slots,
    _sm_count,
    _tile_packed,
    _tile_scales,
    _tma_load,
    grid,
)
from klaq.kernels.triton_w4a16 import TritonW4, _workspace

BLOCK_N = 128  # weight rows per program: 64 per warpgroup
TOKENS = 256  # tokens per program (the wgmma's N)


@gluon.jit
def _issue_half(x_desc, x_smem, bars, m0, k_base, j, n_halves, c0, SUB: gl.constexpr, STAGES: gl.constexpr):
    """TMA half-slice ``j`` of a tile's sequence (K-tile j // 16, column half (j // 8) % 2, slice j % 8)
    into the stage of its global count ``c0 + j``."""
    HS: gl.constexpr = SUB // 2
    ok = j < n_halves
    st = (c0 + j) % STAGES
    k = k_base + (j // 16) * 8 * SUB + (j % 8) * SUB + ((j // 8) % 2) * HS
    mbarrier.expect(bars.index(st), x_desc.block_type.nbytes, pred=ok)
    _tma_load(x_desc, [m0, k], bars.index(st), x_smem.index(st), pred=ok)


@gluon.jit
def _store_y(y_ptr, acc, m0, n0, M, N, stride_ym, out_l: gl.constexpr):
    """The fp32 tile ``acc [n, m]`` as fp16 into ``y [M, N]``: y is n-contiguous, so the tile is
    transposed and stored n-contiguous (coalesced)."""
    BM: gl.constexpr = acc.shape[1]
    BN: gl.constexpr = acc.shape[0]
    m2 = gl.expand_dims(m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, out_l)), 1)
    n2 = gl.expand_dims(n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, out_l)), 0)
    vals = gl.convert_layout(gl.permute(acc.to(gl.float16), (1, 0)), out_l)
    gl.store(y_ptr + m2 * stride_ym + n2, vals, mask=(n2 < N) & (m2 < M))


@gluon.jit
def _sum_slots(ws_ptr, y_ptr, tile, q0, q1, units, programs, dp, n_tiles, m0, n0, M, N, stride_ym,
               BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, CHUNK: gl.constexpr, num_warps: gl.constexpr):
    """y's tile from the slots of programs ``q0..q1``, added in program order (deterministic), in
    chunks of ``CHUNK`` weight rows with the first four slots' loads of a chunk in flight together.
    Neither this nor adding the others' slots into the accumulator (its own layout) made the reads
    cheap: 9-12 us at M = 256 on an H100 (BENCHMARKS.md, "M > 128: 128 x 256 tiles")."""
    fix_l: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])  # token-contiguous
    fix_out: gl.constexpr = gl.BlockedLayout([1, CHUNK // 2], [16, 2], [num_warps, 1], [1, 0])  # n-contiguous
    TILE: gl.constexpr = BLOCK_M * BLOCK_N
    floc = gl.expand_dims(gl.arange(0, CHUNK, layout=gl.SliceLayout(1, fix_l)), 1) * BLOCK_M + \
        gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, fix_l)), 0)
    ym = gl.expand_dims(m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, fix_out)), 1)
    yn = gl.expand_dims(gl.arange(0, CHUNK, layout=gl.SliceLayout(0, fix_out)), 0)
    b0 = ws_ptr + _slot_of(q0, tile, units, programs, dp, n_tiles) * TILE
    b1 = ws_ptr + _slot_of(q0 + 1, tile, units, programs, dp, n_tiles) * TILE
    b2 = ws_ptr + _slot_of(q0 + 2, tile, units, programs, dp, n_tiles) * TILE
    b3 = ws_ptr + _slot_of(q0 + 3, tile, units, programs, dp, n_tiles) * TILE
    all_rows = floc >= 0
    for r0 in range(0, BLOCK_N, CHUNK):
        off = r0 * BLOCK_M + floc
        v0 = gl.load(b0 + off, cache_modifier=".cg")
        v1 = gl.load(b1 + off, mask=all_rows & (q1 >= q0 + 1), other=0.0, cache_modifier=".cg")
        v2 = gl.load(b2 + off, mask=all_rows & (q1 >= q0 + 2), other=0.0, cache_modifier=".cg")
        v3 = gl.load(b3 + off, mask=all_rows & (q1 >= q0 + 3), other=0.0, cache_modifier=".cg")
        total = ((v0 + v1) + v2) + v3  # + 0.0 for absent slots: the same bits
        for q in range(q0 + 4, q1 + 1):
            total += gl.load(ws_ptr + _slot_of(q, tile, units, programs, dp, n_tiles) * TILE + off,
                             cache_modifier=".cg")
        vals = gl.convert_layout(gl.permute(total.to(gl.float16), (1, 0)), fix_out)
        n = n0 + r0 + yn
        gl.store(y_ptr + ym * stride_ym + n, vals, mask=(n < N) & (ym < M))


@gluon.jit
def _tile_sum(x_desc, x_smem, bars, w_ptr, s_ptr, o_ptr, N, Kw, group_size, pid_n, m0, t_start, t_end, c,
              mma: gl.constexpr, HAS_ZERO: gl.constexpr, PAIR_GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
              BLOCK_M: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr):
    """One segment of an output tile: the fp32 partial sum ``[BLOCK_N, BLOCK_M]`` (layout ``mma``) over
    K-tiles ``[t_start, t_end)`` of weight-row block ``pid_n`` and tokens from ``m0``, and the x ring's
    count after it (``c``: slices consumed before). The main loop of every 128 x 256 kernel: for each
    K-tile, for each column half, the four pairs of slices, the next pair dequantized while the tensor
    cores work on this one."""
    HS: gl.constexpr = SUB // 2
    AHEAD: gl.constexpr = STAGES // 2 - 1
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    cols = gl.arange(0, HS, layout=gl.SliceLayout(0, a_layout))
    n_halves = (t_end - t_start) * 16
    k_base = t_start * 8 * SUB
    c0 = c
    for b in gl.static_range(2 * AHEAD):
        _issue_half(x_desc, x_smem, bars, m0, k_base, b, n_halves, c0, SUB, STAGES)
    rows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout)), N - 1)
    w_ptrs = w_ptr + gl.expand_dims(rows, 1) * Kw + gl.expand_dims(cols, 0)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    words = gl.load(w_ptrs + t_start * SUB)
    p0s, p0o, p1s, p1o, p2s, p2o, p3s, p3o = _tile_packed(s_ptr, o_ptr, t_start * 8 * SUB, SUB, rows, N,
                                                          group_size, HAS_ZERO, PAIR_GROUP)
    a0, a1 = _dq_pair(words, 0, p0s, p0o, HAS_ZERO)
    for t in range(t_start, t_end):
        tn = gl.minimum(t + 1, t_end - 1)
        for h in gl.static_range(2):
            # the next column half's words (this tile's second half, or the next tile's first)
            if h == 0:
                nw = gl.load(w_ptrs + t * SUB + HS)
            else:
                nw = gl.load(w_ptrs + tn * SUB)
                (ns0a, ns0b, no0a, no0b, ns1a, ns1b, no1a, no1b, ns2a, ns2b, no2a, no2b, ns3a, ns3b, no3a,
                 no3b) = _tile_scales(s_ptr, o_ptr, tn * 8 * SUB, SUB, rows, N, group_size, HAS_ZERO, PAIR_GROUP)
            for p in gl.static_range(4):
                tok = _mma_pair(a0, a1, x_smem, bars, c, acc, STAGES)
                j = c - c0 + 2 * AHEAD
                _issue_half(x_desc, x_smem, bars, m0, k_base, j, n_halves, c0, SUB, STAGES)
                _issue_half(x_desc, x_smem, bars, m0, k_base, j + 1, n_halves, c0, SUB, STAGES)
                if p == 0:
                    b0, b1 = _dq_pair(words, 1, p1s, p1o, HAS_ZERO)
                elif p == 1:
                    b0, b1 = _dq_pair(words, 2, p2s, p2o, HAS_ZERO)
                elif p == 2:
                    b0, b1 = _dq_pair(words, 3, p3s, p3o, HAS_ZERO)
                elif h == 0:
                    b0, b1 = _dq_pair(nw, 0, p0s, p0o, HAS_ZERO)
                else:
                    p0s, p0o = _packed(ns0a, ns0b, no0a, no0b, HAS_ZERO)
                    b0, b1 = _dq_pair(nw, 0, p0s, p0o, HAS_ZERO)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(tok, ))
                a0 = b0
                a1 = b1
                c += 2
            words = nw
        p1s, p1o = _packed(ns1a, ns1b, no1a, no1b, HAS_ZERO)
        p2s, p2o = _packed(ns2a, ns2b, no2a, no2b, HAS_ZERO)
        p3s, p3o = _packed(ns3a, ns3b, no3a, no3b, HAS_ZERO)
    return acc, c


@gluon.jit
def _gemm_tall_kernel(x_desc, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, Kw, stride_ym, group_size,
                      n_tiles, blocks_m, units, dp, HAS_ZERO: gl.constexpr, PAIR_GROUP: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr,
                      CHUNK: gl.constexpr, SPIN: gl.constexpr, SHARED: gl.constexpr, num_warps: gl.constexpr):
    # Stream-K over units (K-tiles of output tiles) as in gluon_w4a16's kernel: the first ``dp``
    # programs take whole tiles, the rest equal shares of the units left (the default launch is one
    # program per tile: default_programs says why). A share's partial tile goes to the program's own
    # fp32 slot and one program sums the tile's slots in program order (deterministic), its own read
    # back too, in chunks of ``CHUNK`` weight rows (_sum_slots): a second 128 x 256 fp32 tile beside
    # the accumulator would not fit the registers. ``SHARED`` False (whole tiles only, the default
    # launch) compiles none of that: 223 registers against 233 (sm_90a, symmetric), 14336 x 4096 at
    # M = 256 58.2-58.3 us against 58.7-58.9 on an H100 (bench/results/tall_shares_ab_h100.txt).
    HS: gl.constexpr = SUB // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    out_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])

    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    u = _begin(pid, units, programs, dp, n_tiles)
    u_begin = u
    u_end = _begin(pid + 1, units, programs, dp, n_tiles)

    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, HS], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    c = 0
    while u < u_end:
        tile, t_start, t_end, pid_n, m0 = _segment(u, u_end, n_tiles, blocks_m, BLOCK_M)
        u_seg = u
        u += t_end - t_start
        acc, c = _tile_sum(x_desc, x_smem, bars, w_ptr, s_ptr, o_ptr, N, Kw, group_size, pid_n, m0, t_start, t_end,
                           c, mma, HAS_ZERO, PAIR_GROUP, BLOCK_N, BLOCK_M, SUB, STAGES)

        if not SHARED or t_end - t_start == n_tiles:
            _store_y(y_ptr, acc, m0, pid_n * BLOCK_N, M, N, stride_ym, out_l)
        else:
            # A share's partial tile goes to the program's own fp32 slot (first or last segment).
            # With SPIN (at most one program per SM, so all resident at once) the tile's first program
            # fixes the tile up: its share ends with the tile's head, so this is its last segment, and
            # the others worked on the tile at the start of their shares (or in a share inside it), so
            # it seldom waits for them. Without SPIN the tile's last program to arrive does it.
            loc = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma)), 1) * BLOCK_M + \
                gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma)), 0)
            slot = 1 - (u_seg == u_begin).to(gl.int32)
            gl.store(ws_ptr + (pid * 2 + slot) * (BLOCK_M * BLOCK_N) + loc, acc)
            _cta_barrier()
            q0 = _owner(tile * n_tiles, units, programs, dp, n_tiles)
            q1 = _owner((tile + 1) * n_tiles - 1, units, programs, dp, n_tiles)
            if SPIN:
                fixer = pid == q0
                if fixer:
                    while gl.atomic_add(cnt_ptr + tile, 0, sem="acquire") < q1 - q0:
                        pass
                else:
                    gl.atomic_add(cnt_ptr + tile, 1, sem="release")
            else:
                fixer = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == q1 - q0
            if fixer:
                _cta_barrier()
                _sum_slots(ws_ptr, y_ptr, tile, q0, q1, units, programs, dp, n_tiles, m0, pid_n * BLOCK_N, M, N,
                           stride_ym, BLOCK_N, BLOCK_M, CHUNK, num_warps)
                gl.atomic_xchg(cnt_ptr + tile, 0)
            _cta_barrier()
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(b))


def tall_ok(w: TritonW4) -> bool:
    """Whether the weight's layout suits the kernel: half-slices of at least one k16 wgmma step."""
    return w.block_k >= 256


def default_programs(tiles: int) -> tuple[int, int]:
    """``(programs, dp)``: one program per output tile. H100, M = 256-2048 (bench/tall_probe.py, raw:
    bench/results/tall_probe_h100.txt): per tile beat stream-K over one program per SM wherever the
    dispatch takes this kernel, or was within 4% of it (6144 x 4096 and 14336 x 4096 at M = 1024);
    at M = 256 the exchange of the shares' partial tiles (128 KB of fp32 each) cost 18-24 us."""
    return tiles, tiles


def use_tall(m: int, w: TritonW4, sms: int) -> bool:
    """Whether the dispatch takes this kernel over gluon_w4a16's: more than 128 tokens, slices that
    split in k16 halves, and 128 x 256 tiles for at least two thirds of the SMs. H100
    (bench/results/tall_probe_h100.txt, one tile per program against gemm_wgmma): 96-448 tiles ran
    9-45% faster (14336 x 4096 at M = 256: 59.1 against 64.7 us; M = 2048 on the four Llama-3-8B
    shapes: 0.79-0.81x cuBLAS against 0.55-0.59x); 32-64 tiles up to 2.6x slower."""
    tiles = triton.cdiv(w.out_features, BLOCK_N) * triton.cdiv(m, TOKENS)
    return m > 128 and tall_ok(w) and 3 * tiles >= 2 * sms


def tall_input(x: torch.Tensor, w: TritonW4, stages: int) -> tuple[torch.Tensor, TensorDescriptor]:
    """The checks every 128 x 256 kernel makes before launch, then ``x`` as ``[M, K]`` and its TMA descriptor
    of 256 tokens x a half-slice."""
    if stages < 4:
        raise ValueError(f"stages must be at least 4, got {stages}")
    if not tall_ok(w):
        raise ValueError(f"the 128 x 256 kernel needs block_k >= 256 (half-slices of 16 codes), got {w.block_k}")
    x2 = x.reshape(-1, w.in_features)
    hs = w.block_k // 16
    layout = gl.NVMMASharedLayout.get_default_for([TOKENS, hs], gl.float16)
    return x2, TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [TOKENS, hs], layout)


def gemm_tall(x: torch.Tensor, w: TritonW4, stages: int = 6, programs: int | None = None,
              dp: int | None = None) -> torch.Tensor:
    """``x @ W.T`` for fp16 ``x [M, K]`` on Hopper, 128 weight rows x 256 tokens per output tile.

    ``programs``: the persistent grid and ``dp``: how many of its programs take whole tiles before
    the rest share what is left (stream-K; :func:`default_programs`: one program per tile)."""
    x2, x_desc = tall_input(x, w, stages)
    m, n = x2.shape[0], w.out_features
    blocks_m = triton.cdiv(m, TOKENS)
    tiles = triton.cdiv(n, BLOCK_N) * blocks_m
    if programs is None:
        programs, default_dp = default_programs(tiles)
        dp = default_dp if dp is None else dp
    programs, dp = grid(programs, dp or 0, tiles, w.n_tiles)
    y = torch.empty((m, n), device=x.device, dtype=torch.float16)
    _, cnt = _workspace(x.device, 0, tiles)
    ws = _slots(x.device, 2 * programs * TOKENS * BLOCK_N)
    offsets = w.offsets if w.offsets is not None else w.scales
    _gemm_tall_kernel[(programs, )](x_desc, w.qweight, w.scales, offsets, y, ws, cnt, m, n, w.qweight.shape[1],
                                    y.stride(0), w.group_size, w.n_tiles, blocks_m, tiles * w.n_tiles, dp,
                                    HAS_ZERO=w.offsets is not None, PAIR_GROUP=w.group_size % (w.block_k // 4) == 0,
                                    BLOCK_N=BLOCK_N, BLOCK_M=TOKENS, SUB=w.block_k // 8, STAGES=stages, CHUNK=32,
                                    SPIN=programs <= _sm_count(x.device), SHARED=dp < programs, num_warps=8)
    return y.reshape(*x.shape[:-1], n)
