"""Where the wgmma kernel's split-tile cost goes (H100, M = 256): timing-only variants of
kernels/gluon_w4a16.py, and the whole-tile kernel on 1/4, 1/2 and all of 4096 rows (L2 traffic of x).

Variants (results of the non-original ones are wrong; they only time what a part costs):
``direct``: a partial tile stores its sum straight to y (no slots, no counter); ``nofix``: slots
and counter, but no program adds the others' slots.

    python bench/splitk_probe.py
"""

import importlib.util
import sys
from functools import partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
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


for _name, _text in VARIANTS.items():
    if _name != "orig" and _text == SRC:
        raise SystemExit(f"variant {_name!r} no longer matches kernels/gluon_w4a16.py's source: update its replacement")


def load(name, text):
    path = Path(f"/tmp/gv_{name}.py")
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"gv_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def resolve(cfg, n, m, block_n=64):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bn = cfg.get("block_n", block_n)
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, gluon_w4a16.tokens_per_tile(m, n, sms, bn))
    return {k: eval(v, {}, dict(tiles=tiles, sms=sms)) if isinstance(v, str) else v for k, v in cfg.items()}


def stats(mod):
    for cache in mod._gemm_wgmma_kernel.device_caches.values():
        for kern in cache[0].values():
            c = {k: v for k, v in kern.src.constants.items()} if hasattr(kern.src, "constants") else {}
            print(f"  compiled: regs {kern.n_regs} spills {kern.n_spills} shared {kern.metadata.shared} "
                  f"warps {kern.metadata.num_warps} {c if c else ''}", flush=True)


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
        mod = load(name, text)
        line = f"{name}:"
        for cname, cfg in CONFIGS.items():
            case = resolve(cfg, n, m)
            triton_w4a16._WORKSPACES.clear()
            mod._SLOTS.clear()
            t = graph_time_us([partial(mod.gemm_wgmma, x, w, **case) for w in ws])
            line += f" | {cname} {case} {t:.1f} us"
        print(line, flush=True)
        stats(mod)
        triton_w4a16._WORKSPACES.clear()


if __name__ == "__main__":
    main()
