"""M = 1 launch configs under programmatic dependent launch: a dependent chain of GEMVs (each x the
previous call's output, as in a decode step), timed with PDL and the L2 prefetch on and off.

    python bench/pdl_sweep.py                       # H100/H200; the Llama-3-8B shapes
    python bench/pdl_sweep.py --shapes 4096x4096 --configs "[dict(block_n=8, tiles=2)]"

Why a separate sweep: without PDL a GEMV's fixed cost (launch, first DRAM round trip, tail) follows
the previous kernel; with it that cost overlaps the previous kernel, so the config that was best
alone (bench/kernel_sweep.py) need not be best in the chain. Each line: config, time per call
alone (no PDL), then in the chain: without PDL, with PDL, with PDL and gemv_h2's first step of
words and scales loaded before the wait (``early``), with PDL and the L2 prefetch, and the same with
the next kernel let in only after the main loop (``pdl_late``); cuBLAS's chain first.
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kernels import chain, dense_copies, graph_time_us, random_qweight, weight_copies  # noqa: E402
from klaq.kernels.triton_w4a16 import default_config, repack, w4a16_matmul  # noqa: E402

CONFIGS = [dict(block_n=bn, tiles=t, split=s) for bn, t, s in
           [(8, 2, 1), (8, 4, 1), (16, 2, 1), (16, 4, 1), (32, 2, 1), (8, 1, 1), (32, 2, 2)]]


MODES = {"chain": dict(pdl=False), "PDL": dict(pdl=True),
         "PDL + early words": dict(pdl=True, early=True),
         "PDL + prefetch": dict(pdl=True, prefetch=True),
         "PDL + prefetch, late trigger": dict(pdl=True, prefetch=True, pdl_late=True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,4096x14336")
    ap.add_argument("--configs", help="a Python list of w4a16_matmul keyword dicts (default: CONFIGS)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    args = ap.parse_args()
    configs = ast.literal_eval(args.configs) if args.configs else CONFIGS
    modes = {name: MODES[name] for name in args.modes.split(",")}
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base = repack(random_qweight(n, k), "cuda")
        ws = weight_copies(base)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        dense = dense_copies(w16)
        t16 = graph_time_us([partial(F.linear, x, w) for w in dense])
        t16c = graph_time_us(chain([partial(F.linear, weight=w) for w in dense], x, k))
        dep = "dependent" if n >= k else "same x"
        print(f"{n}x{k}: cuBLAS alone {t16:.2f} us, chain ({dep}) {t16c:.2f} us; default {default_config(1, n, k)}",
              flush=True)
        for cfg in [{}] + configs:
            try:
                alone = graph_time_us([partial(w4a16_matmul, x, w, pdl=False, **cfg) for w in ws])
                times = [graph_time_us(chain([partial(w4a16_matmul, w=w, **{**cfg, **mode}) for w in ws], x, k))
                         for mode in modes.values()]
            except Exception as e:  # a config past the resource limits
                print(f"   {cfg}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            cols = " | ".join(f"{name} {t:.2f} ({t16c / t:.2f}x)" for name, t in zip(modes, times, strict=True))
            print(f"   {cfg or 'default'}: alone {alone:.2f} us ({t16 / alone:.2f}x) | {cols}", flush=True)


if __name__ == "__main__":
    main()
