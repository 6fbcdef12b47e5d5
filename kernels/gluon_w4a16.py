"""Hopper W4A16 GEMM in Gluon (Triton's explicit-layout dialect): prefill, M > 16.

``Y^T = W X^T`` with the dequantized weight as the wgmma's left operand *in registers* and x as the
right operand in shared memory, staged by TMA through a ring of ``STAGES`` K-slices.

Why Gluon: the Triton GEMMs (triton_w4a16.py) let the compiler place the dequantized tile, and the
compiled code waits for every tensor-core MMA before it dequantizes the next slice, so MMA and
dequantization add up (about 25% of the H100's MMA peak at M = 256). Here the program says what
overlaps: the next pair of K-slices is dequantized while this pair's asynchronous wgmmas run.
Measured on an H100 (bench/kernels.py): see :func:`default_programs` and BENCHMARKS.md.

No shuffles for the weight: the words of one tile are loaded once, straight into the register
layout of the wgmma's A operand. Word ``j`` holds code ``j`` of each of the tile's 8 slices (see
triton_w4a16's layout), so a thread holding words ``j`` holds the A fragment of *every* slice:
slices 2p and 2p + 1 are one shift and one LOP3 away (half2 dequantization, as in the GEMV).

Gluon has no interpreter mode, so this kernel is tested on a Hopper GPU only
(tests/kernels/test_gluon_w4a16.py); written against Triton 3.6's Gluon API.
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from klaq.kernels.triton_w4a16 import _DQ_ASYM as _TL_DQ_ASYM
from klaq.kernels.triton_w4a16 import _DQ_SYM as _TL_DQ_SYM
from klaq.kernels.triton_w4a16 import TritonW4, _workspace

# Two slices of a word (shifted so their codes sit in bits 0-3 and 16-19) into the fp16 weights
# ``q * s - o`` (one rounding): the same PTX as triton_w4a16's GEMMs.
_DQ_SYM = gl.constexpr(_TL_DQ_SYM.value)
_DQ_ASYM = gl.constexpr(_TL_DQ_ASYM.value)

# Triton 3.6 names the TMA load async_copy_global_to_shared and the CTA barrier thread_barrier;
# later versions async_load and barrier.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier

# Thread-block clusters by inline PTX (Triton 3.6's Gluon has no cluster barrier and no remote shared
# memory; a cluster launch is a launch attribute, see :func:`_cluster_launch`). ``global_smem`` is
# Triton's name for the kernel's dynamic shared memory; the exchange area at its start (one fp32 partial
# tile, 64 x tokens) lies in the x ring's first stages (tests/bench/test_wgmma_ptxas.py checks that the
# mbarriers lie past it), idle once a program's loop is done. ``%cluster_ctarank ^ 1``: the other program
# of a 2-program cluster.
_CLUSTER_SYNC = gl.constexpr("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n\tmov.b32 $0, 0;")
_CLUSTER_ARRIVE = gl.constexpr("barrier.cluster.arrive.release.aligned;\n\tmov.b32 $0, 0;")
_XCH_SEND = gl.constexpr("{ .reg .b32 a, r, p;\n\tmov.b32 a, global_smem;\n\tmad.lo.u32 a, $1, 4, a;\n\t"
             "mov.u32 r, %cluster_ctarank;\n\txor.b32 r, r, 1;\n\tmapa.shared::cluster.u32 p, a, r;\n\t"
             "st.shared::cluster.f32 [p], $2;\n\tmov.b32 $0, 0; }")
_XCH_RECV = gl.constexpr("{ .reg .b32 a;\n\tmov.b32 a, global_smem;\n\tmad.lo.u32 a, $1, 4, a;\n\tld.shared.f32 $0, [a]; }")


@gluon.jit
def _half2(a, b):
    return gl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [a, b], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def _pair_scales(s_ptr, o_ptr, k0, SUB: gl.constexpr, s_rows, N, group_size, HAS_ZERO: gl.constexpr,
                 PAIR_GROUP: gl.constexpr):
    """Raw scales (and offsets) ``[BLOCK_N]`` of the two slices from code ``k0``.

    Kept as loaded until :func:`_packed` packs them: packing at the load would stall on its latency.
    Symmetric weights have no offsets: the scales stand in (the _SYM assembly ignores them).
    ``PAIR_GROUP``: both slices lie in one group (2 * SUB divides the group size), so one load, and
    fewer registers live across the loop.
    """
    ga = k0 // group_size
    sa = gl.load(s_ptr + ga * N + s_rows)
    if HAS_ZERO:
        oa = gl.load(o_ptr + ga * N + s_rows)
    else:
        oa = sa
    if PAIR_GROUP:
        return sa, sa, oa, oa
    gb = (k0 + SUB) // group_size
    sb = gl.load(s_ptr + gb * N + s_rows)
    if HAS_ZERO:
        return sa, sb, oa, gl.load(o_ptr + gb * N + s_rows)
    return sa, sb, sa, sb


@gluon.jit
def _tile_scales(s_ptr, o_ptr, k0, SUB: gl.constexpr, s_rows, N, group_size, HAS_ZERO: gl.constexpr,
                 PAIR_GROUP: gl.constexpr):
    """The raw scales / offsets of a tile's 4 pairs (:func:`_pair_scales`), as one 16-tuple."""
    s0a, s0b, o0a, o0b = _pair_scales(s_ptr, o_ptr, k0, SUB, s_rows, N, group_size, HAS_ZERO, PAIR_GROUP)
    s1a, s1b, o1a, o1b = _pair_scales(s_ptr, o_ptr, k0 + 2 * SUB, SUB, s_rows, N, group_size, HAS_ZERO, PAIR_GROUP)
    s2a, s2b, o2a, o2b = _pair_scales(s_ptr, o_ptr, k0 + 4 * SUB, SUB, s_rows, N, group_size, HAS_ZERO, PAIR_GROUP)
    s3a, s3b, o3a, o3b = _pair_scales(s_ptr, o_ptr, k0 + 6 * SUB, SUB, s_rows, N, group_size, HAS_ZERO, PAIR_GROUP)
    return s0a, s0b, o0a, o0b, s1a, s1b, o1a, o1b, s2a, s2b, o2a, o2b, s3a, s3b, o3a, o3b


@gluon.jit
def _packed(sa, sb, oa, ob, HAS_ZERO: gl.constexpr):
    """A pair's scales and negated offsets as half2 ``[BLOCK_N]`` (the offsets only with zero points)."""
    if HAS_ZERO:
        return _half2(sa, sb), _half2(-oa, -ob)
    s2 = _half2(sa, sb)
    return s2, s2


@gluon.jit
def _tile_packed(s_ptr, o_ptr, k0, SUB: gl.constexpr, s_rows, N, group_size, HAS_ZERO: gl.constexpr,
                 PAIR_GROUP: gl.constexpr):
    """A tile's 4 pairs of scales and negated offsets, packed at once (a segment's first tile, where
    nothing else could hide their load): ``(p0s, p0o, ..., p3s, p3o)``."""
    (s0a, s0b, o0a, o0b, s1a, s1b, o1a, o1b, s2a, s2b, o2a, o2b, s3a, s3b, o3a,
     o3b) = _tile_scales(s_ptr, o_ptr, k0, SUB, s_rows, N, group_size, HAS_ZERO, PAIR_GROUP)
    p0s, p0o = _packed(s0a, s0b, o0a, o0b, HAS_ZERO)
    p1s, p1o = _packed(s1a, s1b, o1a, o1b, HAS_ZERO)
    p2s, p2o = _packed(s2a, s2b, o2a, o2b, HAS_ZERO)
    p3s, p3o = _packed(s3a, s3b, o3a, o3b, HAS_ZERO)
    return p0s, p0o, p1s, p1o, p2s, p2o, p3s, p3o


@gluon.jit
def _dq_pair(words, p: gl.constexpr, s2, no2, HAS_ZERO: gl.constexpr):
    """Slices 2p and 2p + 1 (nibbles p and p + 4) of a tile's words as two fp16 operands, from the
    pair's packed scales and negated offsets (:func:`_packed`)."""
    z = gl.zeros_like(words)
    s2 = gl.expand_dims(s2, 1) + z
    if HAS_ZERO:
        args = [words >> (4 * p), s2, gl.expand_dims(no2, 1) + z]
        return gl.inline_asm_elementwise(_DQ_ASYM, "=h,=h,r,r,r", args, dtype=(gl.float16, gl.float16), is_pure=True,
                                         pack=1)
    return gl.inline_asm_elementwise(_DQ_SYM, "=h,=h,r,r,r", [words >> (4 * p), s2, s2],
                                     dtype=(gl.float16, gl.float16), is_pure=True, pack=1)


@gluon.jit
def _issue_x(x_desc, x_smem, bars, m0, k_base, j, n_slices, c0, SUB: gl.constexpr, STAGES: gl.constexpr):
    """TMA slice ``j`` of a segment (codes ``k_base + j * SUB``) into the stage of its global count ``c0 + j``."""
    ok = j < n_slices
    st = (c0 + j) % STAGES
    mbarrier.expect(bars.index(st), x_desc.block_type.nbytes, pred=ok)
    _tma_load(x_desc, [m0, k_base + j * SUB], bars.index(st), x_smem.index(st), pred=ok)


@gluon.jit
def _begin(q, units, programs, dp, n_tiles):
    """The first unit (K-tile of an output tile) of program ``q``'s share: programs below ``dp``
    take one whole output tile each, the others equal shares of the units left."""
    if q <= dp:
        b = q * n_tiles
    else:
        b = dp * n_tiles + ((q - dp) * (units - dp * n_tiles)) // (programs - dp)
    return b


@gluon.jit
def _owner(u, units, programs, dp, n_tiles):
    """The program whose share (:func:`_begin`) holds unit ``u``."""
    if u < dp * n_tiles:
        q = u // n_tiles
    else:
        q = dp + ((u - dp * n_tiles + 1) * (programs - dp) - 1) // (units - dp * n_tiles)
    return q


@gluon.jit
def _mma_pair(a0, a1, x_smem, bars, c, acc, STAGES: gl.constexpr):
    """The asynchronous wgmmas of a pair of slices (dequantized weights ``a0``, ``a1`` in registers),
    each issued once its x slice (ring stages of counts ``c``, ``c + 1``) has arrived; returns the token."""
    mbarrier.wait(bars.index(c % STAGES), (c // STAGES) & 1)
    tok = warpgroup_mma(a0, x_smem.index(c % STAGES).permute((1, 0)), acc, is_async=True)
    mbarrier.wait(bars.index((c + 1) % STAGES), ((c + 1) // STAGES) & 1)
    return warpgroup_mma(a1, x_smem.index((c + 1) % STAGES).permute((1, 0)), tok, is_async=True)


@gluon.jit
def _segment(u, u_end, n_tiles, blocks_m, BLOCK_M: gl.constexpr):
    """A share's segment from unit ``u``: its output tile, K-tiles ``[t_start, t_end)``, the tile's
    weight-row block and first token."""
    tile = u // n_tiles
    t_start = u % n_tiles
    t_end = gl.minimum(n_tiles, t_start + u_end - u)
    return tile, t_start, t_end, tile // blocks_m, (tile % blocks_m) * BLOCK_M


@gluon.jit
def _slot_of(q, tile, units, programs, dp, n_tiles):
    """The slot (``2q`` or ``2q + 1``) holding program ``q``'s part of ``tile``: its first if its
    share starts inside the tile (the tile is its first segment), else its second (its last)."""
    return q * 2 + 1 - (_begin(q, units, programs, dp, n_tiles) // n_tiles == tile).to(gl.int32)


@gluon.jit
def _cluster_sync(pid, arrive_only: gl.constexpr = False):
    """Every thread of the cluster's programs past this point (release / acquire); ``arrive_only``: this
    thread's arrival only (it leaves without waiting: an exited thread counts as arrived)."""
    gl.inline_asm_elementwise(_CLUSTER_ARRIVE if arrive_only else _CLUSTER_SYNC, "=r,r", [pid], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _xch_loc(acc_layout: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr):
    """Each accumulator element's fp32 index in the exchange area: row-major, columns XOR-swizzled by the
    row so that a warp's eight rows fall on different banks."""
    r = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout)), 1)
    c = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout)), 0)
    return r * BLOCK_M + (c ^ ((r % 8) * 8))


@gluon.jit
def _store_t(y_ptrs, acc, mask, out_l: gl.constexpr):
    """The fp32 tile ``acc [n, m]`` as fp16 through ``y_ptrs [m, n]`` (``out_l``): y is n-contiguous, so the
    tile is transposed and stored n-contiguous (coalesced)."""
    gl.store(y_ptrs, gl.convert_layout(gl.permute(acc.to(gl.float16), (1, 0)), out_l), mask=mask)


@gluon.jit
def _gemm_wgmma_kernel(x_desc, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, Kw, stride_ym, group_size,
                       n_tiles, blocks_m, units, dp, HAS_ZERO: gl.constexpr, PAIR_GROUP: gl.constexpr,
                       BLOCK_N: gl.constexpr,
                       BLOCK_M: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr, OUT_VEC: gl.constexpr,
                       OUT_TN: gl.constexpr, num_warps: gl.constexpr, CLUSTER: gl.constexpr = False):
    # Stream-K: the output tiles' K-tiles ("units") are cut into shares, one per program, so every
    # SM gets the same work whatever the tile count (a plain grid of 64 x 128 tiles ran 1.7 waves at
    # 14336 x 4096). The first ``dp`` programs take one whole tile each (data-parallel waves), the
    # rest equal shares of what is left. A share may start or end inside an output tile: its partial
    # sum goes to the program's own fp32 slot (first or last segment) with plain stores, in the
    # accumulator's own layout (no shared-memory round trip), and the tile's last program to arrive
    # adds the others' slots in program order (deterministic: no float atomics; fp32 atomics into
    # one buffer measured the same speed) and stores y.
    # Registers: at 254 of 255, ptxas moves part of the next pair's dequantization below the MMA wait
    # (serialized with the tensor cores). Scales packed to half2 once per tile, and loaded once per pair
    # where both slices share a group (PAIR_GROUP), leave it more room: H100, M = 128 4-8% faster,
    # M = 256 1-5% (bench/results/wgmma_scales_ab_h100.txt). Keeping a pair in flight across the wait
    # (wait(2)) makes ptxas serialize the wgmmas (C7513: other instructions define a wgmma's input
    # registers inside its pipeline stage); half-slice MMA groups with one in flight avoid that and
    # measured no faster (BENCHMARKS.md, "pipelined MMA groups"): one warpgroup feeding the tensor
    # cores is the bound, not where the dequantization sits.
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    out_l: gl.constexpr = gl.BlockedLayout([1, OUT_VEC], [32 // OUT_TN, OUT_TN], [num_warps, 1], [1, 0])
    # x runs AHEAD pairs ahead of the MMAs: a pair's stages are reloaded once its MMAs are done.
    AHEAD: gl.constexpr = STAGES // 2 - 1

    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    u = _begin(pid, units, programs, dp, n_tiles)
    u_begin = u
    u_end = _begin(pid + 1, units, programs, dp, n_tiles)

    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_M, SUB], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    cols = gl.arange(0, SUB, layout=gl.SliceLayout(0, a_layout))
    c = 0  # x slices consumed by this program: the ring's stage and phase
    while u < u_end:
        tile, t_start, t_end, pid_n, m0 = _segment(u, u_end, n_tiles, blocks_m, BLOCK_M)
        u_seg = u
        u += t_end - t_start
        n_slices = (t_end - t_start) * 8
        k_base = t_start * 8 * SUB
        c0 = c
        for b in gl.static_range(2 * AHEAD):
            _issue_x(x_desc, x_smem, bars, m0, k_base, b, n_slices, c0, SUB, STAGES)

        # words [BLOCK_N, SUB] straight into the A operand's register layout
        rows = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout)), N - 1)
        w_ptrs = w_ptr + gl.expand_dims(rows, 1) * Kw + gl.expand_dims(cols, 0)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        words = gl.load(w_ptrs + t_start * SUB)
        k0 = t_start * 8 * SUB
        p0s, p0o, p1s, p1o, p2s, p2o, p3s, p3o = _tile_packed(s_ptr, o_ptr, k0, SUB, rows, N, group_size,
                                                              HAS_ZERO, PAIR_GROUP)
        a0, a1 = _dq_pair(words, 0, p0s, p0o, HAS_ZERO)
        for t in range(t_start, t_end):
            # the next tile's words and raw scales (this tile's again at the end: finite, unused)
            tn = gl.minimum(t + 1, t_end - 1)
            nw = gl.load(w_ptrs + tn * SUB)
            kn = tn * 8 * SUB
            (ns0a, ns0b, no0a, no0b, ns1a, ns1b, no1a, no1b, ns2a, ns2b, no2a, no2b, ns3a, ns3b, no3a,
             no3b) = _tile_scales(s_ptr, o_ptr, kn, SUB, rows, N, group_size, HAS_ZERO, PAIR_GROUP)
            for p in gl.static_range(4):
                tok = _mma_pair(a0, a1, x_smem, bars, c, acc, STAGES)
                # the previous pair is done (waited below): its stages take the pair AHEAD pairs on
                j = c - c0 + 2 * AHEAD
                _issue_x(x_desc, x_smem, bars, m0, k_base, j, n_slices, c0, SUB, STAGES)
                _issue_x(x_desc, x_smem, bars, m0, k_base, j + 1, n_slices, c0, SUB, STAGES)
                # dequantize the next pair while the tensor cores work on this one
                if p == 0:
                    b0, b1 = _dq_pair(words, 1, p1s, p1o, HAS_ZERO)
                elif p == 1:
                    b0, b1 = _dq_pair(words, 2, p2s, p2o, HAS_ZERO)
                elif p == 2:
                    b0, b1 = _dq_pair(words, 3, p3s, p3o, HAS_ZERO)
                else:
                    # the next tile's first scales, packed three pairs after their loads
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

        # y [M, N]'s pointers and mask for the tile (:func:`_store_t`)
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_l))
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_l))
        m2 = gl.expand_dims(offs_m, 1)
        n2 = gl.expand_dims(offs_n, 0)
        mask = (n2 < N) & (m2 < M)
        y_ptrs = y_ptr + m2 * stride_ym + n2
        if t_end - t_start == n_tiles:
            _store_t(y_ptrs, acc, mask, out_l)
        elif CLUSTER:
            # a tile in two K-halves, one per program of a 2-program cluster: once both loops are done
            # (both x rings idle), the tail writes its partial sum into the head's ring through
            # distributed shared memory and leaves; the head adds it (head + tail, the order of the
            # global exchange below, so the same bits) and stores y
            loc = _xch_loc(mma, BLOCK_N, BLOCK_M)
            _cluster_sync(pid)
            if t_start == 0:
                _cluster_sync(pid)
                acc += gl.inline_asm_elementwise(_XCH_RECV, "=f,r", [loc], dtype=gl.float32, is_pure=False, pack=1)
                _cta_barrier()  # every read done before the epilogue's shared-memory scratch is written
                _store_t(y_ptrs, acc, mask, out_l)
            else:
                gl.inline_asm_elementwise(_XCH_SEND, "=r,r,f", [loc, acc], dtype=gl.int32, is_pure=False, pack=1)
                _cluster_sync(pid, arrive_only=True)
        else:
            # partial sums in the program's own slot (plain stores); the tile's last program adds the
            # other shares' slots in program order (deterministic) and stores y
            loc = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma)), 1) * BLOCK_M + \
                gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma)), 0)
            slot = 1 - (u_seg == u_begin).to(gl.int32)  # a share's first segment, or its last
            gl.store(ws_ptr + (pid * 2 + slot) * (BLOCK_M * BLOCK_N) + loc, acc)
            # every thread's stores before the count: the barrier, then one thread's acq_rel atomic
            # (triton_w4a16._store_split says why no fence)
            _cta_barrier()
            q0 = _owner(tile * n_tiles, units, programs, dp, n_tiles)
            q1 = _owner((tile + 1) * n_tiles - 1, units, programs, dp, n_tiles)
            if gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == q1 - q0:
                _cta_barrier()
                total = gl.zeros_like(acc)
                for q in range(q0, q1 + 1):
                    if q == pid:
                        total += acc
                    else:
                        total += gl.load(ws_ptr + _slot_of(q, tile, units, programs, dp, n_tiles) * (BLOCK_M * BLOCK_N)
                                         + loc, cache_modifier=".cg")
                _store_t(y_ptrs, total, mask, out_l)
                gl.atomic_xchg(cnt_ptr + tile, 0)
            _cta_barrier()
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(b))


_SMS: dict = {}
_SLOTS: dict = {}


def _slots(device, floats: int) -> torch.Tensor:
    """Stream-K partial sums: two fp32 tiles per program, written before they are read in a call."""
    buf = _SLOTS.get(device)
    if buf is None or buf.numel() < floats:
        buf = _SLOTS[device] = torch.empty(floats, device=device)
    return buf


def _sm_count(device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def default_programs(m: int, tiles: int, k_tiles: int, sms: int) -> tuple[int, int]:
    """The persistent grid, from bench/gluon_probe.py on an H100 (Llama-3-8B shapes).

    Up to 64 tokens, stream-K over two programs per SM (one 98 KB program per 64 x 64 tile left
    half the SMs idle or ran 1.7 waves): 1.14-1.46x cuBLAS at M = 64 on the three larger shapes,
    against 0.84-1.19x for ``gemm_swap``. From 128 tokens, one program per tile (stream-K's partial
    tiles cost more than the waves it evens out: 0.67-0.72x against 0.81-0.94x), two K-halves per
    tile when K is long and the tiles do not fill the SMs (4096 x 14336: 1.00x against 0.83x; at 128-token
    tiles these halves run as 2-program clusters, :func:`cluster_default`).
    Where the tiles outrun two waves of two programs per SM, the whole SM-waves run one tile per
    program and the tiles left over are shared by one more program per SM (14336 x 4096, M = 256:
    448 tiles, 396 whole and 52 shared by 132 programs: 65.4 us against 68.0 one per tile, and
    66.2 against 66.3 / 67.8 in a second run, so 0-4%; every split with more shared tiles was
    slower, e.g. 264 whole + 264 sharing 184 tiles: 74.4 us). Between one and one and a half
    tiles per SM, one whole tile per SM and the rest in K-halves, so that every program has a slot
    of its own (two per SM) and the SMs with a second program run half a tile, not a whole one
    (6144 x 4096, M = 256: 192 tiles, 132 whole + 120 halves, 33.1 -> 30.2 us).
    """
    if m <= 64:
        return 2 * sms, 0
    if tiles > 2 * sms:
        whole = tiles // sms * sms
        return whole + sms, whole
    if sms < tiles <= sms * 3 // 2 and k_tiles >= 2:
        return sms + 2 * (tiles - sms), sms
    return tiles * (2 if k_tiles >= 16 and tiles <= sms else 1), 0


def grid(programs: int, dp: int, tiles: int, k_tiles: int) -> tuple[int, int]:
    """``(programs, dp)`` made launchable: at least one program, whole tiles only for existing tiles,
    and every stream-K share at least one unit (an empty share would never arrive at its tile)."""
    dp = max(0, min(dp, tiles, programs))
    left = (tiles - dp) * k_tiles
    if left == 0:
        return dp, dp
    return dp + max(1, min(programs - dp, left)), dp


def default_block_m(m: int, n: int, sms: int, block_n: int = 64) -> int:
    """Tokens per tile: 128, or 64 up to 128 tokens when 128-token tiles would fill at most half the
    SMs (H100, M = 128: 4096 x 4096 0.63-0.78x -> 0.83x cuBLAS, 4096 x 14336 1.08x -> 1.12x; with
    more rows 128 stays ahead: 6144 x 4096 0.89x vs 0.87x, 14336 x 4096 1.29x vs 0.92x)."""
    if m <= 64 or (m <= 128 and triton.cdiv(n, block_n) <= sms // 2):
        return 64
    return 128


def tokens_per_tile(m: int, n: int, sms: int, block_n: int = 64, block_m: int | None = None) -> int:
    """The tile's token count as launched: the asked or default (:func:`default_block_m`) one, cut
    to the smallest power of two (at least 64, the wgmma's) that holds all ``m`` tokens."""
    if block_m is None:
        block_m = default_block_m(m, n, sms, block_n)
    return min(block_m, max(64, triton.next_power_of_2(m)))


def gemm_prefill(x: torch.Tensor, w: TritonW4) -> torch.Tensor:
    """The dispatch's Hopper kernel for M > 16: gluon_w4a16_cluster's split 128 x 256 tiles where
    :func:`~klaq.kernels.gluon_w4a16_cluster.use_cluster` takes them, gluon_w4a16_tall's whole ones where
    :func:`~klaq.kernels.gluon_w4a16_tall.use_tall` says they are faster, else :func:`gemm_wgmma`."""
    from klaq.kernels import gluon_w4a16_cluster, gluon_w4a16_tall  # they import this module: not at the top

    x2 = x.reshape(-1, w.in_features)
    if gluon_w4a16_cluster.use_cluster(x2.shape[0], w, _sm_count(x.device)):
        return gluon_w4a16_cluster.gemm_cluster(x, w)
    if gluon_w4a16_tall.use_tall(x2.shape[0], w, _sm_count(x.device)):
        return gluon_w4a16_tall.gemm_tall(x, w)
    return gemm_wgmma(x, w)


def _cluster_launch(kernel, programs: int, ctas: int, *args, **kwargs) -> None:
    """Launch ``kernel`` (a Gluon kernel compiled for one CTA per program, so ``program_id`` counts CTAs)
    over ``programs`` programs as clusters of ``ctas`` consecutive ones. Triton 3.6 launches clusters of
    ``num_ctas`` CTAs (``cuLaunchKernelEx``'s cluster dimension) but compiles ``num_ctas > 1`` kernels
    for CTA-split layouts this kernel does not use; so the launch is compiled at one CTA (``warmup``)
    and its cached launch record told to launch ``ctas`` per cluster, ``programs / ctas`` clusters.
    That record belongs to this specialization only (the ``CLUSTER`` constexpr keeps it apart)."""
    compiled = kernel.warmup(*args, grid=(programs // ctas, ), **kwargs)
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    num_warps, _, shared = compiled.packed_metadata
    compiled.packed_metadata = (num_warps, ctas, shared)
    kernel[(programs // ctas, )](*args, **kwargs)


def cluster_pairs(programs: int, dp: int, tiles: int, k_tiles: int) -> bool:
    """Whether a launch's shares are K-halves of tiles, each pair of halves two consecutive programs
    starting at an even one, so that 2-program clusters hold whole tiles or both halves of one."""
    return dp % 2 == 0 and k_tiles >= 2 and programs - dp == 2 * (tiles - dp)


def cluster_default(programs: int, dp: int, tiles: int, k_tiles: int, block_m: int) -> bool:
    """Whether the default launch exchanges through clusters: every tile in K-halves (long K, tiles for at
    most one per SM: :func:`default_programs`) of 128 tokens, unless ``KLAQ_CLUSTER=0`` (read at each call).
    H100, one run (bench/results/wgmma_cluster_probe_h100.txt): 4096 x 14336 at M = 256 65.3 / 66.2 us
    against 67.4 / 67.4 through global memory. Not where whole tiles and halves mix (6144 x 4096: 28.9
    against 29.1, the halves end first), nor for short K (4096 x 4096 all in halves: 26.4 against 24.7), nor
    for 64-token tiles (M <= 128 on 4096 rows: not measured)."""
    return (os.environ.get("KLAQ_CLUSTER", "1") != "0" and dp == 0 and programs == 2 * tiles and k_tiles >= 16
            and block_m == 128)


def gemm_wgmma(x: torch.Tensor, w: TritonW4, block_n: int = 64, block_m: int | None = None, stages: int = 6,
               num_warps: int = 4, programs: int | None = None, dp: int | None = None,
               cluster: bool | None = None) -> torch.Tensor:
    """``x @ W.T`` for fp16 ``x [M, K]`` on Hopper (K % 8 == 0 for TMA's 16-byte row stride).

    ``block_m``: tokens per tile (:func:`default_block_m`); ``programs``: the persistent grid and
    ``dp``: how many of its programs take one whole output tile each before the rest share what is
    left (:func:`default_programs`). ``cluster``: the shares are K-halves (:func:`cluster_pairs`) and
    each pair runs as a 2-program cluster, its partial sum exchanged through distributed shared memory
    instead of global memory (the same bits); default: :func:`cluster_default` for the default launch,
    off for a given one.
    """
    if stages < 4:  # STAGES // 2 - 1 pairs of x slices in flight: none would leave the first wait hanging
        raise ValueError(f"stages must be at least 4, got {stages}")
    x2 = x.reshape(-1, w.in_features)
    m, n = x2.shape[0], w.out_features
    block_m = tokens_per_tile(m, n, _sm_count(x.device), block_n, block_m)
    sub = w.block_k // 8
    layout = gl.NVMMASharedLayout.get_default_for([block_m, sub], gl.float16)
    x_desc = TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [block_m, sub], layout)
    blocks_m = triton.cdiv(m, block_m)
    tiles = triton.cdiv(n, block_n) * blocks_m
    units = tiles * w.n_tiles
    launch_given = programs is not None
    if programs is None:
        programs, default_dp = default_programs(m, tiles, w.n_tiles, _sm_count(x.device))
        dp = default_dp if dp is None else dp
    programs, dp = grid(programs, dp or 0, tiles, w.n_tiles)
    if cluster is None:
        cluster = not launch_given and cluster_default(programs, dp, tiles, w.n_tiles, block_m)
    if cluster and not cluster_pairs(programs, dp, tiles, w.n_tiles):
        raise ValueError(f"cluster=True needs the shares as aligned K-halves: {programs} programs, dp {dp}, "
                         f"{tiles} tiles of {w.n_tiles} K-tiles")
    y = torch.empty((m, n), device=x.device, dtype=torch.float16)
    _, cnt = _workspace(x.device, 0, tiles)  # per-tile arrival counters, zero between calls
    ws = _slots(x.device, 2 * programs * block_m * block_n)
    offsets = w.offsets if w.offsets is not None else w.scales
    vec = 8 if block_n >= 256 else 4  # the epilogue's n-contiguous store layout
    args = (x_desc, w.qweight, w.scales, offsets, y, ws, cnt, m, n, w.qweight.shape[1], y.stride(0), w.group_size,
            w.n_tiles, blocks_m, units, dp)
    consts = dict(HAS_ZERO=w.offsets is not None, PAIR_GROUP=w.group_size % (2 * sub) == 0, BLOCK_N=block_n,
                  BLOCK_M=block_m, SUB=sub, STAGES=stages, OUT_VEC=vec, OUT_TN=min(32, block_n // vec),
                  num_warps=num_warps)
    if cluster:
        assert stages * block_m * sub * 2 >= block_n * block_m * 4, "the exchange area lies in the x ring"
        _cluster_launch(_gemm_wgmma_kernel, programs, 2, *args, CLUSTER=True, **consts)
    else:
        _gemm_wgmma_kernel[(programs, )](*args, **consts)
    return y.reshape(*x.shape[:-1], n)

