"""The cluster-split 128 x 256 GEMM (kernels/gluon_w4a16_cluster.py) against the dispatch's kernel and cuBLAS fp16.

    python bench/cluster_probe.py [--batches 256,512] [--shapes 6144x4096] [--plans 8:3,4:2]

First checks ``gemm_cluster`` against dequantize + cuBLAS at each shape's default plan and at each plan given
(the same bits again), then times cuBLAS fp16, the dispatch's M > 16 kernel (``gemm_prefill``: gluon_w4a16's
or the tall kernel), the tall kernel one tile per program, and ``gemm_cluster`` at its default plan and at each
plan given (CTAS:PER), each in one CUDA graph over enough weight copies to exceed L2 (bench/kernels.py's method).
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import LLAMA3_8B, copies_for, graph_time_us, random_qweight  # noqa: E402
from klaq.kernels.gluon_w4a16 import gemm_prefill  # noqa: E402
from klaq.kernels.gluon_w4a16_cluster import BLOCK_N, TOKENS, best_plan, gemm_cluster  # noqa: E402
from klaq.kernels.gluon_w4a16_tall import gemm_tall  # noqa: E402
from klaq.kernels.triton_w4a16 import dequantize, repack  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="256,512")
    ap.add_argument("--shapes", default=None, help="NxK,... (default: the Llama-3-8B shapes)")
    ap.add_argument("--plans", default="", help="CTAS:PER,... timed beside the default plan")
    ap.add_argument("--stages", type=int, default=6)
    args = ap.parse_args()
    plans = [tuple(map(int, p.split(":"))) for p in args.plans.split(",") if p]
    shapes = [tuple(map(int, t.split('x'))) for t in args.shapes.split(',')] if args.shapes else LLAMA3_8B
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    for n, k in shapes:
        ours = [repack(random_qweight(n, k), "cuda") for _ in range(copies_for(n * k // 2))]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
        w = ours[0]
        ref_w = dequantize(w)
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            tiles = triton.cdiv(n, BLOCK_N) * triton.cdiv(m, TOKENS)
            default = best_plan(tiles, w.n_tiles, sms)
            cases = [dict(stages=args.stages)] + [dict(ctas=c, per=p, stages=args.stages) for c, p in plans
                                                  if p * w.n_tiles >= c and p <= c]
            ref = F.linear(x, ref_w).float()
            for cfg in cases:
                y = gemm_cluster(x, w, **cfg)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                again = torch.equal(y, gemm_cluster(x, w, **cfg))
                print(f"check {n}x{k} M={m} {cfg}: rel err {err:.2e} same bits again {again}", flush=True)
            t16 = graph_time_us([partial(F.linear, x, d) for d in dense])
            tp = graph_time_us([partial(gemm_prefill, x, q) for q in ours])
            tt = graph_time_us([partial(gemm_tall, x, q) for q in ours])
            line = (f"{n}x{k} M={m} ({tiles} tiles, {w.n_tiles} K-tiles, default plan {default}) cublas {t16:.1f}"
                    f" dispatch {tp:.1f} ({t16 / tp:.2f}x) tall {tt:.1f} ({t16 / tt:.2f}x)")
            for cfg in cases:
                t = graph_time_us([partial(gemm_cluster, x, q, **cfg) for q in ours])
                name = f"{cfg['ctas']}:{cfg['per']}" if "ctas" in cfg else "default"
                line += f" | cluster {name} {t:.1f} ({t16 / t:.2f}x)"
            print(line, flush=True)
        del ours, dense


if __name__ == "__main__":
    main()
