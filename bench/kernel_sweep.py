"""Search launch configs of the Triton W4A16 kernels per (shape, M); writes JSON lines.

    python bench/kernel_sweep.py --out sweep.jsonl                 # M = 1, 16, 64, 256
    python bench/kernel_sweep.py --batches 1 --shapes smollm --block-k 128,512

Same timing method as bench/kernels.py (weights cycled past L2, CUDA-graph replay). Each line holds
the shape, M, repack tile ``block_k``, config, time in microseconds and cuBLAS fp16's time, so the
winners can be read into :func:`klaq.kernels.triton_w4a16.default_config`.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kernels import LLAMA3_8B, SMOLLM2, dense_copies, graph_time_us, random_qweight, weight_copies  # noqa: E402
from klaq.kernels.triton_w4a16 import repack, w4a16_matmul  # noqa: E402


def configs(m: int):
    """A short grid per batch size (compiles dominate a sweep's time)."""
    if m == 1:
        for bn, tiles, split, warps in itertools.product([4, 8, 16, 32], [1, 2, 4], [1, 2, 4], [4, 8]):
            if bn * tiles <= 64 and not (bn <= 4 and warps == 8):
                yield dict(kernel="gemv_wide", block_n=bn, tiles=tiles, split=split, num_warps=warps, num_stages=1)
        for bn, split in itertools.product([16, 32, 64], [1, 2, 4]):
            yield dict(kernel="gemv", block_m=1, block_n=bn, split=split, num_warps=4, num_stages=1)
        for bn, tiles, warps, split in itertools.product([4, 8, 16, 32], [1, 2, 4, 8, 16], [2, 4, 8], [1, 2, 4]):
            # 16-128 words of K per row block, >= 4 words per thread, split-K only with short steps
            if 16 <= bn * tiles <= 128 and bn * tiles * 2 >= warps * 4 and not (split > 1 and tiles > 4):
                yield dict(kernel="gemv_h2", block_n=bn, tiles=tiles, split=split, num_warps=warps, num_stages=1)
        return
    if m <= 16:
        for bn, split, stages in itertools.product([32, 64], [2, 4, 8], [2, 3, 4]):
            yield dict(kernel="gemm", block_m=16, block_n=bn, split=split, num_warps=4, num_stages=stages)
        for bn, split, stages in itertools.product([64, 128], [2, 4], [3, 4]):
            yield dict(kernel="gemm_swap", block_m=16, block_n=bn, split=split, num_warps=4, num_stages=stages)
        return
    bms = [32, 64] if m <= 64 else [64, 128]
    splits = [2, 4] if m <= 64 else [1, 2]
    for bm, bn, split, warps, stages in itertools.product(bms, [64, 128, 256], splits, [4, 8], [3, 4]):
        if bm * bn <= 64 * 128 or warps == 8:
            yield dict(kernel="gemm_swap", block_m=bm, block_n=bn, split=split, num_warps=warps, num_stages=stages)
            yield dict(kernel="gemm", block_m=bm, block_n=bn, split=split, num_warps=warps, num_stages=stages)
    yield dict(kernel="dequant")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--shapes", default="all", choices=["all", "llama", "smollm"])
    ap.add_argument("--block-k", default="128,512", help="repack tiles to try")
    ap.add_argument("--kernels", help="only these kernels, comma-separated (default: all)")
    ap.add_argument("--configs", help="a Python list of config dicts to time instead of the grid, "
                    "e.g. \"[{'kernel': 'gemv_h2', 'block_n': 8, 'tiles': 8, 's_ahead': True}]\"")
    args = ap.parse_args()
    listed = None if args.configs is None else ast.literal_eval(args.configs)
    only = set(args.kernels.split(",")) if args.kernels else None
    shapes = {"all": LLAMA3_8B + SMOLLM2, "llama": LLAMA3_8B, "smollm": SMOLLM2}[args.shapes]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t_start = time.time()
    with open(args.out, "a") as out:
        for (n, k), bk in itertools.product(shapes, [int(b) for b in args.block_k.split(",")]):
            qw = random_qweight(n, k)
            try:
                base = repack(qw, "cuda", bk)
            except ValueError as e:
                print(f"{n}x{k} bk={bk}: {e}")
                continue
            w16 = torch.from_numpy(qw.dequantize()).half().cuda()
            ours = weight_copies(base)
            dense = dense_copies(w16)
            for m in [int(b) for b in args.batches.split(",")]:
                if m > 1 and (n, k) in SMOLLM2:
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = F.linear(x, w16).float()
                t16 = graph_time_us([partial(F.linear, x, w) for w in dense])
                best = None
                grid = listed if listed is not None else configs(m)
                for cfg in [{}] + [c for c in grid if only is None or c["kernel"] in only]:
                    try:
                        err = ((w4a16_matmul(x, base, **cfg).float() - ref).norm() / ref.norm()).item()
                        t = graph_time_us([partial(w4a16_matmul, x, w, **{"pdl": False, **cfg}) for w in ours], reps=3)
                    except Exception as e:  # resource limits of a config
                        print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                        continue
                    row = dict(n=n, k=k, m=m, block_k=bk, cfg=cfg or "default", us=t, cublas_us=t16, err=err)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    if best is None or t < best["us"]:
                        best = row
                print(f"{n}x{k} bk={bk} M={m}: cuBLAS {t16:.1f} us; best {best['us']:.1f} us "
                      f"({t16 / best['us']:.2f}x) {best['cfg']} err {best['err']:.1e} [{time.time() - t_start:.0f} s]",
                      flush=True)


if __name__ == "__main__":
    main()
