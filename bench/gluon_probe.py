"""Sweep launch configs of the Hopper wgmma kernel (kernels/gluon_w4a16.py) on the Llama-3-8B shapes.

Each config is a Python dict literal of ``gemm_wgmma`` keyword arguments; every config is first
checked against dequantize + cuBLAS on three shapes (failures are printed and dropped), then timed
against cuBLAS fp16 and the default dispatch in one CUDA graph per case (bench/kernels.py's timing).
A value given as a string is a Python expression of the case: ``tiles`` (output tiles at the
config's or the default ``block_m``), ``sms``, ``m``, ``n``, ``k_tiles``.

    python bench/gluon_probe.py "dict()" "dict(programs=264)" "dict(block_m=64, stages=4)"
    python bench/gluon_probe.py "dict(programs='2 * sms', dp='sms')"
"""

import argparse
import ast
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import copies_for, graph_time_us, random_qweight  # noqa: E402
from klaq.kernels import gluon_w4a16  # noqa: E402
from klaq.kernels.gluon_w4a16 import gemm_wgmma  # noqa: E402
from klaq.kernels.triton_w4a16 import dequantize, repack, w4a16_matmul  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)]
CHECKS = [(4096, 4096, 256), (576, 1536, 100), (200, 576, 64)]


def resolve(cfg: dict, w, m: int) -> dict:
    """The config for one case: string values evaluated with the case's tiles, SMs, m, n, k_tiles."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_n = cfg.get("block_n", 64)
    block_m = gluon_w4a16.tokens_per_tile(m, w.out_features, sms, block_n, cfg.get("block_m"))
    names = dict(tiles=triton.cdiv(w.out_features, block_n) * triton.cdiv(m, block_m), sms=sms, m=m, n=w.out_features,
                 k_tiles=w.n_tiles, min=min, max=max)
    return {key: eval(v, {}, names) if isinstance(v, str) else v for key, v in cfg.items()}


def check(n: int, k: int, m: int, cfg: dict) -> float:
    w = repack(random_qweight(n, k), "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x, dequantize(w)).float()
    return ((gemm_wgmma(x, w, **resolve(cfg, w, m)).float() - ref).abs().max() / ref.abs().max()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=["dict()"], help="gemm_wgmma keyword arguments, as dict(...)")
    ap.add_argument("--batches", default="64,128,256")
    args = ap.parse_args()
    configs = []
    for text in args.configs:
        call = ast.parse(text, mode="eval").body
        cfg = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        try:
            for n, k, m in CHECKS:
                t = time.time()
                print(f"check {cfg} {n}x{k} M={m}: max rel err {check(n, k, m, cfg):.2e} ({time.time() - t:.1f} s)")
            configs.append(cfg)
        except Exception as ex:  # a config that does not compile or launch is reported, not fatal
            print(f"check {cfg}: FAILED {type(ex).__name__}: {str(ex)[-1500:]}")
    for n, k in SHAPES:
        ours = [repack(random_qweight(n, k), "cuda") for _ in range(copies_for(n * k // 2))]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = graph_time_us([partial(F.linear, x, w) for w in dense])
            tdef = graph_time_us([partial(w4a16_matmul, x, w) for w in ours])
            line = f"{n}x{k} M={m} cublas {t16:.1f} default {tdef:.1f} ({t16 / tdef:.2f}x)"
            for cfg in configs:
                case = resolve(cfg, ours[0], m)
                tg = graph_time_us([partial(gemm_wgmma, x, w, **case) for w in ours], reps=3)
                line += f" | {case} {tg:.1f} ({t16 / tg:.2f}x)"
            print(line, flush=True)
        del ours, dense


if __name__ == "__main__":
    main()
