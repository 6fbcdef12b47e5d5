"""Where the M = 1 time goes: klaq's gemv_h2 against pure-read kernels of the same geometry.

    python bench/gemv_probe.py            # on a GPU

A read-only kernel over klaq's weight layout (loads the words, XORs them, one plain store per
row: no scales, no x, no arithmetic, no split-K reduction) and a flat streaming read of the same
bytes give the floor a GEMV of that weight can reach in a CUDA graph on this GPU: launch, ramp-up
and DRAM. bench/kernels.py's ratios are against cuBLAS; these say how far from the floor.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from kernels import graph_time_us, random_qweight, weight_copies  # noqa: E402
from klaq.kernels.triton_w4a16 import repack, w4a16_matmul  # noqa: E402


@triton.jit
def _read_tiles(w_ptr, y_ptr, N, Kw, tiles_per_split, n_tiles, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    j = tl.arange(0, SUB)
    w_ptrs = w_ptr + n[:, None] * Kw + j[None, :]
    acc = tl.zeros((BLOCK_N, SUB), dtype=tl.int32)
    t0 = pid_k * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
        acc ^= tl.load(w_ptrs + t * SUB, eviction_policy="evict_first")
    tl.store(y_ptr + pid_k * N + n, tl.xor_sum(acc, axis=1))


@triton.jit
def _read_flat(w_ptr, y_ptr, numel, per_prog, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    start = pid * per_prog
    for o in range(start, start + per_prog, BLOCK):
        acc ^= tl.load(w_ptr + o + offs, mask=o + offs < numel, other=0, eviction_policy="evict_first")
    tl.store(y_ptr + pid, tl.xor_sum(acc, axis=0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,4096x14336")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        base = repack(random_qweight(n, k), "cuda")
        ws = weight_copies(base)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        mb = base.nbytes() / 1e6
        t = graph_time_us([partial(w4a16_matmul, x, w, pdl=False) for w in ws])
        print(f"{n}x{k} {mb:.2f} MB  gemv_h2 (default config) {t:.2f} us  {mb / t * 1e3:.0f} GB/s", flush=True)
        kw = base.qweight.shape[1]
        sub = base.block_k // 8
        y = torch.empty(64 * n, device="cuda", dtype=torch.int32)
        for block_n, split, warps in [(64, 4, 8), (32, 8, 4), (16, 1, 4)]:
            tps = -(-base.n_tiles // split)
            split_r = -(-base.n_tiles // tps)
            grid = (triton.cdiv(n, block_n), split_r)
            fns = [partial(_read_tiles[grid], w.qweight, y, n, kw, tps, base.n_tiles, BLOCK_N=block_n, SUB=sub,
                           num_warps=warps) for w in ws]
            t = graph_time_us(fns)
            print(f"   read_tiles block_n={block_n} split={split_r} warps={warps} programs={grid[0] * grid[1]}"
                  f"  {t:.2f} us  {mb / t * 1e3:.0f} GB/s", flush=True)
        numel = base.qweight.numel()
        for progs, block, warps in [(1056, 1024, 4), (2112, 512, 4)]:
            per = -(-numel // progs)
            per = -(-per // block) * block
            fns = [partial(_read_flat[(progs,)], w.qweight, y, numel, per, BLOCK=block, num_warps=warps) for w in ws]
            t = graph_time_us(fns)
            print(f"   read_flat programs={progs} block={block} warps={warps}  {t:.2f} us  {mb / t * 1e3:.0f} GB/s",
                  flush=True)


if __name__ == "__main__":
    main()
