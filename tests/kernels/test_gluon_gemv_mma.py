"""The tensor-core M = 1 GEMV (kernels/gluon_gemv_mma.py) against the numpy reference.

Gluon has no interpreter mode: the kernel cases run on an sm_80+ GPU only and skip elsewhere; its
arithmetic (numpy :func:`emulate`), the rule that takes it and its sm_90a build run everywhere.
"""

import numpy as np
import pytest
from w4_helpers import HAS_CUDA, check_cuda_kernel, random_qweight, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from klaq.kernels.numpy_ref import reference_matmul  # noqa: E402
from klaq.kernels.triton_w4a16 import repack  # noqa: E402

gemv_mma = pytest.importorskip("klaq.kernels.gluon_gemv_mma")
MMA_GPU = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 8
gpu = pytest.mark.skipif(not MMA_GPU, reason="needs an sm_80+ GPU")


@pytest.mark.parametrize("n,k,group_size", [(48, 4096, 128), (33, 4096 + 64, 256), (16, 1536, 128),
                                            (20, 14336, 128)])
@pytest.mark.parametrize("outlier", [False, True])
def test_emulated_arithmetic_matches_the_reference(n, k, group_size, outlier):
    """The kernel's algebra in numpy: fp32 sums of (1024 + q) x and (1024 + 16 q) x, unbiased by the sum
    of x and scaled per group, equal the dequantized product to fp32 rounding (ragged K, groups of
    two pairs, x of 4000)."""
    qw = random_qweight(n, k, group_size, False, seed=n)
    w = repack(qw, "cpu")
    assert w.block_k == 512
    x = np.random.default_rng(n).standard_normal(k).astype(np.float16)
    if outlier:
        x[k // 3] = 4000
    got = gemv_mma.emulate(x, w.qweight.numpy(), w.scales.numpy(), group_size)
    ref = reference_matmul(x[None].astype(np.float32), qw)[0]
    assert rel_err(got, ref) < 1e-4


def test_emulate_sees_every_nibble():
    """A code changed in any of the 8 slices of a word changes exactly its row's result."""
    qw = random_qweight(4, 512, 128, False, seed=3)
    x = np.random.default_rng(3).standard_normal(512).astype(np.float16)
    w0 = repack(qw, "cpu")
    base = gemv_mma.emulate(x, w0.qweight.numpy(), w0.scales.numpy(), 128)
    for s in range(8):
        codes = qw.codes.copy()
        codes[2, s * 64 + 5] ^= 0xF
        w = repack(type(qw)(codes, qw.scales, None, 4, 128), "cpu")
        got = gemv_mma.emulate(x, w.qweight.numpy(), w.scales.numpy(), 128)
        assert np.array_equal(got[[0, 1, 3]], base[[0, 1, 3]]) and got[2] != base[2]


def test_parity_constants():
    """LOP3 with 0x64006400 makes 1024 + q (even nibbles) or 1024 + 16 q (odd): (1024 + q) - 1032 and
    (1024 + 16 q) / 16 - 72 are q - 8."""
    for odd, (_, bias, scale) in gemv_mma.PARITY.items():
        for q in range(16):
            v = 1024 + (16 * q if odd else q)
            assert v * scale - bias == q - 8


def test_warps_for():
    assert [gemv_mma.warps_for(t) for t in (1, 2, 3, 8, 28)] == [1, 2, 4, 8, 8]


def check(n, k, group_size, seed=0, **config):
    """``gemv_mma`` against the numpy reference for one fp16 row (w4_helpers.check_cuda_kernel)."""
    return check_cuda_kernel(gemv_mma.gemv_mma, n, k, group_size, False, 1, seed=seed, **config)


@gpu
@pytest.mark.parametrize("n,k,group_size", [(16, 512, 128), (300, 1536, 128), (1000, 4096 + 64, 256),
                                            (4096, 4096, 128), (100, 14336, 128), (4100, 4096, 128)])
@pytest.mark.parametrize("warps", [None, 1, 4])
def test_gemv_mma_shapes(n, k, group_size, warps):
    """Ragged K (4096 + 64), N off the 16-row programs, long K over several tiles per warp, groups of
    one and two pairs, fewer warps than tiles."""
    check(n, k, group_size, seed=n + k, warps=warps)


@gpu
def test_gemv_mma_outliers_and_repeats():
    """x of 4000 stays within fp32's range; the same call gives the same bits, with PDL or without."""
    w, x, y = check(512, 4096, 128, seed=7)
    x[0, 100] = 4000
    y = gemv_mma.gemv_mma(x, w, pdl=False)
    qw = random_qweight(512, 4096, 128, False, seed=7)
    assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().cpu().numpy(), qw)) < 2e-3
    assert torch.equal(y, gemv_mma.gemv_mma(x, w, pdl=False))
    if torch.cuda.get_device_capability()[0] >= 9:
        assert torch.equal(y, gemv_mma.gemv_mma(x, w, pdl=True))


@gpu
def test_gemv_mma_ok_rule():
    x = torch.randn(1, 4096, device="cuda").half()
    assert gemv_mma.gemv_mma_ok(x, repack(random_qweight(64, 4096, 128, False), "cuda"))
    assert not gemv_mma.gemv_mma_ok(x, repack(random_qweight(64, 4096, 64, False), "cuda"))
    assert not gemv_mma.gemv_mma_ok(x, repack(random_qweight(64, 4096, 128, True), "cuda"))
    assert not gemv_mma.gemv_mma_ok(x.bfloat16(), repack(random_qweight(64, 4096, 128, False), "cuda"))
