"""A/B of two versions of the Hopper wgmma kernel module at their default launch, against cuBLAS fp16.

    git show HEAD~1:kernels/gluon_w4a16.py > /tmp/old.py
    python bench/wgmma_ab.py /tmp/old.py --batches 64,128,256 --group 128 [/tmp/variant.py ...]

Prints one line per shape and batch: cuBLAS, then ``old`` (the file given), ``new`` (the installed
kernels/gluon_w4a16.py) and any further variant files, each timed in one CUDA graph over enough weight
copies to exceed L2 (bench/kernels.py's method), with its max relative error against dequantize + cuBLAS.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kernels import LLAMA3_8B, copies_for, graph_time_us, load_module, random_qweight  # noqa: E402
from klaq.kernels import gluon_w4a16  # noqa: E402
from klaq.kernels.triton_w4a16 import dequantize, repack  # noqa: E402


def load(path: str):
    return load_module(path, "wgmma_" + Path(path).stem)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="the version to compare against (a copy of kernels/gluon_w4a16.py)")
    ap.add_argument("variants", nargs="*", help="more versions to time beside it")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    mods = {"old": load(args.old), "new": gluon_w4a16}
    mods.update({Path(v).stem: load(v) for v in args.variants})
    for n, k in LLAMA3_8B:
        ours = [repack(random_qweight(n, k, args.group), "cuda") for _ in range(copies_for(n * k // 2))]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = F.linear(x, dequantize(ours[0])).float()
            t16 = graph_time_us([partial(F.linear, x, w) for w in dense])
            line = f"{n}x{k} g{args.group} M={m} cublas {t16:.1f}"
            for name, mod in mods.items():
                err = ((mod.gemm_wgmma(x, ours[0]).float() - ref).abs().max() / ref.abs().max()).item()
                t = graph_time_us([partial(mod.gemm_wgmma, x, w) for w in ours])
                line += f" | {name} {t:.1f} ({t16 / t:.2f}x, err {err:.1e})"
            print(line, flush=True)
        del ours, dense


if __name__ == "__main__":
    main()
