"""Where each program of a Hopper kernel ran and when: SM, start and end (global timer and SM clock).

    python bench/cta_trace.py --case gemv 4096x4096        # gemv_reg, M = 1, the default launch
    python bench/cta_trace.py --case wgmma 6144x4096 --m 256 [--programs P --dp D]
    python bench/cta_trace.py --ptxas      # any machine: the traced copies' registers against the kernels'

Why: the two targets issue 5 leaves unmet sit within 3-10% of the line, and aggregate timings cannot say
whether the time goes to how programs fall on the SMs (M = 256: 6144x4096's 132 whole tiles are meant to
take one SM each, the 120 K-halves the second slot), to the order in which programs start, or to the last
programs' work after their bytes arrive (M = 1). A timing-only copy of the kernel's module (``TRACE_EDITS``,
literal source edits that must each apply once) stores, per program, ``%smid``, ``%globaltimer`` and
``%clock64`` at its start and end; the copy runs as bench/kernels.py times it (enough weight copies to
exceed L2, all calls in one CUDA graph), and the last call's trace is summarized.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernels import graph_time_us, load_module, random_qweight, weight_copies  # noqa: E402
from klaq.kernels import gluon_gemv, gluon_w4a16  # noqa: E402
from klaq.kernels.triton_w4a16 import repack  # noqa: E402

FIELDS = 5  # smid, globaltimer start / end (ns), clock64 start / end (cycles)

_HELPERS = '''

TRACE = [None]  # the int64 [programs, 5] buffer the traced launch writes


@gluon.jit
def _tstamp(pid):
    t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=gl.int64, is_pure=False, pack=1)
    c = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [pid], dtype=gl.int64, is_pure=False, pack=1)
    return t, c


@gluon.jit
def _trace_start(tr_ptr, pid):
    # stored at once: nothing held in registers across the kernel (occupancy as untraced)
    t0, c0 = _tstamp(pid)
    sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=gl.int32, is_pure=False, pack=1)
    base = tr_ptr + pid * 5
    gl.store(base, sm.to(gl.int64))
    gl.store(base + 1, t0)
    gl.store(base + 3, c0)


@gluon.jit
def _trace_end(tr_ptr, pid):
    t1, c1 = _tstamp(pid)
    base = tr_ptr + pid * 5
    gl.store(base + 2, t1)
    gl.store(base + 4, c1)
'''

# Per module: (old, new) literal edits. Literals only (tests/bench/test_cta_trace.py reads them).
TRACE_EDITS = {
    "gemv": [
        ("def _gemv_reg_kernel(w_ptr, x_ptr, s_ptr, y_ptr, N,", "def _gemv_reg_kernel(w_ptr, x_ptr, s_ptr, y_ptr, tr_ptr, N,"),
        # after the words' and scales' loads are issued: earlier, the copy took 66-72 registers, not 56
        ("        s3 = _s(s_ptr, 0, quad, 3, s_rows, N, Kw, group_size, QT, SUB)\n    if PDL:",
         "        s3 = _s(s_ptr, 0, quad, 3, s_rows, N, Kw, group_size, QT, SUB)\n"
         "    _trace_start(tr_ptr, gl.program_id(0))\n    if PDL:"),
        ("    gl.store(y_ptr + rows, out.to(gl.float16), mask=rows < N)\n\n\n# (BLOCK_N, WR, WQ, RB)",
         "    gl.store(y_ptr + rows, out.to(gl.float16), mask=rows < N)\n    _trace_end(tr_ptr, gl.program_id(0))"
         "\n\n\n# (BLOCK_N, WR, WQ, RB)"),
        ("_gemv_reg_kernel[(triton.cdiv(n, block_n),)](w.qweight, x.reshape(1, w.in_features).contiguous(), w.scales, y,",
         "_gemv_reg_kernel[(triton.cdiv(n, block_n),)](w.qweight, x.reshape(1, w.in_features).contiguous(), w.scales, y, "
         "TRACE[0],"),
    ],
    "wgmma": [
        ("def _gemm_wgmma_kernel(x_desc, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr,",
         "def _gemm_wgmma_kernel(x_desc, w_ptr, s_ptr, o_ptr, y_ptr, ws_ptr, cnt_ptr, tr_ptr,"),
        ("    pid = gl.program_id(0)\n    programs = gl.num_programs(0)\n",
         "    pid = gl.program_id(0)\n    _trace_start(tr_ptr, pid)\n    programs = gl.num_programs(0)\n"),
        ("    for b in gl.static_range(STAGES):\n        mbarrier.invalidate(bars.index(b))\n",
         "    for b in gl.static_range(STAGES):\n        mbarrier.invalidate(bars.index(b))\n    _trace_end(tr_ptr, pid)\n"),
        ("    args = (x_desc, w.qweight, w.scales, offsets, y, ws, cnt, m,",
         "    args = (x_desc, w.qweight, w.scales, offsets, y, ws, cnt, TRACE[0], m,"),
    ],
}
MODULES = {"gemv": gluon_gemv, "wgmma": gluon_w4a16}


def traced_source(case: str, source: str) -> str:
    """``source`` with TRACE_EDITS[case] applied (each exactly once) and the trace helpers appended."""
    for old, new in TRACE_EDITS[case]:
        if source.count(old) != 1:
            raise ValueError(f"trace {case}: {old!r} is not in the module once")
        source = source.replace(old, new)
    return source + _HELPERS


def traced_path(case: str) -> Path:
    """The traced copy of ``case``'s module, written to a fresh temporary file."""
    path = Path(tempfile.mkdtemp()) / f"traced_{case}.py"
    path.write_text(traced_source(case, Path(MODULES[case].__file__).read_text()))
    return path


def traced_module(case: str):
    return load_module(traced_path(case), f"traced_{case}")


def ptxas_registers(case: str, traced: bool = False) -> int:
    """Registers per thread of ``case``'s kernel (its traced copy's with ``traced``) for sm_90a at the default
    launch, so that a trace runs at the occupancy it measures (the copy must not take more)."""
    from wgmma_ptxas import gemv_reg_ptx, ptxas_report, wgmma_ptx

    module, args = (str(traced_path(case)), {"tr_ptr": "*i64"}) if traced else (None, None)
    if case == "gemv":
        bn, wr, wq = gluon_gemv.REG_CONFIG
        ptx = gemv_reg_ptx(bn, wr, wq, module=module, args=args)
    else:
        ptx = wgmma_ptx(module=module, args=args)
    return ptxas_report(ptx)["registers"]


def summarize(tr: np.ndarray, roles: np.ndarray | None = None) -> list[str]:
    """Lines about one launch's trace ``tr [programs, 5]``; ``roles``: a label per program (or None)."""
    sm, t0, t1, c0, c1 = (tr[:, i] for i in range(FIELDS))
    base = t0.min()
    s, e = (t0 - base) / 1e3, (t1 - base) / 1e3
    cyc = (c1 - c0).astype(np.float64)
    out = [f"programs {len(tr)} on {len(np.unique(sm))} SMs; span {e.max():.2f} us (globaltimer);"
           f" starts: last {s.max():.2f} us, p50 {np.median(s):.2f}; ends: first {e.min():.2f}, p50 {np.median(e):.2f},"
           f" p90 {np.percentile(e, 90):.2f}, p99 {np.percentile(e, 99):.2f}, last {e.max():.2f}"]
    out.append(f"program duration (clock64 cycles): min {cyc.min():.0f} p50 {np.median(cyc):.0f} "
               f"p90 {np.percentile(cyc, 90):.0f} max {cyc.max():.0f}")
    per_sm = {}
    for i in range(len(tr)):
        per_sm.setdefault(int(sm[i]), []).append(i)
    counts = np.bincount([len(v) for v in per_sm.values()])
    out.append("programs per SM: " + ", ".join(f"{k}: {c} SMs" for k, c in enumerate(counts) if c))
    if roles is not None:
        mixes = {}
        for v in per_sm.values():
            key = "+".join(sorted(roles[i] for i in v))
            mixes[key] = mixes.get(key, 0) + 1
        out.append("SM mixes: " + ", ".join(f"{k}: {c}" for k, c in sorted(mixes.items())))
        for r in sorted(set(roles)):
            idx = roles == r
            out.append(f"  {r}: {idx.sum()} programs, start p50 {np.median(s[idx]):.2f} max {s[idx].max():.2f}, end p50 "
                       f"{np.median(e[idx]):.2f} max {e[idx].max():.2f}, cycles p50 {np.median(cyc[idx]):.0f}")
        last = int(np.argmax(e))
        mates = [i for i in per_sm[int(sm[last])] if i != last]
        out.append(f"  last to end: program {last} ({roles[last]}) on SM {sm[last]}, start {s[last]:.2f} end {e[last]:.2f};"
                   f" with " + ", ".join(f"{i} ({roles[i]}) {s[i]:.2f}-{e[i]:.2f}" for i in mates))
    slow = np.argsort(e)[-8:]
    out.append("last 8 ends: " + ", ".join(f"{i}@SM{sm[i]} {s[i]:.2f}-{e[i]:.2f}" for i in slow))
    return out


def run_gemv(mod, n: int, k: int) -> None:
    base = repack(random_qweight(n, k), "cuda")
    ws = weight_copies(base)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    bn = mod.REG_CONFIG[0]
    progs = -(-n // bn)
    mod.TRACE[0] = torch.zeros(progs, FIELDS, dtype=torch.int64, device="cuda")
    ref = gluon_gemv.gemv_reg(x, base, pdl=False)
    got = mod.gemv_reg(x, base, pdl=False)
    assert torch.equal(ref, got), "the traced copy must compute the same bits"
    t_ref = graph_time_us([partial(gluon_gemv.gemv_reg, x, w, pdl=False) for w in ws])
    t = graph_time_us([partial(mod.gemv_reg, x, w, pdl=False) for w in ws])
    print(f"gemv_reg {n}x{k} M=1: {t_ref:.2f} us per call untraced, {t:.2f} traced", flush=True)
    for line in summarize(mod.TRACE[0].cpu().numpy()):
        print("  " + line)


def run_wgmma(mod, n: int, k: int, m: int, programs: int | None, dp: int | None) -> None:
    base = repack(random_qweight(n, k), "cuda")
    ws = weight_copies(base)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    sms = gluon_w4a16._sm_count(x.device)
    bm = gluon_w4a16.tokens_per_tile(m, n, sms)
    tiles = -(-n // 64) * -(-m // bm)
    if programs is None:
        programs, dp0 = gluon_w4a16.default_programs(m, tiles, base.n_tiles, sms)
        dp = dp0 if dp is None else dp
    programs, dp = gluon_w4a16.grid(programs, dp or 0, tiles, base.n_tiles)
    mod.TRACE[0] = torch.zeros(programs, FIELDS, dtype=torch.int64, device="cuda")
    call = partial(gluon_w4a16.gemm_wgmma, programs=programs, dp=dp)
    ref = call(x, base)
    got = partial(mod.gemm_wgmma, programs=programs, dp=dp)(x, base)
    assert torch.equal(ref, got), "the traced copy must compute the same bits"
    t_ref = graph_time_us([partial(call, x, w) for w in ws])
    t = graph_time_us([partial(mod.gemm_wgmma, x, w, programs=programs, dp=dp) for w in ws])
    print(f"wgmma {n}x{k} M={m}: {programs} programs, dp {dp}, {tiles} tiles: {t_ref:.2f} us per call untraced, "
          f"{t:.2f} traced", flush=True)
    roles = np.array(["whole" if i < dp else "share" for i in range(programs)])
    for line in summarize(mod.TRACE[0].cpu().numpy(), roles):
        print("  " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(TRACE_EDITS))
    ap.add_argument("shapes", nargs="?", default="", help="NxK[,NxK...]")
    ap.add_argument("--ptxas", action="store_true", help="registers of each kernel and its traced copy, as JSON")
    ap.add_argument("--m", type=int, default=256, help="tokens (wgmma)")
    ap.add_argument("--programs", type=int, default=None)
    ap.add_argument("--dp", type=int, default=None)
    args = ap.parse_args()
    if args.ptxas:
        print(json.dumps({c: {"kernel": ptxas_registers(c), "traced": ptxas_registers(c, traced=True)}
                          for c in sorted(TRACE_EDITS)}))
        return
    if not args.case or not args.shapes:
        ap.error("--case and shapes, or --ptxas")
    mod = traced_module(args.case)
    print(torch.cuda.get_device_name())
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        if args.case == "gemv":
            run_gemv(mod, n, k)
        else:
            run_wgmma(mod, n, k, args.m, args.programs, args.dp)


if __name__ == "__main__":
    main()
