"""Probe: the tensor-core M = 1 GEMV (``gemv_mma``, kernels/gluon_gemv_mma.py) against the dispatch's
default and cuBLAS, alone and as a dependent PDL chain (as in a decode step).

    python bench/mma_gemv_probe.py [--shapes 4096x4096,...] [--warps 8,4]   # on an sm_80+ GPU

Why: the other GEMVs spend about 1.6 instructions per weight on arithmetic and their last programs'
arithmetic lands after the read floor; ``gemv_mma`` turns a pair of codes into an MMA operand with one
LOP3 and loads its words with plain 16-byte loads, all before the PDL wait. Result (raw:
bench/results/mma_gemv_probe_h100.txt, whose runs 3-4 used the variants of dd3f2c1): exact, slower than
the default; its read floor is the gap (6.9 us at 4096x4096 against gemv_tma's 5.3).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import chain, chain_baseline, gemv_baseline, graph_time_us  # noqa: E402
from klaq.kernels.gluon_gemv import gemv_tma  # noqa: E402
from klaq.kernels.gluon_gemv_mma import gemv_mma  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,4096x14336")
    ap.add_argument("--warps", default="8,4", help="warps per program to try (comma list)")
    ap.add_argument("--floor", action="store_true", help="also time the same loads without arithmetic (the read "
                    "floor), and gemv_tma's read floor")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base, ws, x, exact, t_cublas = gemv_baseline(n, k)
        c16, cdef = chain_baseline(n, k, x, ws)
        print(f"   chain: cuBLAS {c16:.2f} us, default {cdef:.2f} us ({c16 / cdef:.2f}x)", flush=True)
        if args.floor:
            t = graph_time_us([partial(gemv_tma, x, w, pdl=False, compute=False) for w in ws])
            print(f"   gemv_tma read floor (config_for's launch): {t:.2f} us", flush=True)
        for warps in map(int, args.warps.split(",")):
            name = f"mma {warps} warps"
            try:
                y = gemv_mma(x, base, pdl=False, warps=warps).float()
                err = float((y - exact).abs().max() / exact.abs().max())
                same = torch.equal(gemv_mma(x, base, pdl=True, warps=warps), gemv_mma(x, base, pdl=False, warps=warps))
                t = graph_time_us([partial(gemv_mma, x, w, pdl=False, warps=warps) for w in ws])
                tc = graph_time_us(chain([partial(gemv_mma, w=w, pdl=True, warps=warps) for w in ws], x, k))
                print(f"   {name}: alone {t:.2f} us ({t_cublas / t:.2f}x cuBLAS), chain {tc:.2f} us "
                      f"({c16 / tc:.2f}x), rel err {err:.1e}, PDL same bits {same}", flush=True)
                if args.floor:
                    t = graph_time_us([partial(gemv_mma, x, w, pdl=False, warps=warps, floor=True) for w in ws])
                    print(f"   {name} read floor: {t:.2f} us", flush=True)
            except Exception as e:  # a probe: report and go on
                print(f"   {name}: failed: {type(e).__name__}: {str(e)[:600]}", flush=True)


if __name__ == "__main__":
    main()
