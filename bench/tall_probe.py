"""The 128 x 256 Hopper GEMM (kernels/gluon_w4a16_tall.py) against the wgmma kernel and cuBLAS fp16.

    python bench/tall_probe.py [--batches 256,512,1024] [--shapes 14336x4096] ["dict(programs='tiles', dp='tiles')" ...]

First checks ``gemm_tall`` against dequantize + cuBLAS (symmetric and zero points, groups 64 / 128,
ragged K and N, partial token blocks; the same bits again), then times cuBLAS fp16, ``gemm_wgmma``
(gluon_w4a16.py) and ``gemm_tall`` at its default launch and at each config given (a dict of
``gemm_tall`` keyword arguments; string values are expressions of ``tiles``, ``sms``, ``k_tiles``),
each in one CUDA graph over enough weight copies to exceed L2 (bench/kernels.py's method).
"""

import argparse
import ast
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import LLAMA3_8B, copies_for, graph_time_us, random_qweight  # noqa: E402
from klaq.kernels.gluon_w4a16 import gemm_wgmma  # noqa: E402
from klaq.kernels.gluon_w4a16_tall import BLOCK_N, TOKENS, gemm_tall  # noqa: E402
from klaq.kernels.triton_w4a16 import dequantize, repack  # noqa: E402

# (N, K, M, group, zero points)
CHECKS = [(4096, 4096, 256, 128, False), (4096, 4096, 256, 128, True), (576, 1536, 300, 64, True),
          (200, 576, 129, 128, False), (1000, 4096 + 64, 513, 64, False), (6144, 4096, 256, 128, False)]


def resolve(cfg: dict, w, m: int) -> dict:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    names = dict(tiles=triton.cdiv(w.out_features, BLOCK_N) * triton.cdiv(m, TOKENS), sms=sms, k_tiles=w.n_tiles,
                 min=min, max=max)
    return {key: eval(v, {}, names) if isinstance(v, str) else v for key, v in cfg.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="gemm_tall keyword arguments, as dict(...)")
    ap.add_argument("--batches", default="128,192,256,512")
    ap.add_argument("--shapes", default=None, help="NxK,... (default: the Llama-3-8B shapes)")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    configs = [{kw.arg: ast.literal_eval(kw.value) for kw in ast.parse(t, mode="eval").body.keywords}
               for t in args.configs]
    if not args.no_check:
        for n, k, m, g, zero in CHECKS:
            qw = random_qweight(n, k, g)
            if zero:
                qw.zeros = np.random.default_rng(1).integers(0, 16, qw.scales.shape, dtype=np.uint8)
            w = repack(qw, "cuda")
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = F.linear(x, dequantize(w)).float()
            for cfg in [{}] + configs:
                y = gemm_tall(x, w, **resolve(cfg, w, m))
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                again = torch.equal(y, gemm_tall(x, w, **resolve(cfg, w, m)))
                print(f"check tall {n}x{k} M={m} g{g} zero={zero} {cfg}: rel err {err:.2e} same bits again {again}",
                      flush=True)
    shapes = [tuple(map(int, t.split('x'))) for t in args.shapes.split(',')] if args.shapes else LLAMA3_8B
    for n, k in shapes:
        ours = [repack(random_qweight(n, k), "cuda") for _ in range(copies_for(n * k // 2))]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = graph_time_us([partial(F.linear, x, w) for w in dense])
            tw = graph_time_us([partial(gemm_wgmma, x, w) for w in ours])
            tt = graph_time_us([partial(gemm_tall, x, w) for w in ours])
            line = (f"{n}x{k} M={m} cublas {t16:.1f} wgmma {tw:.1f} ({t16 / tw:.2f}x)"
                    f" tall {tt:.1f} ({t16 / tt:.2f}x)")
            for cfg in configs:
                case = resolve(cfg, ours[0], m)
                t = graph_time_us([partial(gemm_tall, x, w, **case) for w in ours], reps=3)
                line += f" | {case} {t:.1f} ({t16 / t:.2f}x)"
            print(line, flush=True)
        del ours, dense


if __name__ == "__main__":
    main()
