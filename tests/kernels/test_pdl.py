"""Programmatic dependent launch (kernels/pdl.py).

On CPU: when it is on, and the compiled sm_90 code of every PDL kernel (built here without a GPU)
touches no global memory before ``griddepcontrol.wait`` except the L2 prefetch of weight rows.
On a GPU: a dependent chain of GEMVs replayed as a CUDA graph with PDL gives bit-for-bit the
outputs of the same chain run eagerly without it (split-K atomics and all three GEMVs included).
"""

import re
from dataclasses import replace

import numpy as np
import pytest
from w4_helpers import HAS_CUDA, W4_SIG, ptx_for_sm90, random_qweight

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
from klaq.kernels import pdl  # noqa: E402
from klaq.kernels.triton_w4a16 import repack, w4a16_matmul  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def test_on_by_default_where_supported_and_never_without_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(pdl, "pdl_supported", lambda device=None: True)
    monkeypatch.delenv("KLAQ_PDL", raising=False)
    assert pdl.pdl_enabled("cuda")  # on by default
    monkeypatch.setenv("KLAQ_PDL", "0")
    assert not pdl.pdl_enabled("cuda")
    monkeypatch.undo()
    monkeypatch.setenv("KLAQ_PDL", "1")
    assert not pdl.pdl_enabled("cpu") and not pdl.pdl_supported("cpu")
    assert pdl.launch_kwargs(False) == {} and pdl.launch_kwargs(True) == {"launch_pdl": True}
    monkeypatch.setattr(pdl, "_INTERPRET", True)
    assert not pdl.pdl_enabled("cuda") and not pdl.pdl_supported("cuda")


def test_a_launch_uses_pdl_as_asked_else_by_default_and_only_where_supported(monkeypatch):
    monkeypatch.setattr(pdl, "pdl_supported", lambda device=None: True)
    monkeypatch.setenv("KLAQ_PDL", "0")
    assert pdl.pdl_for("cuda", True) and not pdl.pdl_for("cuda", None) and not pdl.pdl_for("cuda", False)
    monkeypatch.setenv("KLAQ_PDL", "1")
    assert pdl.pdl_for("cuda", None) and not pdl.pdl_for("cuda", False)
    monkeypatch.setattr(pdl, "pdl_supported", lambda device=None: False)
    assert not pdl.pdl_for("cuda", True) and not pdl.pdl_for("cuda", None)


def test_early_words_by_default_only_with_pdl_and_only_for_gemv_wide():
    from klaq.kernels.triton_w4a16 import default_config, early_words

    wide, h2 = default_config(1, 576, 576), default_config(1, 4096, 4096)
    assert wide["kernel"] == "gemv_wide" and early_words(None, True, wide)
    assert not early_words(None, False, wide)  # no PDL: nothing to overlap
    assert h2["kernel"] == "gemv_h2" and not early_words(None, True, h2)
    assert early_words(True, False, h2) and not early_words(False, True, wide)  # asked for: as asked


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_on_by_compute_capability(monkeypatch):
    monkeypatch.delenv("KLAQ_PDL", raising=False)
    if pdl._INTERPRET:
        pytest.skip("the interpreter runs no griddepcontrol")
    assert pdl.pdl_enabled("cuda") == (torch.cuda.get_device_capability()[0] >= 9)


# compiled for sm_90 on any machine (w4_helpers.ptx_for_sm90)
_COMMON = dict(HAS_ZERO=False, SUB=32, EVEN_K=False, SPLIT_SUM="atomic")
W4_CASES = {  # name: (kernel in klaq.kernels.triton_w4a16, constexprs)
    "gemv_h2": ("_gemv_h2_kernel", dict(_COMMON, BLOCK_N=8, TILES=2, SPLIT=1, PAIR_GROUP=True, ASM=True,
                                        X_AHEAD=True, S_AHEAD=True, EARLY=False)),
    "gemv_h2 split-K": ("_gemv_h2_kernel", dict(_COMMON, BLOCK_N=32, TILES=2, SPLIT=4, PAIR_GROUP=True, ASM=True,
                                                X_AHEAD=True, S_AHEAD=False, EARLY=False)),
    "gemv_h2 early": ("_gemv_h2_kernel", dict(_COMMON, BLOCK_N=8, TILES=2, SPLIT=1, PAIR_GROUP=True, ASM=True,
                                              X_AHEAD=True, S_AHEAD=True, EARLY=True)),
    "gemv_h2 early, zero points": ("_gemv_h2_kernel", dict(_COMMON, HAS_ZERO=True, BLOCK_N=8, TILES=2, SPLIT=1,
                                                           PAIR_GROUP=False, ASM=True, X_AHEAD=True, S_AHEAD=True,
                                                           EARLY=True)),
    "gemv_wide": ("_gemv_wide_kernel", dict(_COMMON, BLOCK_N=8, TILES=4, SPLIT=1, EARLY=False)),
    "gemv_wide early": ("_gemv_wide_kernel", dict(_COMMON, BLOCK_N=8, TILES=4, SPLIT=1, EARLY=True)),
    "gemv": ("_gemv_kernel", dict(_COMMON, HAS_ZERO=True, BLOCK_M=1, BLOCK_N=64, SPLIT=4)),
}
OPS_CASES = {  # name: (kernel in klaq.runtime.triton_ops, signature, constexprs)
    "add_rmsnorm": ("_add_rmsnorm_kernel", dict(x_ptr="*fp32", d_ptr="*fp16", pw_ptr="*fp32", w_ptr="*fp32",
                                                out_ptr="*fp16", H="i32", eps="fp32"),
                    dict(HAS_DELTA=True, HAS_POST=True, BLOCK=1024)),
    "rope_qkv": ("_rope_qkv_kernel", dict(qkv_ptr="*fp16", b_ptr="*fp32", pos_ptr="*i64", cos_ptr="*fp32",
                                          sin_ptr="*fp32", qn_ptr="*fp32", kn_ptr="*fp32", q_ptr="*fp16",
                                          kc_ptr="*fp16", vc_ptr="*fp16", stride_qkv="i32", max_len="i32",
                                          eps="fp32"),
                 dict(H=9, HKV=3, D=64, HALF_BLOCK=32, ADJ=False, HAS_BIAS=True, HAS_QKNORM=True)),
    "decode_attention": ("_decode_attn_kernel", dict(q_ptr="*fp16", kc_ptr="*fp16", vc_ptr="*fp16",
                                                     pos_ptr="*i64", o_ptr="*fp16", max_len="i32", window="i32",
                                                     scale="fp32"),
                         dict(H=9, GROUP=3, D=64, BLOCK_D=64, BLOCK_N=128, LOCAL=True)),
    "act_mul": ("_act_mul_kernel", dict(gu_ptr="*fp16", out_ptr="*fp16", F="i32"), dict(GELU=True, BLOCK=1024)),
}


@pytest.fixture(scope="module")
def sm90_ptx():
    """PTX for sm_90 of every case, with PDL (and the prefetch on and off for the GEMVs), plus gemv_h2
    without PDL."""
    jobs = [(f"{name} prefetch={p} late={late}", "w4", fn, W4_SIG, dict(c, PDL=True, PREFETCH=p, PDL_LATE=late))
            for name, (fn, c) in W4_CASES.items() for p in (True, False) for late in (False, True)]
    fn, c = W4_CASES["gemv_h2"]
    jobs.append(("gemv_h2 off", "w4", fn, W4_SIG, dict(c, PDL=False, PREFETCH=True, PDL_LATE=True)))
    jobs += [(name, "ops", fn, sig, dict(c, PDL=True)) for name, (fn, sig, c) in OPS_CASES.items()]
    return ptx_for_sm90(jobs)


_REG = re.compile(r"%[a-z]+\d+")


def loaded_params(ptx: str, start: int = 0, end: int | None = None) -> set:
    """The pointer parameters (by index) from which the ``ld.global`` addresses in ``ptx[start:end]``
    derive: each address register traced back through the instructions that define it."""
    defs, params, addrs = {}, {}, []
    end = len(ptx) if end is None else end
    pos = 0
    for raw in ptx.splitlines(keepends=True):
        line = re.sub(r"^@!?%p\d+\s+", "", raw.strip())
        if m := re.match(r"ld\.param\.(?:b64|u64)\s+(%\w+), \[\w+_param_(\d+)\]", line):
            params[m[1]] = int(m[2])
        elif line.startswith("ld.global"):
            if start <= pos < end:
                addrs += _REG.findall(line[line.index("["):line.index("]")])
        elif (regs := _REG.findall(line)) and not line.startswith(("st.", "atom.", "red.", "setp")):
            defs.setdefault(regs[0], set()).update(regs[1:])
        pos += len(raw)
    found, todo, seen = set(), list(addrs), set()
    while todo:
        r = todo.pop()
        if r in seen:
            continue
        seen.add(r)
        if r in params:
            found.add(params[r])
        todo += defs.get(r, ())
    return found


def _check_order(ptx: str, prefetch: bool, late: bool = False, early: bool = False):
    """launch_dependents, then wait (``late``: wait, then the loop's loads, then launch_dependents);
    no store or atomic before the wait, and no global load either, except (``early``) of the weights
    and scales (parameters 1-3, never x, parameter 0); the bulk L2 prefetch (weights only) before it
    when asked for."""
    wait = ptx.index("griddepcontrol.wait")
    trigger = ptx.index("griddepcontrol.launch_dependents")
    assert ptx.count("griddepcontrol.launch_dependents") == 1
    if late:
        assert trigger > wait and re.search(r"\bld\.global", ptx[wait:trigger])
    else:
        assert trigger < wait
    before = ptx[:wait]
    assert not re.search(r"\b(st|atom|red)\.global", before), "memory written before the wait"
    if early:
        assert loaded_params(ptx, 0, wait) in ({1}, {1, 2}, {1, 2, 3}), loaded_params(ptx, 0, wait)  # weights
        assert 0 in loaded_params(ptx, wait)  # x, after the wait
    else:
        assert not re.search(r"\bld\.global", before), "memory read before the wait"
    assert ("cp.async.bulk.prefetch.L2.global" in before) == prefetch
    assert re.search(r"\bld\.global", ptx[wait:])


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("name", list(W4_CASES))
def test_gemv_waits_before_touching_memory(sm90_ptx, name, prefetch, late):
    _check_order(sm90_ptx[f"{name} prefetch={prefetch} late={late}"], prefetch, late, early="early" in name)


def test_trace_of_loaded_pointers(sm90_ptx):
    """The tracer behind the checks above sees each kind of load: the early variant's words, scales
    and offsets before the wait, the plain one's x, words and scales after it."""
    early = sm90_ptx["gemv_h2 early, zero points prefetch=False late=False"]
    assert loaded_params(early, 0, early.index("griddepcontrol.wait")) == {1, 2, 3}
    plain = sm90_ptx["gemv_h2 prefetch=False late=False"]
    assert loaded_params(plain) == {0, 1, 2}


def test_gemv_without_pdl_has_no_griddepcontrol(sm90_ptx):
    ptx = sm90_ptx["gemv_h2 off"]
    assert "griddepcontrol" not in ptx and "cp.async.bulk.prefetch" not in ptx


@pytest.mark.parametrize("name", list(OPS_CASES))
def test_runtime_ops_wait_before_touching_memory(sm90_ptx, name):
    _check_order(sm90_ptx[name], prefetch=False)


# -- on a GPU ----------------------------------------------------------------------------------

CHAIN = [  # (kernel, launch overrides): every GEMV path, split-K's atomics and counters included
    ("gemv_h2", dict()), ("gemv_h2", dict(split=4, block_n=32)), ("gemv_wide", dict(tiles=2)),
    ("gemv", dict(split=3)), ("gemv_h2", dict(prefetch=False)), ("gemv_wide", dict(split=2, block_n=4)),
    ("gemv_h2", dict(pdl_late=True, split=2)), ("gemv_h2", dict(early=True, s_ahead=True, x_ahead=True)),
    ("gemv_h2", dict(early=True, split=3, block_n=16, tiles=1)), ("gemv_wide", dict(early=True, tiles=4)),
]
ASYM = (3, 8)  # zero points: the fp32 GEMV's and one early gemv_h2's


def unit_gain(qw):
    """``qw`` scaled so that a GEMV keeps x's magnitude: ten random ones in a row would otherwise grow
    x past fp16's range. Symmetric codes of 0 become 8, so that (q - 8) has mean zero (a common mean
    would add up over all of K in every row), then the scales are divided by the weights' rms * sqrt(K)."""
    if qw.zeros is None:
        qw = replace(qw, codes=np.where(qw.codes == 0, 8, qw.codes))
    rms = np.sqrt(np.mean(qw.dequantize(np.float64) ** 2))
    return replace(qw, scales=(qw.scales / (rms * np.sqrt(qw.codes.shape[1]))).astype(np.float16))


@pytest.mark.parametrize("asym", [False, True])
def test_unit_gain_keeps_the_magnitude(asym):
    """Through the chain below (10 GEMVs at 4096) x stays within a factor 30 of its size."""
    x = np.random.default_rng(0).standard_normal(4096)
    y = x
    for i in range(len(CHAIN)):
        y = unit_gain(random_qweight(4096, 4096, 128, asym=asym, seed=i)).dequantize(np.float64) @ y
    assert 1 / 30 < np.linalg.norm(y) / np.linalg.norm(x) < 30


@gpu
@pytest.mark.parametrize("n,group_size", [(1600, 64), (4096, 128)])
def test_dependent_chain_in_a_graph_matches_eager(n, group_size):
    """Each GEMV reads the previous one's output: a PDL kernel that read x before its wait would see a
    stale or half-written x here, and the replay would differ from the eager chain."""
    if not pdl.pdl_supported("cuda"):
        pytest.skip("PDL needs compute capability 9.0+")
    ws = [repack(unit_gain(random_qweight(n, n, group_size, asym=(i in ASYM), seed=i)), "cuda")
          for i in range(len(CHAIN))]
    x0 = (torch.randn(1, n, device="cuda") * 0.5).half()

    def run(use_pdl: bool):
        x = x0
        for w, (kernel, cfg) in zip(ws, CHAIN, strict=True):
            x = w4a16_matmul(x, w, kernel=kernel, pdl=use_pdl, **cfg)
        return x

    want = [run(False) for _ in range(2)]
    assert torch.equal(want[0], want[1]) and torch.isfinite(want[0]).all()
    run(True)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = run(True)
    for _ in range(5):
        got.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want[0])
    assert torch.equal(run(True), want[0])  # eager PDL launches too
