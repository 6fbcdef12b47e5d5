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

The kernel is kernels/gluon_gemv.py's (``COMPUTE=False`` for ``--floor``), since 2026-12-06 in the
dispatch as ``gemv_tma`` (K < 8192). A config's fifth field caps the registers per
thread (``maxnreg``), so more programs fit beside the previous kernel's (slower where measured).

First result (H100, bench/results/tma_gemv_probe_h100.txt): exact (rel err
5-6e-4, as gemv_h2) but slower than gemv_h2 on every shape (best 7.05 / 8.24 / 15.15 / 21.29 us
against 6.67 / 8.02 / 14.81 / 16.34), and its read floor is no lower than the plain loads' (5.1-5.4
us at 4096x4096 against 4.6-4.7): TMA does not lift the floor. Only ``--pdl`` (the next call's TMA
issued before ``griddepcontrol.wait``, so back-to-back calls overlap) goes below it: 4.97 us
(3.40x cuBLAS) at 4096x4096 with 8:1:4, 2.82x and 2.95x on the other two large shapes. A second
run over smaller programs (bench/results/tma_gemv_probe_small_h100.txt): 8:1:4 still the best with
PDL, 3.18x / 2.85x / 3.14x. Third (bench/results/kernels_h100_rb.md): several row blocks per program
(RB) and the first tile's scales loaded before the PDL wait (the default since; LATE 1 undoes it):
early scales 4.67 / 8.03 / 14.37 us with PDL against 5.17 / 7.79 / 14.66 late, and without PDL
6.18 / 8.26 / 15.02 against 6.77 / 9.00 / 15.94 (gemv_h2 6.66 / 8.36 / 15.14); 4-row x 2 programs
the best at 6144x4096 only (7.34 us, 3.09x), hence gluon_gemv.config_for.

The probe calls ``gemv_tma`` itself, with the launch given in full (never config_for's choice).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import gemv_baseline, graph_time_us  # noqa: E402
from klaq.kernels.gluon_gemv import gemv_tma, stages_for, tile_bytes  # noqa: E402

PROBE_SMEM = 200 * 1024  # the probe lets a program's ring take more than the dispatch's MAX_SMEM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,4096x14336")
    ap.add_argument("--configs", default="32:4:1,16:2:2,16:4:1,8:1:4,8:2:2,8:1:2,16:1:4,32:4:2,16:2:4",
                    help="BLOCK_N:WR:WQ[:STAGES[:MAXNREG[:RB[:LATE]]]] list (warps = WR * WQ; a chunk is 128 * WQ "
                    "words per row; STAGES 0: all tiles; MAXNREG: a register cap per thread, 0 for none; RB: row "
                    "blocks per program, 1 if left out; LATE 1: the first tile's scales after the PDL wait)")
    ap.add_argument("--floor", action="store_true", help="also time each config without arithmetic")
    ap.add_argument("--pdl", action="store_true", help="also time each config with programmatic dependent launch "
                    "(words loaded before griddepcontrol.wait, so back-to-back calls overlap)")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base, ws, x, exact, t_cublas = gemv_baseline(n, k)
        for cfg in args.configs.split(","):
            parts = list(map(int, cfg.split(":"))) + [0] * 4
            bn, wr, wq, stages, maxnreg, rb, late = parts[:7]
            rb = rb or 1
            kw = base.qweight.shape[1]
            st = stages_for(kw, bn, wq, stages or None, rb, PROBE_SMEM)
            kb = st * tile_bytes(bn, wq) // 1024
            opts = dict(block_n=bn, wr=wr, wq=wq, stages=stages or None, rb=rb, maxnreg=maxnreg or None,
                        max_smem=PROBE_SMEM, early_scales=not late)
            modes = [(True, False)] + [(False, False)] * args.floor + [(True, True)] * args.pdl
            for compute, pdl in modes:
                try:
                    y = gemv_tma(x, base, compute=compute, pdl=pdl, **opts).float()
                    err = float((y - exact).abs().max() / exact.abs().max()) if compute else float("nan")
                    t = graph_time_us([partial(gemv_tma, x, w, compute=compute, pdl=pdl, **opts) for w in ws])
                    what = ("gemv" if compute else "read floor") + (", PDL" if pdl else "")
                    print(f"   tma {cfg} ({what}, {st} stages, {kb} KB): {t:.2f} us "
                          f"({t_cublas / t:.2f}x cuBLAS) rel err {err:.1e}", flush=True)
                except Exception as e:  # a probe: report and go on
                    print(f"   tma {cfg}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
