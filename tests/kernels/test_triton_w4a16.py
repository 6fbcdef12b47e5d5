"""Triton kernels against the numpy reference: on a GPU when present, else in the interpreter.

Interpreter runs are slow (every program is Python), so the CPU cases use few rows and short K;
the GPU cases add the big and ragged shapes.
"""

import numpy as np
import pytest
from w4_helpers import HAS_CUDA, W4_SIG, barrier_between, ptx_for_sm90, random_qweight, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from klaq.kernels.numpy_ref import reference_matmul  # noqa: E402
from klaq.kernels.triton_w4a16 import choose_block_k, repack, w4a16_matmul  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # seen: ~3e-4 and ~5e-3
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def check(n, k, group_size, asym, m, dtype=torch.float16, seed=0, **config):
    qw = random_qweight(n, k, group_size, asym, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = w4a16_matmul(x.to(DEVICE), repack(qw, DEVICE), **config)
    assert y.shape == (m, n) and y.dtype == dtype
    err = rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw))
    assert err < TOL[dtype], err


def test_repack_layout():
    """Slice i of a tile sits in nibble NIBBLE[i] of its words (pairs 2p, 2p + 1 in nibbles p, p + 4,
    one half2 apart); word j of slice i is code ``tile * BK + i * SUB + j``; padding codes are 0."""
    from klaq.kernels.triton_w4a16 import NIBBLE

    assert NIBBLE == (0, 4, 1, 5, 2, 6, 3, 7)
    qw = random_qweight(3, 200, 64, asym=False)
    w = repack(qw, "cpu")
    bk = w.block_k
    assert bk == choose_block_k(200, 64) == 256 and w.qweight.shape == (3, bk // 8)
    words = w.qweight.numpy().view(np.uint32)
    sub = bk // 8
    codes = (words[:, None, :] >> (4 * np.array(NIBBLE, dtype=np.uint32))[None, :, None]) & 15
    assert (codes.reshape(3, bk)[:, :200] == qw.codes).all() and (codes.reshape(3, bk)[:, 200:] == 0).all()
    assert sub == 32


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 33])
def test_odd_shapes(group_size, asym, m):
    """K = 576 is ragged at groups 128 and 256; N = 40 is not a multiple of any tile."""
    check(40, 576, group_size, asym, m, seed=m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,m", [("gemv", 1), ("gemv", 5), ("gemm", 3), ("gemm", 17)])
@pytest.mark.parametrize("split", [1, 3])
def test_both_kernels_split_k_and_dtypes(dtype, kernel, m, split):
    check(24, 320, 64, True, m, dtype, kernel=kernel, split=split)


NEW_PATHS = [("gemv_wide", 1, dict(block_n=8, tiles=2)), ("gemv_wide", 1, dict(block_n=4, tiles=4, split=2)),
             ("gemm_swap", 3, dict(block_m=16, block_n=16)), ("gemm_swap", 17, dict(block_m=16, block_n=32, split=2)),
             ("gemm_swap", 5, dict(block_m=16, block_n=16, split=3)), ("dequant", 5, {})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("kernel,m,config", NEW_PATHS, ids=lambda v: str(v))
def test_wide_swap_and_dequant_paths(kernel, m, config, asym, dtype):
    """K = 576 at group 64: BK = 256 gives 3 tiles, ragged against every TILES and split above."""
    check(40, 576, 64, asym, m, dtype, seed=m, kernel=kernel, **config)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("config", [dict(block_n=16), dict(block_n=8, split=3), dict(block_n=8, split=2, tiles=2), dict(block_n=8, tiles=4),
                                    dict(block_n=8, split=2, tiles=2, x_ahead=True), dict(block_n=8, tiles=4, x_ahead=True),
                                    dict(block_n=8, split=2, tiles=2, x_ahead=True, s_ahead=True)],
                         ids=str)
def test_gemv_h2(group_size, asym, config):
    """The half2 GEMV (M = 1, fp16): K = 576 is ragged at groups 128 and 256, N = 40 against any tile.

    On a GPU this runs the PTX; the interpreter runs ASM=False, the same fp16 roundings in tl ops.
    """
    check(40, 576, group_size, asym, 1, seed=group_size, kernel="gemv_h2", **config)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("ahead", [dict(x_ahead=True), dict(s_ahead=True), dict(x_ahead=True, s_ahead=True),
                                   dict(early=True), dict(early=True, s_ahead=True),
                                   dict(early=True, x_ahead=True, s_ahead=True)], ids=str)
def test_gemv_h2_loads_ahead_are_the_same_sum(asym, ahead):
    """Loading the next step's x, a step's four pairs of scales before any arithmetic, or the first
    step's words and scales before the loop (``early``, for PDL) changes when they arrive, not the
    sums: outputs equal bit for bit (K = 4160: steps of 2 tiles, the last ragged; split-K 3 gives
    programs of one step and of several)."""
    qw = random_qweight(24, 4096 + 64, 128, asym=asym, seed=7)
    x = torch.randn(1, 4096 + 64, generator=torch.Generator().manual_seed(7)).half().to(DEVICE)
    w = repack(qw, DEVICE)
    for cfg in (dict(block_n=8, tiles=4), dict(block_n=8, tiles=2, split=3), dict(block_n=8, tiles=2)):
        plain = dict(x_ahead=False, s_ahead=False)
        assert torch.equal(w4a16_matmul(x, w, kernel="gemv_h2", **cfg, **{**plain, **ahead}),
                           w4a16_matmul(x, w, kernel="gemv_h2", **cfg, **plain))


@pytest.mark.parametrize("asym", [False, True])
def test_gemv_wide_early_words_are_the_same_sum(asym):
    """gemv_wide's first step of words loaded before the loop (``early``, for PDL) gives the same
    outputs bit for bit: one step covering all of K, several steps, and split-K."""
    qw = random_qweight(20, 1536 + 64, 64, asym=asym, seed=3)
    x = torch.randn(1, 1536 + 64, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)
    w = repack(qw, DEVICE)
    for cfg in (dict(block_n=8, tiles=8), dict(block_n=4, tiles=2), dict(block_n=8, tiles=1, split=3)):
        assert torch.equal(w4a16_matmul(x, w, kernel="gemv_wide", early=True, **cfg),
                           w4a16_matmul(x, w, kernel="gemv_wide", **cfg))


@pytest.mark.parametrize("asym", [False, True])
def test_gemv_h2_large_activations(asym):
    """Products add up in half2 over few codes (8 with zero points; 4 words' (q - 8) / 4 * x / 2 when
    symmetric): outliers of 4000 (massive activations) stay finite and within the fp16 error bound."""
    qw = random_qweight(64, 1024, 128, asym=asym, seed=5)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(5)) * 30
    x[0, ::97] = 4000.0
    x = x.half()
    y = w4a16_matmul(x.to(DEVICE), repack(qw, DEVICE), kernel="gemv_h2", block_n=16)
    err = rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw))
    assert err < TOL[torch.float16], err


@pytest.mark.parametrize("m,dtype,match", [(2, torch.float16, "one row"), (1, torch.bfloat16, "fp16")])
def test_gemv_h2_rejects(m, dtype, match):
    qw = random_qweight(8, 64, 64, asym=False)
    with pytest.raises(ValueError, match=match):
        w4a16_matmul(torch.randn(m, 64).to(dtype).to(DEVICE), repack(qw, DEVICE), kernel="gemv_h2")


def test_dequantize_is_the_reference_weight():
    """The dequant path's weight is the contract's ``q * s - o`` rounded once to fp16."""
    from klaq.kernels.triton_w4a16 import dequantize

    qw = random_qweight(24, 576, 64, asym=True)
    w = dequantize(repack(qw, DEVICE), torch.float16).cpu().numpy()
    assert np.array_equal(w, qw.dequantize().astype(np.float16))


def test_gemv_wide_rejects_batches():
    qw = random_qweight(8, 64, 64, asym=False)
    with pytest.raises(ValueError, match="one row"):
        w4a16_matmul(torch.randn(2, 64).half().to(DEVICE), repack(qw, DEVICE), kernel="gemv_wide")


@pytest.mark.parametrize("m,kind", [(1, "gemv_wide"), (1, "gemv_h2"), (4, "gemm"), (16, "gemm"), (17, "gemm_swap"),
                                    (128, "gemm_swap"), (129, "dequant")])
def test_default_config_by_batch(m, kind):
    from klaq.kernels.triton_w4a16 import default_config

    assert default_config(m, 576 if kind == "gemv_wide" else 4096, 576 if kind == "gemv_wide" else 4096)["kernel"] == kind


def test_default_config_bf16_batch1_takes_the_fp32_gemv():
    """gemv_h2 computes in fp16: bf16 activations (wider range) keep the fp32 GEMV."""
    from klaq.kernels.triton_w4a16 import default_config

    assert default_config(1, 4096, 4096, torch.bfloat16)["kernel"] == "gemv"
    assert default_config(1, 4096, 4096, torch.float16)["kernel"] == "gemv_h2"


@pytest.mark.parametrize("n,k,launch", [
    (4096, 4096, dict(block_n=8, tiles=2, split=1, s_ahead=True)),
    (6144, 4096, dict(block_n=16, tiles=4, split=1, s_ahead=True)),
    (14336, 4096, dict(block_n=16, tiles=4, split=1, s_ahead=True)),
    (4096, 14336, dict(block_n=32, tiles=2, split=4, s_ahead=False)),
])
def test_gemv_h2_launch_table(n, k, launch):
    """M = 1 launch parameters on the Llama-3-8B shapes, as chosen on an H100 (default_config's
    docstring has the times): a changed rule must be re-measured, not slipped in."""
    from klaq.kernels.triton_w4a16 import default_config

    cfg = default_config(1, n, k)
    assert cfg["kernel"] == "gemv_h2" and cfg["x_ahead"] and cfg["num_warps"] == 4
    assert {key: cfg[key] for key in launch} == launch


@pytest.mark.parametrize("n,k,launch", [
    (4096, 4096, dict(block_n=64, split=4)),
    (6144, 4096, dict(block_n=64, split=4)),
    (14336, 4096, dict(block_n=128, split=2)),
    (4096, 14336, dict(block_n=64, split=4)),
    (49152, 576, dict(block_n=64, split=4)),  # a wide head over short K: not measured, the usual launch
])
@pytest.mark.parametrize("m", [2, 16])
def test_gemm_launch_table(n, k, launch, m):
    """M = 2-16 launch parameters on the Llama-3-8B shapes, as chosen on an H100 (14336 x 4096 at
    M = 16: 28.9 -> 24.3 us with 128 rows x 2 K-splits; bench/results/gemm_m16_sweep_h100.jsonl)."""
    from klaq.kernels.triton_w4a16 import default_config

    cfg = default_config(m, n, k)
    assert cfg["kernel"] == "gemm" and cfg["block_m"] == 16
    assert {key: cfg[key] for key in launch} == launch


@pytest.mark.parametrize("asym", [False, True])
def test_gemm_tall_blocks_two_splits(asym):
    """The wide-N M = 2-16 launch (128 rows, 2 K-splits) on N off the block, ragged K."""
    check(200, 1536 + 64, 64, asym, 5, kernel="gemm", block_m=16, block_n=128, split=2, num_warps=4, num_stages=3)


def test_long_ragged_k():
    check(16, 4096 + 64, 128, True, 1, kernel="gemv", block_n=16)
    check(16, 4096 + 64, 128, True, 1, kernel="gemv_h2", block_n=16)


@gpu
@pytest.mark.parametrize("n,k,group_size", [(300, 576, 128), (300, 576, 32), (576, 1536, 256), (576, 1536, 64),
                                            (1000, 4096 + 64, 128), (4096, 4096, 128)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 33, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_shapes(n, k, group_size, asym, m, dtype):
    check(n, k, group_size, asym, m, dtype, seed=n + m)


@gpu
@pytest.mark.parametrize("kernel", ["gemv", "gemv_h2", "gemv_wide", "gemm", "gemm_swap"])
@pytest.mark.parametrize("split", [1, 2, 4, 8])
@pytest.mark.parametrize("block_n", [8, 16, 32, 64, 128])
def test_gpu_configs(kernel, split, block_n):
    m = {"gemv": 4, "gemv_wide": 1, "gemv_h2": 1}.get(kernel, 24)
    extra = dict(tiles=max(1, 64 // block_n)) if kernel == "gemv_wide" else dict(block_m=4 if kernel == "gemv" else 32)
    check(1000, 4096 + 64, 128, True, m, kernel=kernel, split=split, block_n=block_n, **extra)
    if kernel == "gemv_h2":
        check(1000, 4096 + 64, 128, False, m, kernel=kernel, split=split, block_n=block_n)


@pytest.mark.parametrize("how,split", [("atomic", 2), ("slots", 4)])
def test_split_k_calls_repeat_and_leave_the_workspace_clean(monkeypatch, how, split):
    """Each tile's last program resets its counter (and, adding atomically, zeroes the workspace), so
    calls repeat bit-exactly: with atomics a 2-way split (two partials added to zero, in either
    order), with slots (added in split order) any split."""
    from klaq.kernels import triton_w4a16

    monkeypatch.setattr(triton_w4a16, "_SPLIT_SUM", how)
    monkeypatch.setattr(triton_w4a16, "_WORKSPACES", {})  # slots leave theirs non-zero
    qw = random_qweight(40, 576, 64, asym=True)
    w = repack(qw, DEVICE)
    x = torch.randn(3, 576).half().to(DEVICE)
    for kernel in ("gemv", "gemm"):
        first = w4a16_matmul(x, w, kernel=kernel, split=split)
        assert torch.equal(first, w4a16_matmul(x, w, kernel=kernel, split=split))
        assert rel_err(first.float().cpu().numpy(), reference_matmul(x.float().cpu().numpy(), qw)) < TOL[torch.float16]
        ws, counters = triton_w4a16._WORKSPACES[x.device]
        assert not counters.any() and (how == "slots" or not ws.any())


SPLIT_LAUNCHES = [  # (N, K, M, launch, how): atomics add 2-way splits (order-free), slots any split
    (14336, 4096, 4, dict(kernel="gemm", block_m=16, block_n=128, split=2, num_warps=4, num_stages=3), "atomic"),
    (14336, 4096, 4, dict(kernel="gemm", block_m=16, block_n=128, split=2, num_warps=4, num_stages=3),
     "atomic_masked"),
    (4096, 14336, 1, dict(kernel="gemv_h2", block_n=32, tiles=2, split=2, num_warps=4, num_stages=1), "atomic"),
    (4096, 4096, 16, dict(kernel="gemm", block_m=16, block_n=64, split=4, num_warps=4, num_stages=3), "slots"),
    (4096, 14336, 1, dict(kernel="gemv_h2", block_n=32, tiles=2, split=4, num_warps=4, num_stages=1), "slots"),
    (14336, 4096, 3, dict(kernel="gemv", block_n=64, split=4, num_warps=4, num_stages=1), "slots"),
]


@gpu
@pytest.mark.parametrize("n,k,m,launch,how", SPLIT_LAUNCHES,
                         ids=lambda v: v["kernel"] if isinstance(v, dict) else str(v))
def test_gpu_split_k_calls_repeat_bit_exactly(monkeypatch, n, k, m, launch, how):
    """Many calls of a large split-K launch give the same bits: each tile's last program sees every
    partial (H100, 14336 x 4096, M = 4: 15-17 of 400 calls wrong while it read the atomic sums with
    a .cg load, bench/results/splitk_race_h100.txt)."""
    from klaq.kernels import triton_w4a16

    monkeypatch.setattr(triton_w4a16, "_SPLIT_SUM", how)
    monkeypatch.setattr(triton_w4a16, "_WORKSPACES", {})  # slots leave theirs non-zero
    qw = random_qweight(n, k, 128, asym=False)
    w = repack(qw, DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
    calls = 300
    out = torch.stack([w4a16_matmul(x, w, pdl=False, **launch) for _ in range(calls)])
    differ = (out != out[0]).flatten(1).any(dim=1)
    assert int(differ.sum()) == 0, f"{int(differ.sum())} of {calls} calls differ from the first"
    assert rel_err(out[0].float().cpu().numpy(), reference_matmul(x.float().cpu().numpy(), qw)) < TOL[torch.float16]


_SPLIT_COMMON = dict(HAS_ZERO=False, SUB=32, EVEN_K=False, SPLIT=2)  # and SPLIT_SUM, per test
_PDL_OFF = dict(PDL=False, PREFETCH=False, PDL_LATE=False)
SPLIT_KERNELS = {  # name: (kernel in klaq.kernels.triton_w4a16, constexprs), each with split-K
    "gemm": ("_gemm_kernel", dict(_SPLIT_COMMON, BLOCK_M=16, BLOCK_N=64, DOT_F32=False, H2=True, PAIR_GROUP=True)),
    "gemv_h2": ("_gemv_h2_kernel", dict(_SPLIT_COMMON, BLOCK_N=8, TILES=2, PAIR_GROUP=True, ASM=True, X_AHEAD=True,
                                        S_AHEAD=False, EARLY=False, **_PDL_OFF)),
    "gemv": ("_gemv_kernel", dict(_SPLIT_COMMON, BLOCK_M=1, BLOCK_N=64, **_PDL_OFF)),
}


@pytest.mark.parametrize("how", ["slots", "atomic"])
def test_split_k_publishes_its_writes_by_barrier_then_one_release(how):
    """In the sm_90 PTX of each split-K kernel, a program's workspace writes are published the way
    cooperative groups' grid sync does it: a CTA barrier after every thread's last write, then the
    tile's counter bumped by one thread with an acq_rel atomic (no per-thread ``fence.acq_rel.gpu``:
    it cost 6-8% at M = 16); the last program crosses a barrier after the counter before it reads
    the partials: with ``slots`` by L2 loads of the other slots (and no float atomics anywhere),
    with ``atomic`` by atomics, not loads (compiled on CPU, no GPU needed)."""
    jobs = [(name, "w4", fn, W4_SIG, dict(consts, SPLIT_SUM=how)) for name, (fn, consts) in SPLIT_KERNELS.items()]
    for name, ptx in ptx_for_sm90(jobs).items():
        lines = ptx.splitlines()
        fadds = [i for i, s in enumerate(lines) if ("red.global" in s or "atom.global" in s) and ".add.f32" in s]
        count = [i for i, s in enumerate(lines) if "atom.global" in s and ".add.u32" in s]
        assert len(count) == 1 and ".acq_rel" in lines[count[0]], name
        assert lines[count[0]].strip().startswith("@"), name  # one thread bumps the counter
        assert not any("fence.acq_rel.gpu" in s for s in lines), name
        if how == "atomic":
            writes = [i for i in fadds if i < count[0]]
            reads = [i for i in fadds if i > count[0]]
        else:
            assert not fadds, name
            stores = [i for i, s in enumerate(lines) if s.strip().lstrip("@%p0123456789 ").startswith("st.global")]
            writes = [i for i in stores if i < count[0]]
            reads = [i for i, s in enumerate(lines) if "ld.global.cg" in s and i > count[0]]
        assert writes and reads, name
        assert barrier_between(lines, max(writes), count[0]), name
        assert barrier_between(lines, count[0], min(reads)), name


@pytest.mark.parametrize("how", ["atomic", "atomic_masked", "slots"])
def test_split_k_sums_over_a_partial_row_tile(monkeypatch, how):
    """Every way of adding up split-K (``triton_w4a16._SPLIT_SUM``) over a row tile that M leaves
    partly empty (the M = 4 race, bench/results/splitk_race_h100.txt) launches x as it is, returns
    the M rows asked for and leaves the counters (and the atomic sums' workspace) zero."""
    from klaq.kernels import triton_w4a16

    real, seen = triton_w4a16._gemm_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((args[7], kw["BLOCK_M"], kw["SPLIT"], kw["SPLIT_SUM"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(triton_w4a16, "_gemm_kernel", Spy())
    monkeypatch.setattr(triton_w4a16, "_SPLIT_SUM", how)
    monkeypatch.setattr(triton_w4a16, "_WORKSPACES", {})  # slots leave theirs non-zero
    qw = random_qweight(40, 576, 64, asym=False)
    w = repack(qw, DEVICE)
    for m, split in [(3, 2), (3, 1), (16, 2)]:
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).half()
        y = w4a16_matmul(x.to(DEVICE), w, kernel="gemm", block_m=16, block_n=32, split=split)
        assert seen.pop() == (m, 16, split, how) and y.shape == (m, 40)
        assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw)) < TOL[torch.float16]
        ws, counters = triton_w4a16._WORKSPACES[y.device]
        assert not counters.any() and (how == "slots" or not ws.any())
