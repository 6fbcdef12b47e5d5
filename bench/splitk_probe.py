"""Where the wgmma kernel's split-tile cost goes (H100, M = 256): timing-only variants of
kernels/gluon_w4a16.py, and the whole-tile kernel on 1/4, 1/2 and all of 4096 rows (L2 traffic of x).

Variants (results of the non-original ones are wrong; they only time what a part costs):
``direct``: a partial tile stores its sum straight to y (no slots, no counter); ``nofix``: slots
and counter, but no program adds the others' slots.

    python bench/splitk_probe.py
"""

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gluon_probe import resolve  # noqa: E402
from wgmma_ab import load  # noqa: E402

from kernels import copies_for, graph_time_us, random_qweight  # noqa: E402
from klaq.kernels import gluon_w4a16, triton_w4a16  # noqa: E402
from klaq.kernels.triton_w4a16 import repack  # noqa: E402

# variant name -> (text of kernels/gluon_w4a16.py, its replacement); each text occurs there once
# (tests/bench/test_splitk_probe.py checks it)
REPLACEMENTS = {
    "direct": ("if t_end - t_start == n_tiles:", "if True:"),
    "nofix": ("== q1 - q0:", "== -1:"),
}
SRC = Path(gluon_w4a16.__file__).read_text()
VARIANTS = {"orig": SRC, **{name: SRC.replace(old, new) for name, (old, new) in REPLACEMENTS.items()}}
CONFIGS = {
    "whole": dict(),
    "khalves": dict(programs="2*tiles", dp=0),
    "tall_khalves": dict(block_n=128, num_warps=8, programs="2*tiles", dp=0),
    "sk132": dict(programs="sms", dp=0),
}


def stats(mod):
    for cache in mod._gemm_wgmma_kernel.device_caches.values():
        for kern in cache[0].values():
            print(f"  compiled: regs {kern.n_regs} spills {kern.n_spills} shared {kern.metadata.shared} "
                  f"warps {kern.metadata.num_warps} {getattr(kern.src, 'constants', '')}", flush=True)


def main():
    m, k = 256, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    for n in (1024, 2048, 4096):
        ws = [repack(random_qweight(n, k), "cuda") for _ in range(copies_for(n * k // 2))]
        t = graph_time_us([partial(gluon_w4a16.gemm_wgmma, x, w) for w in ws])
        print(f"whole tiles, {n}x{k} M={m}: {t:.1f} us", flush=True)
    n = 4096
    ws = [repack(random_qweight(n, k), "cuda") for _ in range(copies_for(n * k // 2))]
    for name, text in VARIANTS.items():
        path = Path(f"/tmp/gv_{name}.py")
        path.write_text(text)
        mod = load(str(path))
        line = f"{name}:"
        for cname, cfg in CONFIGS.items():
            case = resolve(cfg, ws[0], m)
            triton_w4a16._WORKSPACES.clear()  # fresh zeroed counters: "nofix" leaves them dirty
            mod._SLOTS.clear()
            t = graph_time_us([partial(mod.gemm_wgmma, x, w, **case) for w in ws])
            line += f" | {cname} {case} {t:.1f} us"
        print(line, flush=True)
        stats(mod)


if __name__ == "__main__":
    main()
