"""bench/wgmma_ptxas.py: the Hopper wgmma kernel through ptxas for sm_90a, on the CPU machine.

The committed kernel must compile without serialized wgmmas (ptxas C7513) and without spills; a copy
that keeps a pair of slices in flight across the MMA wait must draw C7513, so the check can fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
WAIT = "acc = warpgroup_mma_wait(num_outstanding=0, deps=(tok, ))"

pytest.importorskip("triton.experimental.gluon")


def report(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "wgmma_ptxas.py"), "--json", *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# bytes of spill allowed: with zero points at 128-token tiles the ptxas of Triton 3.9 (CUDA 13.4) spills
# 8 bytes each way at 255 registers, Triton 3.6's (the H100's) none at 248
@pytest.mark.parametrize("args,spill", [((), 0), (("--zero",), 64), (("--block-m", "64", "--sub", "32"), 0)])
def test_the_kernel_keeps_its_mmas_asynchronous_and_does_not_spill(args, spill):
    rep = report(*args)
    assert not rep["serialized"], rep["notes"]
    assert rep["spill_stores"] <= spill and rep["spill_loads"] <= spill, rep
    assert 0 < rep["registers"] <= 255


# Unspilled under this machine's Triton 3.9 (254 registers at 128-token tiles); Triton 3.6's compiler, the H100 runs',
# takes 255 and spills 4 / 8 bytes (stores / loads) in the symmetric 128-token build (BENCHMARKS.md, eleventh session).
@pytest.mark.parametrize("args,xch", [((), 64 * 128 * 4), (("--zero",), 64 * 128 * 4),
                                      (("--block-m", "64", "--sub", "32"), 64 * 64 * 4)])
def test_the_cluster_build_keeps_its_exchange_area_clear_of_the_mbarriers(args, xch):
    """The K-halves' exchange writes the first ``64 x tokens`` fp32 of the tail's partner's dynamic shared
    memory once both loops are done: only the x ring may lie there, never the live mbarriers. Each thread
    sends its 64 (32) accumulator values; the build stays asynchronous and unspilled."""
    rep = report("--cluster", *args)
    assert rep["mbarriers"] and min(rep["mbarriers"]) >= xch, rep
    assert rep["dsmem_stores"] == xch // 4 // 128, rep
    assert not rep["serialized"] and rep["spill_stores"] == 0 and 0 < rep["registers"] <= 255, rep


def test_a_pair_kept_in_flight_across_the_wait_is_reported_serialized(tmp_path):
    source = (ROOT / "kernels" / "gluon_w4a16.py").read_text()
    assert source.count(WAIT) == 1
    variant = tmp_path / "in_flight.py"
    variant.write_text(source.replace(WAIT, WAIT.replace("num_outstanding=0", "num_outstanding=2")))
    rep = report("--module", str(variant))
    assert rep["serialized"] and any("C7513" in n for n in rep["notes"]), rep


# Triton 3.9's ptxas spills 8 bytes each way in the symmetric 64-code build at 255 registers; Triton 3.6's
# (the H100's) none at 233, and at 223 in the build for whole tiles only
@pytest.mark.parametrize("args,spill", [((), 64), (("--zero",), 64), (("--sub", "32", "--zero"), 64),
                                        (("--whole-tiles",), 64), (("--whole-tiles", "--zero"), 64)])
def test_the_tall_kernel_keeps_its_mmas_asynchronous(args, spill):
    rep = report("--kernel", "tall", *args)
    assert rep["kernel"] == "tall" and not rep["serialized"], rep["notes"]
    assert rep["spill_stores"] <= spill and rep["spill_loads"] <= spill, rep
    assert 0 < rep["registers"] <= 255


def test_the_whole_tiles_build_has_no_exchange():
    """``SHARED`` False (the default launch, one program per tile) compiles the stream-K exchange out: no
    atomics (the tiles' arrival counters) in its PTX, while the build with shares has them."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from wgmma_ptxas import tall_ptx; "
            "print(sum('atom.' in tall_ptx(shared=s) for s in (False, True)), 'atom.' in tall_ptx(shared=True))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-2:] == ["1", "True"], res.stdout


def _gemv_launches():
    from klaq.kernels import gluon_gemv

    return sorted(gluon_gemv.RESIDENT.items())


@pytest.mark.parametrize("launch,resident", _gemv_launches())
def test_the_gemv_fits_the_programs_per_sm_its_launch_rule_assumes(launch, resident):
    """gluon_gemv.config_for counts how many programs of each launch one SM holds (by registers,
    allocated per warp in steps of 8 per thread): the kernel as compiled must fit that many, with no
    spills, or the rule's waves are wrong."""
    bn, wr, wq, rb = launch
    rep = report("--kernel", "gemv", "--launch", f"{bn}:{wr}:{wq}:{rb}")
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, rep
    regs = -(-rep["registers"] // 8) * 8
    assert resident * wr * wq * 32 * regs <= 65536, (rep["registers"], resident)


@pytest.mark.parametrize("args", [(), ("--tiles", "28"), ("--warps", "4")])
def test_the_tensor_core_gemv_builds_without_spills(args):
    """kernels/gluon_gemv_mma.py for sm_90a (one round, several rounds of a long row, fewer warps than
    tiles): ptxas fits it without spills."""
    rep = report("--kernel", "gemv_mma", *args)
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, rep


X_LOADS = "\n".join(f"        x{p} = _x(x_ptr, 0, quad_x, col, {p}, zero, K, QT, SUB)" for p in range(4))


def test_the_register_gemv_issues_every_global_load_before_its_arithmetic():
    """kernels/gluon_gemv.py's ``gemv_reg`` at its default launch (K <= 4096 at 512-code tiles: one chunk):
    in the sm_90a SASS no global load comes after the first half2 instruction, so once a program's words
    land nothing waits on L2 again (x's pairs loaded at their turn cost 0.7 us at 4096x4096); 56 registers
    or fewer, so 9 programs of 4 warps fit an SM, and no spills."""
    rep = report("--kernel", "gemv_reg")
    assert rep["loads"] >= 16 and rep["late"] == 0, rep
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, rep
    assert 9 * 4 * 32 * (-(-rep["registers"] // 8) * 8) <= 65536, rep


def test_x_loaded_at_each_pairs_turn_is_reported_late(tmp_path):
    """The check can fail: a copy of the kernel that loads each pair's x just before that pair's sum
    (the probe's first order) has global loads after the first half2 instruction."""
    source = (ROOT / "kernels" / "gluon_gemv.py").read_text()
    assert source.count(X_LOADS) == 1
    variant = source.replace(X_LOADS + "\n", "")
    for p in range(4):
        call = f"a2 = _colsum(words, x{p}, s{p}, "
        assert variant.count(call) == 1
        variant = variant.replace(call, f"x{p} = _x(x_ptr, 0, quad_x, col, {p}, zero, K, QT, SUB)\n        " + call)
    path = tmp_path / "late_x.py"
    path.write_text(variant)
    rep = report("--kernel", "gemv_reg", "--module", str(path))
    assert rep["late"] > 0, rep


# Spills after the main loop only (the exchange's per-element addresses beside the 128-register accumulator):
# 212 / 212 bytes under Triton 3.9's ptxas, 28 / 28 under Triton 3.6's (the H100's); in 3.6's SASS every STL / LDL of the
# group-128 build comes after the last HGMMA
@pytest.mark.parametrize("args", [(), ("--zero", "--plan", "4:1"), ("--sub", "32", "--plan", "2:2")])
def test_the_cluster_kernel_keeps_its_exchange_area_clear_of_the_mbarriers(args):
    """kernels/gluon_w4a16_cluster.py: the reduce-scatter writes up to 96 KB (three warps' rows from each of
    two senders, 16 KB a warp) at the start of an owner's shared memory, which the x ring's 6 stages of
    256 x 32 codes (16 KB each) cover and where no mbarrier lies; each thread sends its 128 accumulator values
    through distributed shared memory (one ``st.shared::cluster`` each); the MMAs stay asynchronous."""
    rep = report("--kernel", "cluster", *args)
    ring = 6 * 256 * (16 if "--sub" in args else 32) * 2
    assert rep["mbarriers"] and min(rep["mbarriers"]) >= ring, rep
    assert rep["dsmem_stores"] == 128, rep
    assert not rep["serialized"] and 0 < rep["registers"] <= 255, rep
    assert rep["spill_stores"] <= 256 and rep["spill_loads"] <= 256, rep
