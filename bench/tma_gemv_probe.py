"""Probe: an M = 1 GEMV whose weight words arrive by TMA into shared memory (H100; Gluon).

    python bench/tma_gemv_probe.py            # on a Hopper GPU (Gluon has no interpreter)

Why: ``gemv_h2`` and the register-layout Gluon probe (bench/gluon_gemv_probe.py) load the words
with ordinary loads into registers, so how many bytes a program has in flight is bounded by its
registers: the read-only floor of those loads is 4.64 us at 4096x4096 (1.8 TB/s), and 3.0x
cuBLAS needs 5.6 us. Here one thread per program issues TMA copies of the program's whole weight
range (or ``STAGES`` chunks of it) at its start, so all of it is in flight at once and the
registers only hold what is being computed. Each chunk is read from shared memory in the layout
of the rows-in-thread probe (``BLOCK_N / WR`` rows x one quad of 4 words per thread: x broadcast
over the rows in registers, 16-byte scale loads, the half2 column sum of gemv_h2).

The weight is seen as ``[N, Kw / 4, 4]`` so a TMA box is exactly the register tile
``[BLOCK_N, Q, 4]`` (no swizzle: a warp reads 32 consecutive 16-byte quads of one row, without
bank conflicts). ``--floor`` adds the same kernel with no arithmetic (the TMA read floor).

Result (H100, bench/results/tma_gemv_probe_h100.txt; not kept in the dispatch): exact (rel err
5-6e-4, as gemv_h2) but slower than gemv_h2 on every shape (best 7.05 / 8.24 / 15.15 / 21.29 us
against 6.67 / 8.02 / 14.81 / 16.34), and its read floor is no lower than the plain loads' (5.1-5.4
us at 4096x4096 against 4.6-4.7): TMA does not lift the floor. Only ``--pdl`` (the next call's TMA
issued before ``griddepcontrol.wait``, so back-to-back calls overlap) goes below it: 4.97 us
(3.40x cuBLAS) at 4096x4096 with 8:1:4, 2.82x and 2.95x on the other two large shapes.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).parent))
from gluon_gemv_probe import _C4_EVEN, _C4_ODD, _CONS, _SUM, _half2  # noqa: E402  (its quad column sum)

from kernels import gemv_baseline, graph_time_us  # noqa: E402

# Triton 3.6 (the device) names the TMA load async_copy_global_to_shared; later ones async_load
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier  # renamed likewise


@gluon.jit
def _issue(w_desc, w_smem, bars, row0, c, n_chunks, CW: gl.constexpr, STAGES: gl.constexpr):
    """TMA chunk ``c`` (CW words of each of the program's rows) into its stage, in boxes of at most
    256 words (TMA's box limit)."""
    BOX: gl.constexpr = w_desc.block_type.shape[1]
    ok = c < n_chunks
    st = c % STAGES
    mbarrier.expect(bars.index(st), w_desc.block_type.nbytes * (CW // BOX), pred=ok)
    for j in gl.static_range(CW // BOX):
        _tma_load(w_desc, [row0, c * CW + j * BOX], bars.index(st), w_smem.index(st).slice(j * BOX, BOX, dim=1),
                  pred=ok)


@gluon.jit
def _x_s(x_ptr, s_ptr, kx, ks, p: gl.constexpr, s_rows, live, zero, N, K, group_size, SUB: gl.constexpr):
    """Pair p's x (halved, as half2, broadcast over the rows) and raw scales [BLOCK_N, Q]."""
    ka = kx + 2 * p * SUB
    xa = gl.load(x_ptr + ka, mask=ka < K, other=0.0)
    xb = gl.load(x_ptr + ka + SUB, mask=ka + SUB < K, other=0.0)
    g = gl.expand_dims((ks + 2 * p * SUB) // group_size, 0)
    s = gl.load(s_ptr + g * N + s_rows, mask=(s_rows < N) & live, other=0.0)
    return gl.expand_dims(_half2(xa * 0.5, xb * 0.5), 0) + zero, s


@gluon.jit
def _colsum(words, x2, s, a2, p: gl.constexpr):
    """gemv_h2's symmetric half2 column sum of pair p over each quad (sum in slot 0 of the quad)."""
    s2 = gl.expand_dims(_half2(s, s), 2) + gl.zeros_like(words)
    if p < 2:
        v = words
    else:
        v = words >> 8
    if p % 2 == 0:
        return gl.inline_asm_elementwise(_C4_EVEN, _CONS, [v, x2, s2, a2], dtype=gl.int32, is_pure=True, pack=4)
    return gl.inline_asm_elementwise(_C4_ODD, _CONS, [v, x2, s2, a2], dtype=gl.int32, is_pure=True, pack=4)


@gluon.jit
def _gemv_tma_kernel(w_desc, x_ptr, s_ptr, y_ptr, N, K, Kw, group_size, BLOCK_N: gl.constexpr, WR: gl.constexpr,
                     WQ: gl.constexpr, SUB: gl.constexpr, STAGES: gl.constexpr, COMPUTE: gl.constexpr,
                     PDL: gl.constexpr, num_warps: gl.constexpr):
    RPT: gl.constexpr = BLOCK_N // WR  # rows per thread
    Q: gl.constexpr = 32 * WQ  # quads (4 words) per chunk and row
    L3: gl.constexpr = gl.BlockedLayout([RPT, 1, 4], [1, 32, 1], [WR, WQ, 1], [2, 0, 1])
    LS: gl.constexpr = gl.SliceLayout(2, L3)  # [BLOCK_N, Q]
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # [Q, 4]
    pid = gl.program_id(0)
    row0 = pid * BLOCK_N
    n_chunks = gl.cdiv(Kw, 4 * Q)

    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 4 * Q], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    for b in gl.static_range(STAGES):
        _issue(w_desc, w_smem, bars, row0, b, n_chunks, 4 * Q, STAGES)
    if PDL:  # the words never depend on an earlier kernel; x (and y's buffer) may
        gdc_launch_dependents()
        gdc_wait()

    rows_raw = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    quad_s = gl.arange(0, Q, layout=gl.SliceLayout(0, LS))
    quad_x = gl.arange(0, Q, layout=gl.SliceLayout(1, LX))
    c_x = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))
    s_rows = gl.expand_dims(rows_raw, 1)
    zero = gl.zeros([BLOCK_N, Q, 4], gl.int32, layout=L3)
    acc = gl.zeros([BLOCK_N, Q], gl.float32, layout=LS)
    chk = gl.zeros([BLOCK_N, Q, 4], gl.int32, layout=L3)
    for c in range(n_chunks):
        st = c % STAGES
        if COMPUTE:
            # x and scales of this chunk before waiting for its words
            wx = (c * Q + gl.expand_dims(quad_x, 1)) * 4 + gl.expand_dims(c_x, 0)
            kx = (wx // SUB) * (8 * SUB) + wx % SUB
            ks = ((c * Q + quad_s) * 4 // SUB) * (8 * SUB)
            live = gl.expand_dims(c * Q + quad_s < Kw // 4, 0)
            xs0, ss0 = _x_s(x_ptr, s_ptr, kx, ks, 0, s_rows, live, zero, N, K, group_size, SUB)
            xs1, ss1 = _x_s(x_ptr, s_ptr, kx, ks, 1, s_rows, live, zero, N, K, group_size, SUB)
            xs2, ss2 = _x_s(x_ptr, s_ptr, kx, ks, 2, s_rows, live, zero, N, K, group_size, SUB)
            xs3, ss3 = _x_s(x_ptr, s_ptr, kx, ks, 3, s_rows, live, zero, N, K, group_size, SUB)
        mbarrier.wait(bars.index(st), (c // STAGES) & 1)
        words = w_smem.index(st).reshape([BLOCK_N, Q, 4]).load(L3)
        if n_chunks > STAGES:  # refill this stage with the chunk STAGES on (all warps have read it)
            _cta_barrier()
            _issue(w_desc, w_smem, bars, row0, c + STAGES, n_chunks, 4 * Q, STAGES)
        if COMPUTE:
            a2 = _colsum(words, xs0, ss0, zero, 0)
            a2 = _colsum(words, xs1, ss1, a2, 1)
            a2 = _colsum(words, xs2, ss2, a2, 2)
            a2 = _colsum(words, xs3, ss3, a2, 3)
            acc += gl.inline_asm_elementwise(_SUM, "=f,r", [gl.sum(a2, axis=2)], dtype=gl.float32, is_pure=True,
                                             pack=1)
        else:
            chk = chk ^ words
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(b))
    if COMPUTE:
        out = gl.sum(acc, axis=1) * 8.0  # weights were (q - 8) / 4, x / 2
    else:
        out = gl.sum(gl.sum(chk, axis=2), axis=1).to(gl.float32)
    offs = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    gl.store(y_ptr + offs, out.to(gl.float16), mask=offs < N)


class TmaGemv:
    """A weight's TMA descriptor for one launch config (built once, like a repack)."""

    def __init__(self, w, block_n: int, wr: int, wq: int, stages: int | None = None, compute: bool = True,
                 pdl: bool = False):
        assert w.offsets is None and w.group_size % (2 * (w.block_k // 8)) == 0
        self.w, self.block_n, self.wr, self.wq, self.compute, self.pdl = w, block_n, wr, wq, compute, pdl
        n, kw = w.qweight.shape
        q = 32 * wq
        chunks = triton.cdiv(kw, 4 * q)
        self.stages = stages or chunks
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        self.desc = TensorDescriptor(w.qweight, [n, kw], [kw, 1], [block_n, min(4 * q, 256)], layout)
        self.smem = self.stages * block_n * q * 16

    def __call__(self, x):
        w = self.w
        n = w.out_features
        y = torch.empty((1, n), device=x.device, dtype=torch.float16)
        _gemv_tma_kernel[(triton.cdiv(n, self.block_n),)](
            self.desc, x, w.scales, y, n, w.in_features, w.qweight.shape[1], w.group_size, BLOCK_N=self.block_n,
            WR=self.wr, WQ=self.wq, SUB=w.block_k // 8, STAGES=self.stages, COMPUTE=self.compute,
            PDL=self.pdl, num_warps=self.wr * self.wq, launch_pdl=self.pdl)
        return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,4096x14336")
    ap.add_argument("--configs", default="32:4:1,16:2:2,16:4:1,8:1:4,8:2:2,8:1:2,16:1:4,32:4:2,16:2:4",
                    help="BLOCK_N:WR:WQ[:STAGES] list (warps = WR * WQ; a chunk is 128 * WQ words per row)")
    ap.add_argument("--floor", action="store_true", help="also time each config without arithmetic")
    ap.add_argument("--pdl", action="store_true", help="also time each config with programmatic dependent launch "
                    "(words loaded before griddepcontrol.wait, so back-to-back calls overlap)")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base, ws, x, exact, t_cublas = gemv_baseline(n, k)
        for cfg in args.configs.split(","):
            parts = list(map(int, cfg.split(":")))
            bn, wr, wq = parts[:3]
            stages = parts[3] if len(parts) > 3 else None
            modes = [(True, False)] + [(False, False)] * args.floor + [(True, True)] * args.pdl
            for compute, pdl in modes:
                try:
                    g0 = TmaGemv(base, bn, wr, wq, stages, compute, pdl)
                    if g0.smem > 200 * 1024:
                        print(f"   tma {cfg}: skipped ({g0.smem // 1024} KB of shared memory)")
                        break
                    y = g0(x).float()
                    err = float((y - exact).abs().max() / exact.abs().max()) if compute else float("nan")
                    fns = [TmaGemv(w, bn, wr, wq, stages, compute, pdl) for w in ws]
                    t = graph_time_us(fns_x := [partial(f, x) for f in fns])
                    del fns_x
                    what = ("gemv" if compute else "read floor") + (", PDL" if pdl else "")
                    print(f"   tma {cfg} ({what}, {g0.stages} stages, {g0.smem // 1024} KB): {t:.2f} us "
                          f"({t_cublas / t:.2f}x cuBLAS) rel err {err:.1e}", flush=True)
                except Exception as e:  # a probe: report and go on
                    print(f"   tma {cfg}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
