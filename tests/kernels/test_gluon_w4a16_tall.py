"""The Hopper 128 x 256 GEMM (kernels/gluon_w4a16_tall.py) against the numpy reference.

Gluon has no interpreter mode: the kernel cases run on an sm_90 GPU only and skip elsewhere; the
launch rules run everywhere.
"""

import pytest
from w4_helpers import HAS_CUDA, check_cuda_kernel, random_qweight, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from klaq.kernels.numpy_ref import reference_matmul  # noqa: E402
from klaq.kernels.triton_w4a16 import repack  # noqa: E402

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 (Hopper) GPU")


def check(n, k, group_size, asym, m, seed=0, **config):
    from klaq.kernels.gluon_w4a16_tall import gemm_tall

    return check_cuda_kernel(gemm_tall, n, k, group_size, asym, m, seed, **config)


@hopper
@pytest.mark.parametrize("n,k,group_size", [(300, 576, 128), (576, 1536, 64), (576, 1536, 256),
                                            (1000, 4096 + 64, 128), (4096, 4096, 128)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [129, 256, 300, 513])
@pytest.mark.parametrize("programs", [None, 7, 1, 200])
def test_tall_shapes(n, k, group_size, asym, m, programs):
    """Ragged K (576 at groups 128 / 256, 4096 + 64), N off the 128-row tiles, M off the 256-token
    tiles; ``programs`` 7 and 1 give stream-K shares that start and end inside tiles, fixed up by
    each tile's first program (SPIN, at most one program per SM), 200 (more than the SMs) by the
    last to arrive. The same call twice gives the same bits and leaves no counter set."""
    from klaq.kernels.gluon_w4a16_tall import gemm_tall
    from klaq.kernels.triton_w4a16 import _WORKSPACES

    w, x, y = check(n, k, group_size, asym, m, seed=n + m, programs=programs, dp=0 if programs else None)
    assert torch.equal(y, gemm_tall(x, w, programs=programs, dp=0 if programs else None))
    assert not _WORKSPACES[x.device][1].any()


@hopper
@pytest.mark.parametrize("programs,dp", [(7, 3), (12, 5), (40, 2), (9, 9), (3, 100)])
def test_tall_whole_tiles_then_shares(programs, dp):
    check(1000, 4096 + 64, 128, True, 600, seed=programs, programs=programs, dp=dp)


@hopper
def test_tall_shares_repeat_bit_exactly():
    """14336 x 4096 at M = 256: 112 tiles shared by 132 programs (or the SMs there are): 100 calls
    give the same bits, so each tile's fixer always sees the other shares' stores."""
    from klaq.kernels.gluon_w4a16_tall import gemm_tall

    w = repack(random_qweight(14336, 4096, 128, False), "cuda")
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(2)).half().cuda()
    out = torch.stack([gemm_tall(x, w) for _ in range(100)])
    differ = (out != out[0]).flatten(1).any(dim=1)
    assert int(differ.sum()) == 0, f"{int(differ.sum())} of 100 calls differ from the first"


def test_tall_default_programs():
    """One program per output tile (stream-K only when asked for)."""
    tall = pytest.importorskip("klaq.kernels.gluon_w4a16_tall")

    assert tall.default_programs(112) == (112, 112)
    assert tall.default_programs(448) == (448, 448)


@pytest.mark.parametrize("stages", [0, 2, 3])
def test_tall_too_few_stages_is_refused_before_launch(stages):
    tall = pytest.importorskip("klaq.kernels.gluon_w4a16_tall")
    w = repack(random_qweight(64, 512, 128, False), "cpu")
    with pytest.raises(ValueError, match="stages must be at least 4"):
        tall.gemm_tall(torch.zeros(256, 512, dtype=torch.float16), w, stages=stages)


def test_tall_refuses_slices_under_32_codes():
    """Group 48 repacks to 16-code slices (block_k 128): half-slices of 8 codes are under one wgmma k16 step."""
    tall = pytest.importorskip("klaq.kernels.gluon_w4a16_tall")
    w = repack(random_qweight(64, 576, 48, False), "cpu")
    assert w.block_k == 128 and not tall.tall_ok(w)
    with pytest.raises(ValueError, match="block_k >= 256"):
        tall.gemm_tall(torch.zeros(256, 576, dtype=torch.float16), w)


def test_the_dispatch_rule():
    """More than 128 tokens, slices of at least 32 codes, and 128 x 256 tiles for two thirds of the SMs
    (88 of an H100's 132)."""
    tall = pytest.importorskip("klaq.kernels.gluon_w4a16_tall")

    def w(n, k, group_size=128):
        return repack(random_qweight(n, k, group_size, False), "cpu")

    big, mid, narrow = w(11264, 512), w(6144, 512), w(11264, 576, 48)
    assert tall.use_tall(256, big, 132)  # 88 tiles
    assert not tall.use_tall(256, w(11136, 512), 132)  # 87 tiles
    assert not tall.use_tall(128, big, 132)
    assert not tall.use_tall(256, mid, 132) and tall.use_tall(512, mid, 132)  # 48, then 96 tiles
    assert not tall.use_tall(1024, narrow, 132)  # block_k 128


@hopper
@pytest.mark.parametrize("n,m,taken", [(14336, 256, True), (6144, 256, False), (6144, 600, True)])
def test_the_dispatch_takes_tall_where_its_tiles_fill_the_sms(n, m, taken, monkeypatch):
    from klaq.kernels import gluon_w4a16_tall
    from klaq.kernels.triton_w4a16 import w4a16_matmul

    calls = []
    real = gluon_w4a16_tall.gemm_tall
    monkeypatch.setattr(gluon_w4a16_tall, "gemm_tall", lambda x, w: calls.append(x.shape) or real(x, w))
    qw = random_qweight(n, 1024, 128, True, seed=m)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).half()
    y = w4a16_matmul(x.cuda(), repack(qw, "cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert bool(calls) == (taken and 3 * -(-n // 128) * -(-m // 256) >= 2 * sms)
    assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw)) < 2e-3
