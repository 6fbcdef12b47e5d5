"""Probe: ``gemv_tma``'s arithmetic on words loaded straight into registers (no TMA, no shared memory),
alone and as a dependent PDL chain, with its read floor, against the dispatch's default and cuBLAS.

    python bench/reg_gemv_probe.py [--shapes 4096x4096,...] [--configs 8:1:4,4:1:4] [--floor]   # Hopper

Why: at 4096x4096 the M = 1 target needs about 5.5 us alone. ``gemv_tma``'s read floor (TMA, no
arithmetic) is 5.3 us, while flat plain loads of the same bytes read in 4.6 (bench/gemv_probe.py), and the
register-load GEMVs tried so far (``gemv_h2`` in Triton, ``gemv_mma``'s 16-row programs) read slower than
both. This kernel keeps ``gemv_tma``'s geometry and arithmetic exactly (``BLOCK_N / WR`` rows x one quad
of 4 words per thread, gluon_gemv's ``_colsum``) but each program loads its whole row range with one
16-byte load per row and quad, all issued at its start (before the PDL wait), so the loads are the only
difference: if its floor is the flat read's, the ~0.9 us of arithmetic over the floor fits the target.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).parent))
from kernels import chain, copies_for, gemv_baseline, graph_time_us  # noqa: E402
from klaq.kernels.gluon_gemv import _SUM, _colsum, _s, _x, gemv_tma  # noqa: E402
from klaq.kernels.pdl import launch_kwargs  # noqa: E402
from klaq.kernels.triton_w4a16 import w4a16_matmul  # noqa: E402


@gluon.jit
def _gemv_reg_kernel(w_ptr, x_ptr, s_ptr, y_ptr, N, K, Kw, group_size, BLOCK_N: gl.constexpr, WR: gl.constexpr,
                     WQ: gl.constexpr, NCH: gl.constexpr, SUB: gl.constexpr, PDL: gl.constexpr,
                     COMPUTE: gl.constexpr, EVICT: gl.constexpr, num_warps: gl.constexpr):
    # One program: BLOCK_N rows x the whole row (NCH chunks of 32 * WQ quads, each thread one quad of
    # each chunk for BLOCK_N / WR rows, held as layout repetition), every word loaded at the start.
    RPT: gl.constexpr = BLOCK_N // WR
    QT: gl.constexpr = NCH * 32 * WQ
    L3: gl.constexpr = gl.BlockedLayout([RPT, 1, 4], [1, 32, 1], [WR, WQ, 1], [2, 0, 1])
    LS: gl.constexpr = gl.SliceLayout(2, L3)
    LX: gl.constexpr = gl.SliceLayout(0, L3)
    row0 = gl.program_id(0) * BLOCK_N
    rows = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    quad = gl.arange(0, QT, layout=gl.SliceLayout(0, LS))
    col = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))
    r3 = gl.expand_dims(gl.expand_dims(rows, 1), 2)
    q3 = gl.expand_dims(gl.expand_dims(quad, 0), 2)
    c3 = gl.expand_dims(gl.expand_dims(col, 0), 0)
    live = (r3 < N) & (q3 < Kw // 4)
    if EVICT == 2:
        words = gl.load(w_ptr + r3 * Kw + q3 * 4 + c3, mask=live, other=0, cache_modifier=".cg",
                        eviction_policy="evict_first")
    elif EVICT == 1:
        words = gl.load(w_ptr + r3 * Kw + q3 * 4 + c3, mask=live, other=0, eviction_policy="evict_first")
    else:
        words = gl.load(w_ptr + r3 * Kw + q3 * 4 + c3, mask=live, other=0)
    s_rows = gl.expand_dims(rows, 1)
    if COMPUTE:
        s0 = _s(s_ptr, 0, quad, 0, s_rows, N, Kw, group_size, QT, SUB)
        s1 = _s(s_ptr, 0, quad, 1, s_rows, N, Kw, group_size, QT, SUB)
        s2 = _s(s_ptr, 0, quad, 2, s_rows, N, Kw, group_size, QT, SUB)
        s3 = _s(s_ptr, 0, quad, 3, s_rows, N, Kw, group_size, QT, SUB)
    if PDL:
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


def gemv_reg(x, w, block_n=8, wr=1, wq=4, pdl=False, compute=True, evict=0):
    """``x @ W.T`` for one fp16 row (symmetric weights, pairs of slices in one group: gemv_tma_ok)."""
    n, kw = w.qweight.shape
    nch = triton.cdiv(kw, 128 * wq)
    y = torch.empty((1, n), device=x.device, dtype=torch.float16)
    _gemv_reg_kernel[(triton.cdiv(n, block_n),)](w.qweight, x.reshape(1, -1), w.scales, y, n, w.in_features, kw,
                                                 w.group_size, BLOCK_N=block_n, WR=wr, WQ=wq, NCH=nch,
                                                 SUB=w.block_k // 8, PDL=pdl, COMPUTE=compute, EVICT=evict,
                                                 num_warps=wr * wq, **launch_kwargs(pdl))
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096")
    ap.add_argument("--configs", default="8:1:4,4:1:4,8:1:2,4:1:2,16:2:4",
                    help="BLOCK_N:WR:WQ launches (comma list); a trailing :e loads the words evict_first, :c also .cg (L2 only)")
    ap.add_argument("--floor", action="store_true", help="also the read floor of each launch and of gemv_tma")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base, ws, x, exact, t_cublas = gemv_baseline(n, k)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
        c16 = graph_time_us(chain([partial(F.linear, weight=w) for w in dense], x, k))
        cdef = graph_time_us(chain([partial(w4a16_matmul, w=w) for w in ws], x, k))
        tdef = graph_time_us([partial(w4a16_matmul, x, w, pdl=False) for w in ws])
        print(f"   default (gemv_tma): alone {tdef:.2f} us ({t_cublas / tdef:.2f}x), chain {cdef:.2f} us "
              f"({c16 / cdef:.2f}x; cuBLAS chain {c16:.2f})", flush=True)
        if args.floor:
            t = graph_time_us([partial(gemv_tma, x, w, pdl=False, compute=False) for w in ws])
            print(f"   gemv_tma read floor: {t:.2f} us", flush=True)
        for spec in args.configs.split(","):
            parts = spec.split(":")
            bn, wr, wq = map(int, parts[:3])
            kw = dict(block_n=bn, wr=wr, wq=wq, evict={"e": 1, "c": 2}.get("".join(parts[3:]), 0))
            try:
                y = gemv_reg(x, base, **kw).float()
                err = float((y - exact).abs().max() / exact.abs().max())
                same = torch.equal(gemv_reg(x, base, pdl=True, **kw), gemv_reg(x, base, **kw))
                tma = torch.equal(gemv_reg(x, base, **kw), gemv_tma(x, base, pdl=False))
                t = graph_time_us([partial(gemv_reg, x, w, **kw) for w in ws])
                tc = graph_time_us(chain([partial(gemv_reg, w=w, pdl=True, **kw) for w in ws], x, k))
                line = (f"   reg {spec}: alone {t:.2f} us ({t_cublas / t:.2f}x), chain {tc:.2f} us ({c16 / tc:.2f}x), "
                        f"rel err {err:.1e}, PDL same bits {same}, gemv_tma's bits {tma}")
                if args.floor:
                    tf = graph_time_us([partial(gemv_reg, x, w, compute=False, **kw) for w in ws])
                    line += f", read floor {tf:.2f} us"
                print(line, flush=True)
            except Exception as e:  # a probe: report and go on
                print(f"   reg {spec}: failed: {type(e).__name__}: {str(e)[:600]}", flush=True)


if __name__ == "__main__":
    main()
