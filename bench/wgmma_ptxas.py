"""What ptxas makes of the Hopper wgmma kernels, on any machine (no GPU): registers, spills, notes.

    python bench/wgmma_ptxas.py [--block-m 128] [--sub 64] [--zero] [--json]
    python bench/wgmma_ptxas.py --kernel tall [--sub 64] [--zero] [--whole-tiles]
    python bench/wgmma_ptxas.py --kernel gemv [--launch 8:1:4:1]
    python bench/wgmma_ptxas.py --kernel gemv_reg [--launch 4:1:4:1] [--module VARIANT]
    python bench/wgmma_ptxas.py --kernel gemv_mma [--warps 8] [--tiles 8]
    cp kernels/gluon_w4a16.py /tmp/v.py && patch /tmp/v.py bench/results/wgmma_pipelined.diff
    python bench/wgmma_ptxas.py --module /tmp/v.py --const PARTS=1 --const TILE_WAIT=False \
        --const TMA_LATE=False --const X_EARLY=False

Builds ``_gemm_wgmma_kernel`` (kernels/gluon_w4a16.py; or, with ``--kernel tall``, kernels/gluon_w4a16_tall.py's
``_gemm_tall_kernel``) for sm_90a with Triton's Gluon, runs Triton's
bundled ``ptxas -v`` on the PTX and reports the registers per thread, the spill bytes and ptxas's
performance notes. The one that matters here is C7513, "wgmma.mma_async instructions are serialized
due to non wgmma instructions defining input registers of a wgmma between start and end of the
pipeline stage": it is what keeping a pair of slices in flight across the MMA wait ran into
(BENCHMARKS.md, "pipelined MMA groups"), and a kernel that draws it waits for every MMA before
issuing the next. The device's ptxas may allocate a few more registers (254 on the H100 where this
machine's reads 241), so the count is a guide, the notes and spills the facts.

Run with ``TRITON_INTERPRET`` unset (the interpreter builds no PTX).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile


def _compile_ptx(fn, sig: dict, consts: dict, divisible: list | None = None) -> str:
    """``fn``'s PTX for sm_90a with runtime-argument types ``sig`` and constexprs ``consts``; the arguments
    named in ``divisible`` are taken as multiples of 16 (as Triton specializes such values at a launch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {a: "constexpr" if a in consts else sig[a] for a in fn.arg_names}  # in the kernel's argument order
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible or []}
    src = GluonASTSource(fn, sig, {(fn.arg_names.index(c),): v for c, v in consts.items()}, attrs)
    options = dict(num_warps=consts["num_warps"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _variant(path: str | None, name: str):
    """The kernel module copy at ``path`` (a variant), imported as ``name``; None without a path."""
    if not path:
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gluon_ptx(fn, block: list, consts: dict, args: dict | None = None) -> str:
    """``fn``'s PTX for sm_90a: a kernel with the runtime arguments both Hopper GEMMs take (x's TMA
    descriptor of ``block`` = [tokens, codes], then pointers and ints), ``args`` (name: type) that only a
    copy's kernel takes, and constexprs ``consts``."""
    from triton.experimental.gluon import language as gl

    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float16)
    sig = {"x_desc": f"tensordesc<fp16[{block[0]}, {block[1]}],{layout!r}>", "w_ptr": "*i32", "s_ptr": "*fp16",
           "o_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
           "Kw": "i32", "stride_ym": "i32", "group_size": "i32", "n_tiles": "i32", "blocks_m": "i32",
           "units": "i32", "dp": "i32", **(args or {})}
    return _compile_ptx(fn, sig, consts)


def wgmma_ptx(block_m: int = 128, sub: int = 64, has_zero: bool = False, stages: int = 6, module: str | None = None,
              extra: dict | None = None, cluster: bool = False, args: dict | None = None) -> str:
    """The kernel's PTX for sm_90a at one launch shape (64 weight rows per tile); ``module``: another
    copy of kernels/gluon_w4a16.py (a variant), ``extra`` / ``args``: constexprs / runtime arguments (name:
    type) only that copy's kernel takes; ``cluster``: the build whose K-halves exchange through distributed
    shared memory."""
    from klaq.kernels import gluon_w4a16

    gluon_w4a16 = _variant(module, "wgmma_variant") or gluon_w4a16
    consts = dict(HAS_ZERO=has_zero, PAIR_GROUP=True, BLOCK_N=64, BLOCK_M=block_m, SUB=sub, STAGES=stages,
                  OUT_VEC=4, OUT_TN=16, num_warps=4, CLUSTER=cluster, **(extra or {}))
    return _gluon_ptx(gluon_w4a16._gemm_wgmma_kernel, [block_m, sub], consts, args)


def tall_ptx(sub: int = 64, has_zero: bool = False, stages: int = 6, spin: bool = True, shared: bool = True) -> str:
    """The PTX of kernels/gluon_w4a16_tall.py's kernel (128 weight rows x 256 tokens, 8 warps) for sm_90a;
    ``shared``: with the stream-K shares' exchange (else whole tiles only, the default launch)."""
    from klaq.kernels import gluon_w4a16_tall as tall

    consts = dict(HAS_ZERO=has_zero, PAIR_GROUP=True, BLOCK_N=tall.BLOCK_N, BLOCK_M=tall.TOKENS, SUB=sub,
                  STAGES=stages, CHUNK=32, SPIN=spin, SHARED=shared, num_warps=8)
    return _gluon_ptx(tall._gemm_tall_kernel, [tall.TOKENS, sub // 2], consts)


def cluster_ptx(sub: int = 64, has_zero: bool = False, stages: int = 6, ctas: int = 8, per: int = 3) -> str:
    """The PTX of kernels/gluon_w4a16_cluster.py's kernel (128 x 256 tiles split in K over clusters of ``ctas``
    programs, ``per`` tiles each) for sm_90a."""
    from klaq.kernels import gluon_w4a16_cluster as cl

    consts = dict(HAS_ZERO=has_zero, PAIR_GROUP=True, SUB=sub, STAGES=stages, RING=stages, CTAS=ctas, PER=per,
                  num_warps=cl.WARPS)
    args = {"x_desc": None, "w_ptr": "*i32", "s_ptr": "*fp16", "o_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32",
            "M": "i32", "N": "i32", "Kw": "i32", "stride_ym": "i32", "group_size": "i32", "n_tiles": "i32",
            "blocks_m": "i32", "tiles": "i32"}
    from triton.experimental.gluon import language as gl

    block = [cl.TOKENS, sub // 2]
    args["x_desc"] = f"tensordesc<fp16[{block[0]}, {block[1]}],{gl.NVMMASharedLayout.get_default_for(block, gl.float16)!r}>"
    return _compile_ptx(cl._cluster_kernel, args, consts)


def gemv_ptx(block_n: int = 8, wr: int = 1, wq: int = 4, rb: int = 1, stages: int | None = None, sub: int = 64,
             pdl: bool = True) -> str:
    """The PTX of kernels/gluon_gemv.py's M = 1 kernel (``gemv_tma``) for sm_90a at one launch: ``rb``
    blocks of ``block_n`` rows per program in ``wr`` x ``wq`` warps, every tile in flight unless
    ``stages`` is given, the first tile's scales before the PDL wait (the kernel's default). Its integer
    and pointer arguments are taken as multiples of 16, as a launch on the Llama shapes specializes them
    (the scales' 16-byte and x's 8-byte loads depend on it)."""
    from triton.experimental.gluon import language as gl

    from klaq.kernels import gluon_gemv

    wl = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    sig = {"w_desc": f"tensordesc<i32[{block_n}, {min(128 * wq, 256)}],{wl!r}>", "x_ptr": "*fp16", "s_ptr": "*fp16",
           "y_ptr": "*fp16", "N": "i32", "K": "i32", "Kw": "i32", "group_size": "i32"}
    consts = dict(BLOCK_N=block_n, WR=wr, WQ=wq, RB=rb, SUB=sub, STAGES=stages or rb, PDL=pdl, num_warps=wr * wq,
                  COMPUTE=True, EARLY_S=True)
    return _compile_ptx(gluon_gemv._gemv_tma_kernel, sig, consts, divisible=[a for a in sig if a != "w_desc"])


def gemv_mma_ptx(warps: int = 8, tiles: int = 8) -> str:
    """The PTX of kernels/gluon_gemv_mma.py's M = 1 kernel for sm_90a: ``warps`` per 16-row program, rows of
    ``tiles`` 512-code tiles (one round where tiles <= warps). Its integer arguments are taken as multiples
    of 16, as a launch on the Llama shapes specializes them (the 16-byte loads depend on it)."""
    from klaq.kernels import gluon_gemv_mma as mma

    sig = {"w_ptr": "*i32", "x_ptr": "*fp16", "s_ptr": "*fp16", "y_ptr": "*fp16", "N": "i32", "K": "i32", "Kw": "i32",
           "group_size": "i32"}
    consts = dict(ONE_ROUND=tiles <= warps, PDL=True, num_warps=warps, FLOOR=False)
    return _compile_ptx(mma._gemv_mma_kernel, sig, consts, divisible=list(sig))


def gemv_reg_ptx(block_n: int = 4, wr: int = 1, wq: int = 4, nch: int = 1, sub: int = 64, pdl: bool = False,
                 module: str | None = None, args: dict | None = None) -> str:
    """The PTX of kernels/gluon_gemv.py's register-load M = 1 kernel (``gemv_reg``) for sm_90a: ``block_n``
    rows per program in ``wr`` x ``wq`` warps, rows of ``nch`` chunks of ``128 * wq`` words; ``module``:
    another copy of kernels/gluon_gemv.py (a variant), ``args``: runtime arguments (name: type) only that
    copy's kernel takes. Integer and pointer arguments divisible by 16, as a launch on the Llama shapes
    specializes them."""
    from klaq.kernels import gluon_gemv

    gluon_gemv = _variant(module, "gemv_variant") or gluon_gemv
    sig = {"w_ptr": "*i32", "x_ptr": "*fp16", "s_ptr": "*fp16", "y_ptr": "*fp16", "N": "i32", "K": "i32", "Kw": "i32",
           "group_size": "i32", **(args or {})}
    consts = dict(BLOCK_N=block_n, WR=wr, WQ=wq, NCH=nch, SUB=sub, PDL=pdl, num_warps=wr * wq, COMPUTE=True)
    return _compile_ptx(gluon_gemv._gemv_reg_kernel, sig, consts, divisible=list(sig))


def load_order(sass: str) -> dict:
    """Where the global loads sit in ``sass`` (nvdisasm's listing) against the half2 arithmetic: their count,
    how many come after the first HFMA2 / HMUL2 / HADD2 (``late``), and the instruction indices."""
    ops = [line.split("*/", 1)[1].strip() for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
    loads = [i for i, op in enumerate(ops) if re.search(r"\bLDG\.", op)]
    math = [i for i, op in enumerate(ops) if re.search(r"\bH(FMA2|MUL2|ADD2)\b(?!\.MMA)", op)]
    first = math[0] if math else len(ops)
    return dict(loads=len(loads), late=sum(i > first for i in loads), first_math=first,
                last_load=loads[-1] if loads else -1)


def mbarrier_offsets(ptx: str) -> list[int]:
    """The dynamic shared-memory offsets (from ``global_smem``) of the mbarriers ``ptx`` initializes, where
    they are constants: the cluster exchange writes one fp32 partial tile at the start of the x ring, so no
    live buffer but the ring may lie there."""
    bases = set(re.findall(r"mov\.b32\s+(%r\d+), global_smem;", ptx))
    at = {dst: int(c) for dst, base, c in re.findall(r"add\.s32\s+(%r\d+), (%r\d+), (\d+);", ptx) if base in bases}
    at.update({b: 0 for b in bases})
    return sorted(at.get(r, -1) for r in re.findall(r"mbarrier\.init\.shared::cta\.b64 \[(%r\d+)\]", ptx))


def ptxas_path() -> str:
    """The ptxas this Triton itself runs for sm_90 (Triton 3.9 takes its newer ``ptxas-blackwell`` for
    sm_90 too: the bundled plain ``ptxas`` cannot read the PTX version it writes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def ptxas_report(ptx: str, sass: bool = False) -> dict:
    """``ptxas -v -arch=sm_90a`` on ``ptx``: registers, spill bytes and the info lines that carry a
    diagnostic code (C7513 and the like), in order; ``sass``: also :func:`load_order` of the cubin's
    disassembly (nvdisasm, beside ptxas)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", src, "-o", cubin],
                             capture_output=True, text=True, timeout=300)
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        order = {}
        if sass:
            nvdisasm = os.path.join(os.path.dirname(ptxas_path()), "nvdisasm")
            order = load_order(subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True,
                                              timeout=300).stdout)
    log = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    notes = [re.sub(r"^.*?info\s*:\s*", "", line).strip() for line in log.splitlines() if re.search(r"\(C\d{4}\)", line)]
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else 0, spill_loads=int(spill.group(2)) if spill else 0,
                serialized=any("C7513" in n for n in notes), notes=notes, **order)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("wgmma", "tall", "cluster", "gemv", "gemv_reg", "gemv_mma"), default="wgmma",
                    help="gluon_w4a16's kernel, gluon_w4a16_tall's (128 x 256 tiles; --sub 32 or 64), gluon_gemv's "
                    "M = 1 kernels (gemv: the TMA one, --launch BN:WR:WQ:RB; gemv_reg: --launch BN:WR:WQ:NCH, also "
                    "reporting its global loads' place in the SASS), gluon_gemv_mma's (--warps, --tiles), or "
                    "gluon_w4a16_cluster's (--plan CTAS:PER)")
    ap.add_argument("--plan", default="8:3", help="cluster: CTAS:PER (programs per cluster, tiles per cluster)")
    ap.add_argument("--warps", type=int, default=8, help="gemv_mma: warps per program")
    ap.add_argument("--tiles", type=int, default=8, help="gemv_mma: 512-code tiles per row (K / 512)")
    ap.add_argument("--launch", help="gemv: BLOCK_N:WR:WQ:RB (rows, warps, row blocks); "
                    "gemv_reg: BLOCK_N:WR:WQ:NCH (default 4:1:4:1); default 8:1:4:1")
    ap.add_argument("--block-m", type=int, default=128, help="tokens per tile (64, 128 or 256)")
    ap.add_argument("--sub", type=int, default=64, help="codes per slice (block_k / 8: 16, 32 or 64)")
    ap.add_argument("--zero", action="store_true", help="zero points (asymmetric weights)")
    ap.add_argument("--stages", type=int, default=6)
    ap.add_argument("--whole-tiles", action="store_true",
                    help="tall: the build for whole tiles only (no stream-K exchange; its default launch)")
    ap.add_argument("--cluster", action="store_true",
                    help="wgmma: the build whose K-halves exchange through distributed shared memory (also "
                    "reporting the mbarriers' shared-memory offsets)")
    ap.add_argument("--module", help="compile this copy of kernels/gluon_w4a16.py instead (a variant)")
    ap.add_argument("--const", action="append", default=[], metavar="NAME=VALUE",
                    help="a constexpr only the variant's kernel takes (a Python literal), repeatable")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (the interpreter builds no PTX)", file=sys.stderr)
        return 2
    extra = {name: ast.literal_eval(value) for name, value in (c.split("=", 1) for c in args.const)}
    if args.kernel == "gemv":
        args.launch = args.launch or "8:1:4:1"
        bn, wr, wq, rb = map(int, args.launch.split(":"))
        rep = dict(kernel="gemv", launch=args.launch, **ptxas_report(gemv_ptx(bn, wr, wq, rb)))
        print(json.dumps(rep) if args.json else f"gemv kernel, launch {args.launch}: {rep['registers']} registers, "
              f"spills {rep['spill_stores']} / {rep['spill_loads']} bytes (stores / loads)")
        return 0
    if args.kernel == "gemv_reg":
        launch = args.launch or "4:1:4:1"
        bn, wr, wq, nch = map(int, launch.split(":"))
        rep = dict(kernel="gemv_reg", launch=launch,
                   **ptxas_report(gemv_reg_ptx(bn, wr, wq, nch, args.sub, module=args.module), sass=True))
        print(json.dumps(rep) if args.json else f"gemv_reg kernel, launch {launch}: {rep['registers']} registers, "
              f"spills {rep['spill_stores']} / {rep['spill_loads']} bytes, {rep['loads']} global loads, "
              f"{rep['late']} after the first half2 arithmetic")
        return 0
    if args.kernel == "gemv_mma":
        rep = dict(kernel="gemv_mma", warps=args.warps, tiles=args.tiles,
                   **ptxas_report(gemv_mma_ptx(args.warps, args.tiles)))
        print(json.dumps(rep) if args.json else f"gemv_mma kernel, {args.warps} warps, {args.tiles} tiles: "
              f"{rep['registers']} registers, spills {rep['spill_stores']} / {rep['spill_loads']} bytes (stores / loads)")
        return 0
    if args.kernel == "tall":
        ptx = tall_ptx(args.sub, args.zero, args.stages, shared=not args.whole_tiles)
    elif args.kernel == "cluster":
        ctas, per = map(int, args.plan.split(":"))
        ptx = cluster_ptx(args.sub, args.zero, args.stages, ctas, per)
        extra = dict(extra, plan=args.plan, mbarriers=mbarrier_offsets(ptx),
                     dsmem_stores=len(re.findall(r"st\.shared::cluster", ptx)))
    else:
        ptx = wgmma_ptx(args.block_m, args.sub, args.zero, args.stages, args.module, extra, cluster=args.cluster)
    rep = dict(kernel=args.kernel, whole_tiles=args.whole_tiles, block_m=args.block_m, sub=args.sub, zero=args.zero,
               stages=args.stages, **extra, **ptxas_report(ptx))
    if args.cluster:
        rep.update(cluster=True, mbarriers=mbarrier_offsets(ptx), dsmem_stores=len(re.findall(r"st\.shared::cluster", ptx)))
    if args.json:
        print(json.dumps(rep))
    else:
        tiles = f"{args.block_m}-token tiles"
        if args.kernel == "tall":
            tiles = "128 x 256 tiles" + (" (whole tiles only)" if args.whole_tiles else "")
        if args.kernel == "cluster":
            tiles = f"128 x 256 tiles over clusters {args.plan}"
        print(f"{args.kernel} kernel, {tiles}, {args.sub}-code slices, "
              f"{'zero points' if args.zero else 'symmetric'}: {rep['registers']} registers, "
              f"spills {rep['spill_stores']} / {rep['spill_loads']} bytes (stores / loads)")
        for note in rep["notes"]:
            print("  " + note)
        print("wgmma serialized (C7513): " + ("YES" if rep["serialized"] else "no"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
