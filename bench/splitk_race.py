"""How often a split-K call adds up a wrong tile: repeated calls of one launch, checked one by one.

    python bench/splitk_race.py [--calls 2000] [--out race.txt]

A split-K launch's programs each compute part of a tile's K sum, and the tile's last program adds
the parts (kernels/triton_w4a16.py ``_store_split``; the Hopper ``wgmma`` kernel's shares,
kernels/gluon_w4a16.py). ``bench/kernels.py`` read rel err 3e-2 at 14336 x 4096, M = 4 in two H100
runs, where the other calls read 4e-5: some calls added up a wrong tile. Each case here runs one
launch ``--calls`` times on fixed inputs, with one way of adding up the parts
(``triton_w4a16._SPLIT_SUM``: ``atomic``, the default, ``atomic_masked``, the sums' layout in the
first run, or ``slots``), and counts the calls whose output is not bit-identical to the majority
output, the calls whose error against an fp64 reference of the same dequantized weights is above
1e-2, where the worst call's wrong elements lie, the first wrong call, and the calls after which a
tile counter (or, for the atomic sums, a workspace word) was left non-zero (they must be zero
between calls).

Runs (H100, bench/results/splitk_race_h100.txt): with the ``atomic_masked`` layout and the last
program reading the sums by a ``.cg`` load, 15 of 400 calls wrong at 14336 x 4096, M = 4 (``gemm``,
128 rows x 2 splits), 0 in every other case; 17 of 400 with every thread fencing its adds before
the count. Reading them by atomics: no wrong call in 200 in any case and mode; the same since the
per-thread fence was dropped for a barrier and one thread's release (bench/results/splitk_fence_ab_h100.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import random_qweight  # noqa: E402
from klaq.kernels import triton_w4a16  # noqa: E402
from klaq.kernels.triton_w4a16 import repack, w4a16_matmul  # noqa: E402

_GEMM = dict(kernel="gemm", block_m=16, block_n=128, split=2, num_warps=4, num_stages=3)
_GEMV3 = dict(kernel="gemv", block_n=64, split=2, num_warps=4, num_stages=1)
_H2 = dict(kernel="gemv_h2", block_n=32, tiles=2, split=2, num_warps=4, num_stages=1)
# (N, K, M, launch, how): how = triton_w4a16._SPLIT_SUM for the call ("atomic" is the default). The
# atomic cases are 2-way splits (two partials added to zero: order-free), as are the wgmma shares
# (added in program order); "slots" adds in split order, so any split must repeat bit-exactly
CASES = [
    (14336, 4096, 4, _GEMM, "slots"),
    (14336, 4096, 4, _GEMM, "atomic"),
    (14336, 4096, 4, _GEMM, "atomic_masked"),
    (14336, 4096, 4, dict(_GEMM, split=1), "atomic"),  # no split-K: is the product itself repeatable?
    (14336, 4096, 4, dict(_GEMM, num_stages=1), "atomic_masked"),
    (14336, 4096, 8, _GEMM, "atomic"),
    (14336, 4096, 8, _GEMM, "atomic_masked"),
    (14336, 4096, 3, _GEMV3, "atomic"),
    (14336, 4096, 3, _GEMV3, "atomic_masked"),
    (14336, 4096, 16, _GEMM, "slots"),
    (14336, 4096, 16, _GEMM, "atomic"),
    (4096, 4096, 16, dict(_GEMM, block_n=64, split=4), "slots"),
    (4096, 14336, 1, _H2, "slots"),
    (4096, 14336, 1, dict(_H2, split=4), "slots"),
    (4096, 14336, 1, _H2, "atomic"),
    (4096, 14336, 1, dict(kernel="gemv", block_m=1, block_n=64, split=2, num_warps=4, num_stages=1), "atomic"),
    (6144, 4096, 256, dict(kernel="wgmma"), "atomic"),  # 192 tiles: 60 of them in K-halves (shares)
]


def run_case(n, k, m, cfg, mode, calls: int) -> dict:
    triton_w4a16._SPLIT_SUM = mode
    triton_w4a16._WORKSPACES.clear()  # each case starts from a fresh zeroed workspace
    qw = random_qweight(n, k)
    w = repack(qw, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ torch.from_numpy(qw.dequantize(np.float16)).to(x.device).double().T
    out = torch.empty((calls, m, n), device="cuda", dtype=torch.float16)
    w4a16_matmul(x, w, pdl=False, **cfg)  # allocates the workspace
    torch.cuda.synchronize()
    ws, cnt = triton_w4a16._WORKSPACES[x.device]
    # non-zero counters after each call (and workspace words: the atomic modes zero it, slots do not)
    dirty = torch.zeros(calls, device="cuda", dtype=torch.int64)
    ws = ws if mode != "slots" else ws[:0]
    t0 = time.time()
    for i in range(calls):
        out[i] = w4a16_matmul(x, w, pdl=False, **cfg)
        dirty[i] = (ws != 0).sum() + (cnt != 0).sum()
    torch.cuda.synchronize()
    secs = time.time() - t0
    flat = out.view(calls, -1)
    base = flat[0]  # the majority output: call 0's, unless most calls differ from it
    differ = (flat != base).any(dim=1)
    if differ.float().mean() > 0.5:
        base = flat[int(differ.nonzero()[0])]
        differ = (flat != base).any(dim=1)
    err = np.array([((o.double() - ref).norm() / ref.norm()).item() for o in out])
    bad = np.flatnonzero(differ.cpu().numpy())
    worst = bad[np.argmax(err[bad])] if len(bad) else None
    where = ""
    if worst is not None:  # which rows and which 32-column slices (one warp's share of a 128-wide tile)
        off = (out[worst] != base.view(m, n)).nonzero().cpu().numpy()
        where = (f"rows {sorted(set(off[:, 0].tolist()))}, {len(set((off[:, 1] // 32).tolist()))} slices of 32 "
                 f"columns, first at column {off[0, 1]}")
    dirty = dirty.cpu().numpy()
    return dict(n=n, k=k, m=m, kernel=cfg["kernel"], mode=mode, split=cfg.get("split", "-"),
                stages=cfg.get("num_stages", "-"), calls=calls, differ=len(bad), bad=int((err > 1e-2).sum()),
                err_typical=float(np.median(err)), err_worst=float(err.max()),
                elems_off_in_worst=0 if worst is None else int((flat[worst] != base).sum()), where=where,
                first_bad=int(bad[0]) if len(bad) else -1, dirty_calls=int((dirty > 0).sum()),
                first_dirty=int(np.flatnonzero(dirty)[0]) if dirty.any() else -1, secs=secs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", help="also write the lines here")
    args = ap.parse_args()
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.calls} calls per case",
             "| N x K | M | kernel | split | stages | sum | calls not bit-identical to the majority | "
             "calls with rel err > 1e-2 | median rel err | worst rel err | elements off in the worst | "
             "where | first wrong call | calls leaving the workspace dirty | first |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for n, k, m, cfg, mode in CASES:
        r = run_case(n, k, m, cfg, mode, args.calls)
        line = (f"| {n}x{k} | {m} | {r['kernel']} | {r['split']} | {r['stages']} | {mode} | {r['differ']} | "
                f"{r['bad']} | {r['err_typical']:.1e} | {r['err_worst']:.1e} | {r['elems_off_in_worst']} | "
                f"{r['where']} | {r['first_bad']} | {r['dirty_calls']} | {r['first_dirty']} |")
        print(line, flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
