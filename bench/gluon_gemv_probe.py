"""Probe: an M = 1 GEMV in Gluon whose rows live inside each thread (H100; not in the dispatch).

    python bench/gluon_gemv_probe.py            # on a Hopper GPU (Gluon has no interpreter)

Why: ``gemv_h2`` (triton_w4a16.py) takes 7.0 us at 4096x4096 against a 4.64 us read floor, and
probes put x's loads (8 ``convert_layout`` s through shared memory per step: x's load layout is not
the words') and the scale loads as the largest costs above it. Triton picks the layouts; here the
program does: each thread holds ``BLOCK_N`` rows x one quad of 4 consecutive words, so

* the x pairs a quad meets are loaded once per thread (8-byte loads) and broadcast over the rows
  in registers (the row dimension is inside the thread: no conversion, no shared memory);
* a row-block's scales are contiguous in the ``[G, N]`` layout: one 16-byte load per pair gives 8
  rows' scales;
* the 4 words of a quad share a pair's scale, so the symmetric half2 column sum of gemv_h2
  (``_colsum_ptx``) applies to the quad as it sits in registers (inline asm with ``pack=4``).

Symmetric weights, fp16 x, 2 * SUB dividing the group size (the Llama-3-8B shapes at g128). Times
are CUDA-graph medians over enough weight copies to exceed L2, like bench/kernels.py.
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

sys.path.insert(0, str(Path(__file__).parent))
from kernels import gemv_baseline, graph_time_us  # noqa: E402
from klaq.kernels.gluon_gemv import _C4_EVEN, _C4_ODD, _CONS, _SUM, _half2  # noqa: E402  (the quad column sum)


@gluon.jit
def _gemv_rows_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, Kw, group_size, BLOCK_N: gl.constexpr,
                      SUB: gl.constexpr, SLOT0: gl.constexpr, num_warps: gl.constexpr):
    Q: gl.constexpr = 32 * num_warps  # quads (4 words) per step and row
    L3: gl.constexpr = gl.BlockedLayout([BLOCK_N, 1, 4], [1, 32, 1], [1, num_warps, 1], [2, 0, 1])
    LS: gl.constexpr = gl.SliceLayout(2, L3)  # [BLOCK_N, Q]: one value per row and quad
    LX: gl.constexpr = gl.SliceLayout(0, L3)  # [Q, 4]: x, shared by the rows
    pid = gl.program_id(0)
    rows_raw = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    rows = gl.minimum(rows_raw, N - 1)
    quad_s = gl.arange(0, Q, layout=gl.SliceLayout(0, LS))
    quad_x = gl.arange(0, Q, layout=gl.SliceLayout(1, LX))
    c_x = gl.arange(0, 4, layout=gl.SliceLayout(0, LX))
    r3 = gl.expand_dims(gl.expand_dims(rows, 1), 2)
    q3 = gl.expand_dims(gl.expand_dims(quad_s, 0), 2)
    c3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
    zero = gl.zeros([BLOCK_N, Q, 4], gl.int32, layout=L3)
    acc = gl.zeros([BLOCK_N, Q], gl.float32, layout=LS)
    for q0 in range(0, Kw // 4, Q):
        wi = (q0 + q3) * 4 + c3  # word index in the row
        words = gl.load(w_ptr + r3 * Kw + wi, mask=wi < Kw, other=0)
        # x: word wi of tile t = wi // SUB meets codes t * 8 * SUB + i * SUB + wi % SUB
        wx = (q0 + gl.expand_dims(quad_x, 1)) * 4 + gl.expand_dims(c_x, 0)
        kx = (wx // SUB) * (8 * SUB) + wx % SUB
        # scales: a quad's tile, pair p's group, BLOCK_N contiguous rows
        ks = ((q0 + quad_s) * 4 // SUB) * (8 * SUB)
        s_rows = gl.expand_dims(rows_raw, 1)  # unclamped (contiguous, so one vector load), masked
        live = gl.expand_dims(q0 + quad_s < Kw // 4, 0)  # quads past the row's words read no scales
        a2 = zero
        for p in gl.static_range(4):
            ka = kx + 2 * p * SUB
            xa = gl.load(x_ptr + ka, mask=ka < K, other=0.0)
            xb = gl.load(x_ptr + ka + SUB, mask=ka + SUB < K, other=0.0)
            x2 = gl.expand_dims(_half2(xa * 0.5, xb * 0.5), 0) + zero
            g = gl.expand_dims((ks + 2 * p * SUB) // group_size, 0)
            s = gl.load(s_ptr + g * N + s_rows, mask=(s_rows < N) & live, other=0.0)
            s2 = gl.expand_dims(_half2(s, s), 2) + zero
            if p < 2:
                v = words
            else:
                v = words >> 8
            if p % 2 == 0:
                a2 = gl.inline_asm_elementwise(_C4_EVEN, _CONS, [v, x2, s2, a2], dtype=gl.int32, is_pure=True,
                                               pack=4)
            else:
                a2 = gl.inline_asm_elementwise(_C4_ODD, _CONS, [v, x2, s2, a2], dtype=gl.int32, is_pure=True,
                                               pack=4)
        if SLOT0:  # the quad's sum sits in slot 0, the other slots are 0: an integer sum picks it
            acc += gl.inline_asm_elementwise(_SUM, "=f,r", [gl.sum(a2, axis=2)], dtype=gl.float32, is_pure=True,
                                             pack=1)
        else:
            acc += gl.sum(gl.inline_asm_elementwise(_SUM, "=f,r", [a2], dtype=gl.float32, is_pure=True, pack=1),
                          axis=2)
    out = gl.sum(acc, axis=1) * 8.0  # weights were (q - 8) / 4, x / 2
    offs = pid * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    gl.store(y_ptr + offs, out.to(gl.float16), mask=offs < N)


def gemv_rows(x, w, block_n: int = 8, num_warps: int = 4, slot0: bool = False):
    assert w.offsets is None and w.group_size % (2 * (w.block_k // 8)) == 0 and x.dtype == torch.float16
    n = w.out_features
    y = torch.empty((1, n), device=x.device, dtype=torch.float16)
    _gemv_rows_kernel[(triton.cdiv(n, block_n),)](x, w.qweight, w.scales, y, n, w.in_features, w.qweight.shape[1],
                                                  w.group_size, BLOCK_N=block_n, SUB=w.block_k // 8,
                                                  SLOT0=slot0, num_warps=num_warps)
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,4096x14336")
    ap.add_argument("--configs", default="8x4,8x2,16x4,4x4,8x4s,8x2s,16x4s,16x2s",
                    help="BLOCK_NxWARPS list; a trailing s: the quad sums picked by an integer sum (SLOT0)")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base, ws, x, exact, t_cublas = gemv_baseline(n, k)
        for cfg in args.configs.split(","):
            bn, nw = map(int, cfg.rstrip("s").split("x"))
            slot0 = cfg.endswith("s")
            try:
                y = gemv_rows(x, base, bn, nw, slot0).float()
                err = float((y - exact).abs().max() / exact.abs().max())
                t = graph_time_us([partial(gemv_rows, x, w, bn, nw, slot0) for w in ws])
                print(f"   rows {cfg} ({bn} rows x {nw} warps{', slot-0 sum' if slot0 else ''}): {t:.2f} us ({t_cublas / t:.2f}x cuBLAS) rel err {err:.1e}",
                      flush=True)
            except Exception as e:  # a probe: report and go on
                print(f"   rows {cfg}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
