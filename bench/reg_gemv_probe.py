"""Probe: the register-load M = 1 GEMV (``gemv_reg``, kernels/gluon_gemv.py) at several launches, alone and
as a dependent PDL chain, with its read floor, against the dispatch's default, ``gemv_tma`` and cuBLAS.

    python bench/reg_gemv_probe.py [--shapes 4096x4096,...] [--configs 4:1:4,4:4:1] [--floor]   # Hopper

Why: at 4096x4096 the M = 1 target needs about 5.5 us alone. ``gemv_tma``'s read floor (TMA, no
arithmetic) is 5.3 us, while flat plain loads of the same bytes read in 4.6 (bench/gemv_probe.py), and the
register-load GEMVs tried so far (``gemv_h2`` in Triton, ``gemv_mma``'s 16-row programs) read slower than
both. This kernel keeps ``gemv_tma``'s geometry and arithmetic exactly (``BLOCK_N / WR`` rows x one quad
of 4 words per thread, gluon_gemv's ``_colsum``) but each program loads its whole row range with one
16-byte load per row and quad, all issued at its start (before the PDL wait), so the loads are the only
difference: if its floor is the flat read's, the ~0.9 us of arithmetic over the floor fits the target.
It did, once every load was written before the arithmetic (bench/results/reg_gemv_probe_h100.txt; the
probe's own kernel with its load variants, x at each pair's turn and words without evict-first, is in
commit 781f1f7), and ``gemv_reg`` is now the dispatch's M = 1 kernel on Hopper.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import chain, chain_baseline, gemv_baseline, graph_time_us, load_module  # noqa: E402
from klaq.kernels import gluon_gemv  # noqa: E402
from klaq.kernels.gluon_gemv import gemv_reg, gemv_tma  # noqa: E402
from klaq.kernels.triton_w4a16 import w4a16_matmul  # noqa: E402

# Timing-only copies of kernels/gluon_gemv.py (``--variants``): source edits to gemv_reg's kernel. ``cg``: the
# words loaded .cg (L2 only) instead of evict-first (.cg with evict-first does not assemble, .cs does not build
# in Triton 3.6's Gluon); ``nox`` / ``nos``: no x / no scale loads (wrong sums: what those loads cost).
# Literals only (tests/bench/test_reg_gemv_probe.py reads the table without importing this script).
VARIANTS = {
    "cg": [('eviction_policy="evict_first")', 'cache_modifier=".cg")')],
    # ``l2pf``: the words' load as inline PTX with the 256-byte L2 prefetch-size hint (``.L2::256B``, which
    # Triton's loads do not take): does asking L2 for two lines per miss get the DRAM stream going sooner?
    "l2pf": [("""words = gl.load(w_ptr + r3 * Kw + q3 * 4 + c3, mask=(r3 < N) & (q3 < Kw // 4), other=0,
                    eviction_policy="evict_first")""",
              """wa = (w_ptr + r3 * Kw + q3 * 4 + c3).to(gl.int64, bitcast=True)
    wm = ((r3 < N) & (q3 < Kw // 4)).to(gl.int32) + gl.zeros([BLOCK_N, QT, 4], gl.int32, layout=L3)
    words = gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $8, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0; "
        "@p ld.global.L1::evict_first.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4]; }",
        "=r,=r,=r,=r,l,l,l,l,r,r,r,r", [wa, wm], dtype=gl.int32, is_pure=False, pack=4)""")],
    "nox": [("x0 = _x(x_ptr, 0, quad_x, col, 0, zero, K, QT, SUB)", "x0 = zero"),
            ("x1 = _x(x_ptr, 0, quad_x, col, 1, zero, K, QT, SUB)", "x1 = zero"),
            ("x2 = _x(x_ptr, 0, quad_x, col, 2, zero, K, QT, SUB)", "x2 = zero"),
            ("x3 = _x(x_ptr, 0, quad_x, col, 3, zero, K, QT, SUB)", "x3 = zero")],
    "nos": [("s0 = _s(s_ptr, 0, quad, 0, s_rows, N, Kw, group_size, QT, SUB)",
             "s0 = gl.zeros([BLOCK_N, QT], gl.float16, layout=LS) + 0.01"),
            ("s1 = _s(s_ptr, 0, quad, 1, s_rows, N, Kw, group_size, QT, SUB)",
             "s1 = gl.zeros([BLOCK_N, QT], gl.float16, layout=LS) + 0.01"),
            ("s2 = _s(s_ptr, 0, quad, 2, s_rows, N, Kw, group_size, QT, SUB)",
             "s2 = gl.zeros([BLOCK_N, QT], gl.float16, layout=LS) + 0.01"),
            ("s3 = _s(s_ptr, 0, quad, 3, s_rows, N, Kw, group_size, QT, SUB)",
             "s3 = gl.zeros([BLOCK_N, QT], gl.float16, layout=LS) + 0.01")],
}


def variant_source(name: str, source: str) -> str:
    """``source`` (kernels/gluon_gemv.py) with VARIANTS[name]'s edits, each of which must apply once."""
    for old, new in VARIANTS[name]:
        if source.count(old) != 1:
            raise ValueError(f"variant {name}: {old!r} is not in the kernel once")
        source = source.replace(old, new)
    return source


def variant(name: str):
    """kernels/gluon_gemv.py with VARIANTS[name]'s edits, loaded as a module of its own."""
    source = variant_source(name, Path(gluon_gemv.__file__).read_text())
    path = Path(tempfile.mkdtemp()) / f"gluon_gemv_{name}.py"
    path.write_text(source)
    return load_module(path, f"gluon_gemv_{name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096")
    ap.add_argument("--configs", default="4:1:4,8:1:4,4:1:2,2:1:4",
                    help="BLOCK_N:WR:WQ launches of gemv_reg (comma list)")
    ap.add_argument("--floor", action="store_true", help="also the read floor of each launch and of gemv_tma")
    ap.add_argument("--variants", default="", help=f"timing-only copies at the default launch: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    mods = {name: variant(name) for name in filter(None, args.variants.split(","))}
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base, ws, x, exact, t_cublas = gemv_baseline(n, k)
        c16, cdef = chain_baseline(n, k, x, ws)
        tdef = graph_time_us([partial(w4a16_matmul, x, w, pdl=False) for w in ws])
        print(f"   default: alone {tdef:.2f} us ({t_cublas / tdef:.2f}x), chain {cdef:.2f} us "
              f"({c16 / cdef:.2f}x; cuBLAS chain {c16:.2f})", flush=True)
        tt = graph_time_us([partial(gemv_tma, x, w, pdl=False) for w in ws])
        line = f"   gemv_tma: alone {tt:.2f} us ({t_cublas / tt:.2f}x)"
        if args.floor:
            line += f", read floor {graph_time_us([partial(gemv_tma, x, w, pdl=False, compute=False) for w in ws]):.2f} us"
        print(line, flush=True)
        for spec in args.configs.split(","):
            bn, wr, wq = map(int, spec.split(":"))
            kw = dict(block_n=bn, wr=wr, wq=wq, pdl=False)  # alone: no PDL
            try:
                y = gemv_reg(x, base, **kw)
                err = float((y.float() - exact).abs().max() / exact.abs().max())
                same = torch.equal(gemv_reg(x, base, **{**kw, "pdl": True}), y)
                tma = torch.equal(y, gemv_tma(x, base, pdl=False))
                t = graph_time_us([partial(gemv_reg, x, w, **kw) for w in ws])
                tc = graph_time_us(chain([partial(gemv_reg, w=w, **{**kw, "pdl": True}) for w in ws], x, k))
                line = (f"   reg {spec}: alone {t:.2f} us ({t_cublas / t:.2f}x), chain {tc:.2f} us ({c16 / tc:.2f}x), "
                        f"rel err {err:.1e}, PDL same bits {same}, gemv_tma's bits {tma}")
                if args.floor:
                    tf = graph_time_us([partial(gemv_reg, x, w, compute=False, **kw) for w in ws])
                    line += f", read floor {tf:.2f} us"
                print(line, flush=True)
            except Exception as e:  # a probe: report and go on
                print(f"   reg {spec}: failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
        for name, mod in mods.items():
            try:
                t = graph_time_us([partial(mod.gemv_reg, x, w, pdl=False) for w in ws])
                tc = graph_time_us(chain([partial(mod.gemv_reg, w=w, pdl=True) for w in ws], x, k))
                err = float((mod.gemv_reg(x, base, pdl=False).float() - exact).abs().max() / exact.abs().max())
                print(f"   variant {name}: alone {t:.2f} us ({t_cublas / t:.2f}x), chain {tc:.2f} us ({c16 / tc:.2f}x), "
                      f"rel err {err:.1e}", flush=True)
            except Exception as e:  # a probe: report and go on
                print(f"   variant {name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
