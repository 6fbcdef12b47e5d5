"""One-off probe of kernels/gluon_w4a16.py on a Hopper GPU: correctness, then timing."""
import sys, time, traceback
import torch
import torch.nn.functional as F
sys.path.insert(0, "bench")
from kernels import random_qweight, graph_time_us, copies_for
from klaq.kernels.triton_w4a16 import repack, dequantize, w4a16_matmul
from klaq.kernels.gluon_w4a16 import gemm_wgmma

torch.manual_seed(0)
cfgs = [eval(c) for c in sys.argv[1:]] or [dict()]
import os
def check(n, k, m, **cfg):
    w = repack(random_qweight(n, k), "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = F.linear(x, dequantize(w)).float()
    y = gemm_wgmma(x, w, **cfg).float()
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    return err
good = []
for cfg in cfgs:
    good.append(cfg)
    for (n, k, m) in [(4096, 4096, 256), (576, 1536, 100), (200, 576, 64)]:
        try:
            t = time.time(); e = check(n, k, m, **cfg); print(f"check {cfg} {n}x{k} M={m}: rel err {e:.2e} ({time.time()-t:.1f}s)", flush=True)
        except Exception as ex:
            print(f"check {cfg} {n}x{k} M={m}: FAILED {type(ex).__name__}: {str(ex)[-1500:]}", flush=True)
            good.pop()
            break
cfgs = good
if not cfgs: sys.exit(1)
for (n, k) in [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)]:
    qw = random_qweight(n, k)
    ours = [repack(qw, "cuda") for _ in range(copies_for(n * k // 2))]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
    for m in (64, 128, 256):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        t16 = graph_time_us([lambda w=w: F.linear(x, w) for w in dense])
        tdq = graph_time_us([lambda w=w: w4a16_matmul(x, w) for w in ours])
        line = f"{n}x{k} M={m} cublas {t16:.1f} default {tdq:.1f} ({t16/tdq:.2f}x)"
        for cfg in cfgs:
            try:
                tg = graph_time_us([lambda w=w: gemm_wgmma(x, w, **cfg) for w in ours], reps=3)
                line += f" | {cfg} {tg:.1f} ({t16/tg:.2f}x)"
            except Exception as ex:
                line += f" | {cfg} FAIL {type(ex).__name__}"
        print(line, flush=True)
    del ours, dense
