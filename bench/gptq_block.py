"""GPTQ's arithmetic for one SmolLM2-135M block on the CPU (no calibration forward passes).

    python bench/gptq_block.py            # 2 threads, W4 g64 asymmetric, act-order

The seven linears' shapes (q, k, v, o, gate, up, down) with random weights and Hessians from 2048
random inputs: the time that `gptq_quantize` itself takes per block, whatever the model's forward
passes cost. bench/quality.py times whole rows.
"""
from __future__ import annotations

import argparse
import time

import torch

from klaq.toolchain.algorithms.gptq import KERNELS, gptq_quantize
from klaq.toolchain.algorithms.grid import QuantSpec

SMOLLM2_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernel", choices=KERNELS, default=None, help="column loop (default: numpy on the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    problems = []
    for n, k in SMOLLM2_BLOCK:
        x = torch.randn(2048, k, generator=g)
        problems.append((torch.randn(n, k, generator=g) * 0.05, x.T @ x))
    t = time.perf_counter()
    for w, h in problems:
        gptq_quantize(w, h, QuantSpec(4, 64, False), act_order=True, kernel=args.kernel)
    print(f"one SmolLM2-135M block, GPTQ W4 g64 asym, act-order, {args.threads} threads: "
          f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
