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
dispatch as ``gemv_tma`` (with PDL, K < 8192). A config's fifth field caps the registers per
thread (``maxnreg``), so more programs fit beside the previous kernel's (slower where measured).

First result (H100, bench/results/tma_gemv_probe_h100.txt): exact (rel err
5-6e-4, as gemv_h2) but slower than gemv_h2 on every shape (best 7.05 / 8.24 / 15.15 / 21.29 us
against 6.67 / 8.02 / 14.81 / 16.34), and its read floor is no lower than the plain loads' (5.1-5.4
us at 4096x4096 against 4.6-4.7): TMA does not lift the floor. Only ``--pdl`` (the next call's TMA
issued before ``griddepcontrol.wait``, so back-to-back calls overlap) goes below it: 4.97 us
(3.40x cuBLAS) at 4096x4096 with 8:1:4, 2.82x and 2.95x on the other two large shapes. A second
run over smaller programs (bench/results/tma_gemv_probe_small_h100.txt): 8:1:4 still the best with
PDL, 3.18x / 2.85x / 3.14x.
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
from klaq.kernels.gluon_gemv import _descriptor, _gemv_tma_kernel  # noqa: E402  (the kernel, with its read-floor mode)


class TmaGemv:
    """A weight's TMA descriptor for one launch config (built once, like a repack)."""

    def __init__(self, w, block_n: int, wr: int, wq: int, stages: int | None = None, compute: bool = True,
                 pdl: bool = False, maxnreg: int | None = None):
        assert w.offsets is None and w.group_size % (2 * (w.block_k // 8)) == 0
        self.w, self.block_n, self.wr, self.wq, self.compute, self.pdl = w, block_n, wr, wq, compute, pdl
        self.regs = {"maxnreg": maxnreg} if maxnreg else {}
        n, kw = w.qweight.shape
        q = 32 * wq
        chunks = triton.cdiv(kw, 4 * q)
        self.stages = stages or chunks
        self.desc = _descriptor(w, block_n, min(4 * q, 256))
        self.smem = self.stages * block_n * q * 16

    def __call__(self, x):
        w = self.w
        n = w.out_features
        y = torch.empty((1, n), device=x.device, dtype=torch.float16)
        _gemv_tma_kernel[(triton.cdiv(n, self.block_n),)](
            self.desc, x, w.scales, y, n, w.in_features, w.qweight.shape[1], w.group_size, BLOCK_N=self.block_n,
            WR=self.wr, WQ=self.wq, SUB=w.block_k // 8, STAGES=self.stages, COMPUTE=self.compute,
            PDL=self.pdl, num_warps=self.wr * self.wq, launch_pdl=self.pdl, **self.regs)
        return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,4096x14336")
    ap.add_argument("--configs", default="32:4:1,16:2:2,16:4:1,8:1:4,8:2:2,8:1:2,16:1:4,32:4:2,16:2:4",
                    help="BLOCK_N:WR:WQ[:STAGES[:MAXNREG]] list (warps = WR * WQ; a chunk is 128 * WQ words per "
                    "row; STAGES 0: all chunks; MAXNREG: a register cap per thread, 0 for none)")
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
            stages = parts[3] if len(parts) > 3 and parts[3] else None
            maxnreg = parts[4] if len(parts) > 4 and parts[4] else None
            modes = [(True, False)] + [(False, False)] * args.floor + [(True, True)] * args.pdl
            for compute, pdl in modes:
                try:
                    g0 = TmaGemv(base, bn, wr, wq, stages, compute, pdl, maxnreg)
                    if g0.smem > 200 * 1024:
                        print(f"   tma {cfg}: skipped ({g0.smem // 1024} KB of shared memory)")
                        break
                    y = g0(x).float()
                    err = float((y - exact).abs().max() / exact.abs().max()) if compute else float("nan")
                    fns = [TmaGemv(w, bn, wr, wq, stages, compute, pdl, maxnreg) for w in ws]
                    t = graph_time_us(fns_x := [partial(f, x) for f in fns])
                    del fns_x
                    what = ("gemv" if compute else "read floor") + (", PDL" if pdl else "")
                    print(f"   tma {cfg} ({what}, {g0.stages} stages, {g0.smem // 1024} KB): {t:.2f} us "
                          f"({t_cublas / t:.2f}x cuBLAS) rel err {err:.1e}", flush=True)
                except Exception as e:  # a probe: report and go on
                    print(f"   tma {cfg}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
    main()
