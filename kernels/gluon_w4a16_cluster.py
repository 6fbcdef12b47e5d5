"""Hopper W4A16 GEMM for M > 128 in Gluon: 128 x 256 tiles split in K over a thread-block cluster.

gluon_w4a16_tall's programs (128 weight rows x 256 tokens, two warpgroups) run at cuBLAS's rate per SM,
but one tile per program leaves SMs idle where the tiles do not fill them (6144 x 4096 at M = 256: 48
tiles for 132 SMs), and stream-K shares that even it out paid 18-24 us to sum their partial tiles through
global memory (BENCHMARKS.md, "M > 128: 128 x 256 tiles"). Here a cluster of ``CTAS`` programs takes
``PER`` consecutive tiles and cuts their K-tiles into equal contiguous shares, one per program (6144 x
4096: clusters of 8 over 3 tiles, 3 of 8 K-tiles each, 128 programs), so each share lies in at most two
tiles and the partial sums meet inside the cluster:

- A share's *final* segment (its last, or only, tile) is summed by reduce-scatter over distributed shared
  memory: the ``r`` programs whose final segment lies in a tile each own ``8 / r`` of its 8 warps' rows;
  once every loop of the cluster is done (the x rings idle), each program writes the rows it does not own
  into their owner's ring, and each owner adds them to its accumulator and stores its rows of y.
- A share that starts inside a tile and goes on into the next has an *early* segment, that tile's tail:
  its partial tile goes to global memory at once (``ws``, one fp32 tile per tile), long before the
  tile's owners read it back, after the cluster barrier, each its own rows.

Partial sums are kept and moved in the order each thread holds them (``_thread_pos``): warp-contiguous
stores and loads, no layout conversion. The sum of a tile's parts is in a fixed order for a given launch
(the owner's part, then the others' in cluster order, then the early tail), so the same bits every call.

Gluon has no interpreter mode: the kernel runs in tests on a Hopper GPU only
(tests/kernels/test_gluon_w4a16_cluster.py); CI checks the launch plans on the CPU and compiles the
kernel for sm_90a (tests/bench/test_wgmma_ptxas.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from klaq.kernels.gluon_w4a16 import _cluster_launch, _cluster_sync, _cta_barrier, _slots, _sm_count
from klaq.kernels.gluon_w4a16_tall import BLOCK_N, TOKENS, _tile_sum, tall_input, tall_ok
from klaq.kernels.triton_w4a16 import TritonW4

WARPS = 8  # two warpgroups: warp w holds weight rows 16w .. 16w + 15 of the tile
PART = BLOCK_N * TOKENS  # fp32 values in a partial tile
CLUSTER_SIZES = (2, 4, 8)  # 8: the portable maximum
# the same, as the kernels see them
_ROWS = gl.constexpr(BLOCK_N)
_TOKENS = gl.constexpr(TOKENS)
_WARPS = gl.constexpr(WARPS)
_PART = gl.constexpr(PART)

# One fp32 into the ring of cluster rank $2 at fp32 index $1 (from the start of the kernel's shared memory),
# where $4 != 0.
_SEND = gl.constexpr("{ .reg .b32 a, p;\n\t.reg .pred q;\n\tsetp.ne.u32 q, $4, 0;\n\tmov.b32 a, global_smem;\n\t"
                     "mad.lo.u32 a, $1, 4, a;\n\tmapa.shared::cluster.u32 p, a, $2;\n\t"
                     "@q st.shared::cluster.f32 [p], $3;\n\tmov.b32 $0, 0; }")
# The fp32 at index $1 of this program's shared memory where $2 != 0, else 0.
_RECV = gl.constexpr("{ .reg .b32 a;\n\t.reg .pred q;\n\tsetp.ne.u32 q, $2, 0;\n\tmov.b32 a, global_smem;\n\t"
                     "mad.lo.u32 a, $1, 4, a;\n\tmov.f32 $0, 0f00000000;\n\t@q ld.shared.f32 $0, [a]; }")


@gluon.jit
def _share(rank, L, CTAS: gl.constexpr):
    """K-tiles ``[b, e)`` of the cluster's sequence (its tiles' K-tiles, tile by tile) for cluster rank ``rank``."""
    return rank * L // CTAS, (rank + 1) * L // CTAS


@gluon.jit
def _holder(kt, L, CTAS: gl.constexpr):
    """The cluster rank whose share holds K-tile ``kt`` of the sequence."""
    return ((kt + 1) * CTAS - 1) // L


@gluon.jit
def _owners(j, n_tiles, L, CTAS: gl.constexpr):
    """Tile ``j`` of the cluster: its owners, ranks ``first .. first + r - 1`` (the shares whose final
    segment lies in it, in K order), and whether another share's early segment holds its tail."""
    first = _holder(j * n_tiles, L, CTAS)
    last = _holder((j + 1) * n_tiles - 1, L, CTAS)
    tail = (last + 1) * L // CTAS > (j + 1) * n_tiles
    return first, last - first + 1 - tail.to(gl.int32), tail


@gluon.jit
def _thread_pos(mma: gl.constexpr):
    """Each accumulator element's ``(warp, i, lane)``: the wgmma accumulator's own order (lane l holds
    rows l // 4 and l // 4 + 8 of its warp's 16, columns 2 (l % 4) + {0, 1} + 8 j), so that a warp's
    32 lanes storing their i-th value touch 32 consecutive words."""
    r = gl.expand_dims(gl.arange(0, _ROWS, layout=gl.SliceLayout(1, mma)), 1)
    col = gl.expand_dims(gl.arange(0, _TOKENS, layout=gl.SliceLayout(0, mma)), 0)
    rr = r % 16
    lane = (rr % 8) * 4 + (col % 8) // 2
    i = (col // 8) * 4 + (rr // 8) * 2 + col % 2
    return r // 16, i, lane


@gluon.jit
def _cluster_kernel(x_desc, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, M, N, Kw, stride_ym, group_size, n_tiles, blocks_m,
                    tiles, HAS_ZERO: gl.constexpr, PAIR_GROUP: gl.constexpr, SUB: gl.constexpr,
                    STAGES: gl.constexpr, RING: gl.constexpr, CTAS: gl.constexpr, PER: gl.constexpr,
                    num_warps: gl.constexpr):
    HS: gl.constexpr = SUB // 2
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, _TOKENS, 16])
    out_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    pid = gl.program_id(0)
    rank = pid % CTAS
    tile0 = (pid // CTAS) * PER  # the cluster's first tile
    L = PER * n_tiles
    b, e = _share(rank, L, CTAS)

    # the x ring first (RING >= STAGES stages: the exchange area at the start of shared memory), then its barriers
    x_smem = gl.allocate_shared_memory(gl.float16, [RING, _TOKENS, HS], x_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)

    # one or two segments: an early one (a tile's tail, to ws) and the final one (kept in acc)
    acc = gl.zeros([_ROWS, _TOKENS], gl.float32, layout=mma)
    c = 0
    u = b
    while u < e:
        j = u // n_tiles
        t_start = u % n_tiles
        t_end = gl.minimum(n_tiles, t_start + e - u)
        tile = gl.minimum(tile0 + j, tiles - 1)  # past the last tile (a partial cluster): a finite copy, unstored
        acc, c = _tile_sum(x_desc, x_smem, bars, w_ptr, s_ptr, o_ptr, N, Kw, group_size, tile // blocks_m,
                           (tile % blocks_m) * _TOKENS, t_start, t_end, c, mma, HAS_ZERO, PAIR_GROUP, _ROWS,
                           _TOKENS, SUB, STAGES)
        u += t_end - t_start
        if u < e:
            warp, i, lane = _thread_pos(mma)
            gl.store(ws_ptr + (tile0 + j) * _PART + (i * (_WARPS * 32) + warp * 32 + lane), acc)

    # the final tile's owners: this program is owner k of r; owner o holds warps [w0(o), w0(o + 1))
    jf = (e - 1) // n_tiles
    warp, i, lane = _thread_pos(mma)
    first, r, tail = _owners(jf, n_tiles, L, CTAS)
    k = rank - first
    owner = warp * r // _WARPS  # of this element's rows
    w0 = (owner * _WARPS + r - 1) // r
    nthreads = ((owner + 1) * _WARPS + r - 1) // r * 32 - w0 * 32  # the owner's rows' threads
    slot = k - (k > owner).to(gl.int32)  # this program's place among the owner's r - 1 senders
    at = slot * (nthreads * 128) + i * nthreads + (warp * 32 + lane - w0 * 32)
    _cluster_sync(pid)  # every loop done: the rings are free; the early tails are in ws
    gl.inline_asm_elementwise(_SEND, "=r,r,r,f,r", [at, first + owner, acc, (owner != k).to(gl.int32)],
                              dtype=gl.int32, is_pure=False, pack=1)
    _cluster_sync(pid)  # every part in its owner's ring
    mine = owner == k
    for s in gl.static_range(CTAS):  # unrolled: a loop over r had ptxas spill 216 bytes, this 28 (Triton 3.6)
        if (s < r) & (s != k):
            where = (s - (s > k).to(gl.int32)) * (nthreads * 128) + i * nthreads + (warp * 32 + lane - w0 * 32)
            acc += gl.inline_asm_elementwise(_RECV, "=f,r,r", [where, mine.to(gl.int32)], dtype=gl.float32,
                                             is_pure=False, pack=1)
    if tail:
        acc += gl.load(ws_ptr + (tile0 + jf) * _PART + (i * (_WARPS * 32) + warp * 32 + lane),
                       mask=mine & (i >= 0), other=0.0, cache_modifier=".cg")
    _cta_barrier()  # every ring read done before the epilogue's shared-memory scratch is written

    # y [M, N]: this owner's rows of the tile, n-contiguous
    tile = tile0 + jf
    m0 = (tile % blocks_m) * _TOKENS
    rows = gl.expand_dims(gl.arange(0, _ROWS, layout=gl.SliceLayout(0, out_l)), 0)
    m2 = gl.expand_dims(m0 + gl.arange(0, _TOKENS, layout=gl.SliceLayout(1, out_l)), 1)
    n2 = (tile // blocks_m) * _ROWS + rows
    keep = ((rows // 16) * r // _WARPS == k) & (n2 < N) & (m2 < M) & (tile < tiles)
    vals = gl.convert_layout(gl.permute(acc.to(gl.float16), (1, 0)), out_l)
    gl.store(y_ptr + m2 * stride_ym + n2, vals, mask=keep)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))


@dataclass(frozen=True)
class Plan:
    """A cluster launch: clusters of ``ctas`` programs over ``per`` tiles each."""

    ctas: int
    per: int
    clusters: int

    @property
    def programs(self) -> int:
        return self.ctas * self.clusters

    def shares(self, k_tiles: int) -> list[tuple[int, int]]:
        """Each rank's K-tiles ``[b, e)`` of its cluster's sequence (the kernel's ``_share``)."""
        n = self.per * k_tiles
        return [(q * n // self.ctas, (q + 1) * n // self.ctas) for q in range(self.ctas)]

    def longest(self, k_tiles: int) -> int:
        """K-tiles in the longest share: the launch's time in units of one tall K-tile."""
        return max(e - b for b, e in self.shares(k_tiles))

    def owners(self, k_tiles: int) -> list[int]:
        """How many shares own each of a cluster's tiles (their final segment lies in it)."""
        return [sum((e - 1) // k_tiles == j for _, e in self.shares(k_tiles)) for j in range(self.per)]

    def exchange_bytes(self, k_tiles: int) -> int:
        """The largest exchange area an owner needs: ``r - 1`` parts of its rows, 16 KB per warp."""
        return max((r - 1) * -(-WARPS // r) * 32 * 128 * 4 for r in self.owners(k_tiles))


def plans(tiles: int, k_tiles: int, sms: int) -> list[Plan]:
    """Every launch that fits the SMs at once (one program per SM): ``per <= ctas`` (a share lies in at
    most two tiles), every share at least one K-tile, more than one program per cluster."""
    out = []
    for ctas in CLUSTER_SIZES:
        for per in range(1, ctas + 1):
            clusters = triton.cdiv(tiles, per)
            if clusters * ctas <= sms and per * k_tiles >= ctas:
                out.append(Plan(ctas, per, clusters))
    return out


def best_plan(tiles: int, k_tiles: int, sms: int) -> Plan | None:
    """The plan with the shortest longest share (then fewer padded tiles, then the smaller cluster), if
    it beats one tile per program (``k_tiles`` K-tiles on the busiest SM, a second wave past ``sms``)."""
    whole = k_tiles * triton.cdiv(tiles, sms)
    ranked = sorted(plans(tiles, k_tiles, sms), key=lambda p: (p.longest(k_tiles), p.clusters * p.per, p.ctas))
    return ranked[0] if ranked and ranked[0].longest(k_tiles) < whole else None


def default_plan(tiles: int, k_tiles: int, sms: int) -> Plan:
    """:func:`best_plan`, else clusters of 2 over 2 tiles (about one tile per program; every share at least
    one K-tile, whatever the tile and K-tile counts)."""
    return best_plan(tiles, k_tiles, sms) or Plan(2, 2, triton.cdiv(tiles, 2))


def use_cluster(m: int, w: TritonW4, sms: int) -> bool:
    """Whether the dispatch (gluon_w4a16.gemm_prefill) takes this kernel: ``KLAQ_CLUSTER_SPLIT=1`` (read at each
    call; off by default until timed on a GPU), more than 128 tokens, slices that split in k16 halves, and a
    plan that beats one tile per program (:func:`best_plan`)."""
    if os.environ.get("KLAQ_CLUSTER_SPLIT", "0") != "1" or m <= 128 or not tall_ok(w):
        return False
    tiles = triton.cdiv(w.out_features, BLOCK_N) * triton.cdiv(m, TOKENS)
    return best_plan(tiles, w.n_tiles, sms) is not None


def gemm_cluster(x: torch.Tensor, w: TritonW4, ctas: int | None = None, per: int | None = None,
                 stages: int = 6) -> torch.Tensor:
    """``x @ W.T`` for fp16 ``x [M, K]`` on Hopper: 128 x 256 tiles, clusters of ``ctas`` programs over
    ``per`` tiles (default: :func:`best_plan`; one tile per program where no plan beats it)."""
    x2, x_desc = tall_input(x, w, stages)
    m, n = x2.shape[0], w.out_features
    blocks_m = triton.cdiv(m, TOKENS)
    tiles = triton.cdiv(n, BLOCK_N) * blocks_m
    if (ctas is None) != (per is None):
        raise ValueError("clusters of ctas programs over per tiles: give both, or neither for the default plan")
    if ctas is None:
        plan = default_plan(tiles, w.n_tiles, _sm_count(x.device))
    else:
        if ctas not in CLUSTER_SIZES or not 1 <= per <= ctas or per * w.n_tiles < ctas:
            raise ValueError(f"clusters of {ctas} over {per} tiles of {w.n_tiles} K-tiles: need ctas in "
                             f"{CLUSTER_SIZES}, 1 <= per <= ctas and per * k_tiles >= ctas")
        plan = Plan(ctas, per, triton.cdiv(tiles, per))
    stage_bytes = TOKENS * (w.block_k // 16) * 2
    ring = max(stages, -(-plan.exchange_bytes(w.n_tiles) // stage_bytes))
    y = torch.empty((m, n), device=x.device, dtype=torch.float16)
    ws = _slots(x.device, plan.clusters * plan.per * PART)  # the early tails: written before they are read
    offsets = w.offsets if w.offsets is not None else w.scales
    _cluster_launch(_cluster_kernel, plan.programs, plan.ctas, x_desc, w.qweight, w.scales, offsets, y, ws, m, n,
                    w.qweight.shape[1], y.stride(0), w.group_size, w.n_tiles, blocks_m, tiles,
                    HAS_ZERO=w.offsets is not None, PAIR_GROUP=w.group_size % (w.block_k // 4) == 0, SUB=w.block_k // 8,
                    STAGES=stages, RING=ring, CTAS=plan.ctas, PER=plan.per, num_warps=WARPS)
    return y.reshape(*x.shape[:-1], n)

