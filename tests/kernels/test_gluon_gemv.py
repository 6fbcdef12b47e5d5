"""The Hopper Gluon GEMVs (kernels/gluon_gemv.py: ``gemv_tma``, ``gemv_reg``) against the numpy reference.

Gluon has no interpreter mode: the kernel cases run on an sm_90 GPU only and skip elsewhere; the
rules that pick it and size its ring run everywhere.
"""

import pytest
from w4_helpers import HAS_CUDA, falls_back_once, random_qweight, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from klaq.kernels.numpy_ref import reference_matmul  # noqa: E402
from klaq.kernels.triton_w4a16 import repack, w4a16_matmul  # noqa: E402

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 (Hopper) GPU")
gluon_gemv = pytest.importorskip("klaq.kernels.gluon_gemv")


def check(n, k, group_size, seed=0, x_scale=1.0, kernel="gemv_tma", **config):
    qw = random_qweight(n, k, group_size, False, seed=seed)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).half() * x_scale
    w = repack(qw, "cuda")
    y = getattr(gluon_gemv, kernel)(x.cuda(), w, **config)
    assert y.shape == (1, n) and y.dtype == torch.float16
    err = rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw))
    assert err < 2e-3, err
    return w, x.cuda(), y


@hopper
@pytest.mark.parametrize("n,k,group_size", [(300, 576, 128), (576, 1536, 128), (576, 1536, 256),
                                            (1000, 4096 + 64, 128), (4096, 4096, 128), (100, 14336, 128)])
@pytest.mark.parametrize("config", [dict(block_n=8, wr=1, wq=4), dict(block_n=8, wr=1, wq=1),
                                    dict(block_n=16, wr=2, wq=2), dict(block_n=4, wr=1, wq=2),
                                    dict(block_n=4, wr=1, wq=4, rb=2), dict(block_n=8, wr=1, wq=4, rb=3)])
def test_gemv_tma_shapes(n, k, group_size, config):
    """Ragged K (576, 4096 + 64: chunks past the row are zero-filled by TMA), N off the row blocks
    (with several row blocks per program, whole blocks past N), long K with a ring shorter than the
    program's tiles, groups 128 and 256."""
    check(n, k, group_size, seed=n + k, **config)


@hopper
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_gemv_tma_ring_shorter_than_the_row(stages):
    """Chunks refill their stage once every warp has read it: 1 to 3 stages over 9 chunks."""
    w, x, y = check(700, 4096 + 512, 128, wq=1, stages=stages)
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, wq=1))


@hopper
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_gemv_tma_ring_over_row_blocks(stages):
    """With 3 row blocks of 2 chunks each, a stage is refilled with the next row block's chunk: the
    same sums as with every tile in flight."""
    w, x, y = check(300, 2048, 128, block_n=4, wq=2, rb=3, stages=stages)
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, block_n=4, wq=2, rb=3))
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, block_n=4, wq=2))


@hopper
@pytest.mark.parametrize("config", [dict(), dict(block_n=4, wq=2, rb=3), dict(wq=1, stages=2)])
def test_gemv_tma_scales_before_or_after_the_wait_are_the_same_sum(config):
    """The first tile's scales loaded before the PDL wait (the default) or after it, as the others'."""
    w, x, y = check(500, 4096 + 64, 128, pdl=True, **config)
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, pdl=True, early_scales=False, **config))


@hopper
def test_gemv_tma_large_activations_stay_finite():
    """x of magnitude 4000: the half2 sums hold (q - 8) / 4 times x / 2, far from fp16's limit."""
    check(512, 4096, 128, x_scale=4000.0)


@hopper
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_tma_with_and_without_pdl_is_the_same_sum(pdl):
    w, x, y = check(1024, 2048, 128, pdl=pdl)
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, pdl=not pdl))


@hopper
@pytest.mark.parametrize("n,k,group_size", [(300, 576, 128), (576, 1536, 128), (576, 1536, 256),
                                            (1000, 4096 + 64, 128), (4096, 4096, 128), (1001, 6144, 128),
                                            (100, 14336, 128)])
@pytest.mark.parametrize("config", [dict(), dict(block_n=8), dict(block_n=4, wq=2), dict(block_n=16, wr=2, wq=2),
                                    dict(block_n=2, wq=1)])
def test_gemv_reg_shapes(n, k, group_size, config):
    """Ragged K (576; 4096 + 64 and 6144 as two chunks, the second partly past the row: masked words
    and x), N off the row blocks, long K as four chunks, groups 128 and 256, five launches."""
    check(n, k, group_size, seed=n + k, kernel="gemv_reg", **config)


@hopper
@pytest.mark.parametrize("n,k", [(1000, 4096), (4096, 4096), (300, 576)])
def test_gemv_reg_is_gemv_tma_where_a_row_is_one_chunk(n, k):
    """The same quads, pairs and sums in the same order as the TMA kernel: the same bits."""
    w, x, y = check(n, k, 128, kernel="gemv_reg")
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, pdl=False))


@hopper
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_reg_with_and_without_pdl_is_the_same_sum(pdl):
    w, x, y = check(1024, 2048, 128, kernel="gemv_reg", pdl=pdl)
    assert torch.equal(y, gluon_gemv.gemv_reg(x, w, pdl=not pdl))


@hopper
def test_gemv_reg_large_activations_stay_finite():
    check(512, 4096, 128, x_scale=4000.0, kernel="gemv_reg")


@hopper
def test_gemv_reg_read_floor_is_the_sum_of_the_words():
    """compute=False (the benchmarks' read floor) reads every word once: each row's output is the sum
    of its words (small words here, so the sum is exact in fp16)."""
    w = repack(random_qweight(300, 1536, 128, False), "cuda")
    w.qweight = torch.randint(0, 4, tuple(w.qweight.shape), generator=torch.Generator().manual_seed(4),
                              dtype=torch.int32).cuda()
    y = gluon_gemv.gemv_reg(torch.zeros(1, 1536, dtype=torch.float16, device="cuda"), w, compute=False)
    assert torch.equal(y.view(-1), w.qweight.sum(dim=1).half())


def test_gemv_reg_rows_per_thread_must_be_a_power_of_two():
    w = repack(random_qweight(64, 512, 128, False), "cpu")
    with pytest.raises(ValueError, match="power of two"):
        gluon_gemv.gemv_reg(torch.zeros(1, 512, dtype=torch.float16), w, block_n=12, wr=1)


def test_gemv_tma_takes_only_what_it_can():
    """Symmetric weights with both slices of a pair in one group, fp16, on Hopper; zero points,
    group 64 (pairs straddle groups), bf16 and CPU tensors go elsewhere."""
    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.zeros(1, 1024, dtype=torch.float16, device=device)
    sym = repack(random_qweight(64, 1024, 128, False), device)
    assert gluon_gemv.gemv_tma_ok(x, sym) == HOPPER
    assert not gluon_gemv.gemv_tma_ok(x, repack(random_qweight(64, 1024, 128, True), device))
    assert not gluon_gemv.gemv_tma_ok(x, repack(random_qweight(64, 1024, 64, False), device))
    assert not gluon_gemv.gemv_tma_ok(x.bfloat16(), sym)
    assert not gluon_gemv.gemv_tma_ok(x.cpu(), repack(random_qweight(64, 1024, 128, False), "cpu"))


def test_ring_holds_the_row_or_what_fits():
    """All of a program's tiles (row blocks x chunks) in flight, or as many as 96 KB (or the given
    budget) hold; an asked count is a cap."""
    assert gluon_gemv.stages_for(512, 8, 4) == 1  # K = 4096 in one 16 KB chunk
    assert gluon_gemv.stages_for(512, 8, 1) == 4  # four 4 KB chunks
    assert gluon_gemv.stages_for(1792, 8, 1) == 14  # K = 14336: 56 KB
    assert gluon_gemv.stages_for(1792, 32, 1) == 6  # 16 KB chunks: 96 KB
    assert gluon_gemv.stages_for(1792, 8, 1, stages=3) == 3
    assert gluon_gemv.stages_for(64, 8, 4) == 1
    assert gluon_gemv.stages_for(512, 4, 4, rb=4) == 4  # four row blocks of one 8 KB chunk
    assert gluon_gemv.stages_for(512, 8, 4, rb=8) == 6  # 96 KB of 16 KB tiles
    assert gluon_gemv.stages_for(512, 8, 4, rb=8, max_smem=200 * 1024) == 8


def test_launch_keeps_the_programs_in_one_wave():
    """8-row programs (5 per SM) unless, with PDL, they overflow a wave that 4-row x 2 programs (7 per
    SM) fill."""
    assert gluon_gemv.config_for(4096, 132) == gluon_gemv.DEFAULT_CONFIG == (8, 1, 4, 1)  # 512 programs
    assert gluon_gemv.config_for(6144, 132) == gluon_gemv.NARROW_CONFIG == (4, 1, 4, 2)  # 768
    assert gluon_gemv.config_for(14336, 132) == gluon_gemv.DEFAULT_CONFIG  # 1792: neither fits
    assert gluon_gemv.config_for(660 * 8, 132) == gluon_gemv.DEFAULT_CONFIG
    assert gluon_gemv.config_for(660 * 8 + 1, 132) == gluon_gemv.NARROW_CONFIG
    assert gluon_gemv.config_for(924 * 8, 132) == gluon_gemv.NARROW_CONFIG
    assert gluon_gemv.config_for(924 * 8 + 1, 132) == gluon_gemv.DEFAULT_CONFIG
    assert gluon_gemv.config_for(6144, 78) == gluon_gemv.DEFAULT_CONFIG  # fewer SMs: neither fits
    assert gluon_gemv.config_for(6144, 132, pdl=False) == gluon_gemv.DEFAULT_CONFIG  # no next kernel to let in


@hopper
def test_gemv_tma_narrow_and_default_launches_are_the_same_sum():
    """4 rows per thread in two row blocks or 8 rows in one: each row's quads are summed the same way
    in the same order (the quads' layout is the same), so PDL's choice of launch changes no bit."""
    w, x, y = check(1000, 4096 + 64, 128, block_n=8, wr=1, wq=4, rb=1)
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, block_n=4, wr=1, wq=4, rb=2))


@hopper
def test_gemv_tma_default_launch_is_config_for(monkeypatch):
    """With no launch given the rows and the SM count pick it (:func:`config_for`); with any part
    given, the rest is DEFAULT_CONFIG's. A layer in the narrow band gives the asked launch's bits."""
    from klaq.kernels.gluon_w4a16 import _sm_count
    sms = _sm_count(torch.device("cuda"))
    n = 6 * 8 * sms
    calls = []
    real = gluon_gemv.config_for
    monkeypatch.setattr(gluon_gemv, "config_for", lambda n, sms, pdl: calls.append((n, sms, pdl)) or real(n, sms, pdl))
    w, x, y = check(n, 1024, 128, pdl=True)
    assert calls == [(n, sms, True)] and real(n, sms) == gluon_gemv.NARROW_CONFIG
    bn, wr, wq, rb = gluon_gemv.NARROW_CONFIG
    assert torch.equal(y, gluon_gemv.gemv_tma(x, w, block_n=bn, wr=wr, wq=wq, rb=rb, pdl=True))
    gluon_gemv.gemv_tma(x, w, block_n=8)
    assert len(calls) == 1


def test_rows_per_thread_must_be_a_power_of_two():
    w = repack(random_qweight(64, 512, 128, False), "cpu")
    with pytest.raises(ValueError, match="power of two"):
        gluon_gemv.gemv_tma(torch.zeros(1, 512, dtype=torch.float16), w, block_n=12, wr=1)


@hopper
@pytest.mark.parametrize("pdl,asym,expected", [(True, False, 1), (False, False, 1), (True, True, 0)])
def test_dispatch_takes_the_register_gemv(pdl, asym, expected, monkeypatch):
    """M = 1, fp16, a layer past gemv_wide's size on Hopper (by default): the register-load Gluon GEMV
    for symmetric weights, with PDL or without, gemv_h2 otherwise; both match the reference."""
    monkeypatch.delenv("KLAQ_TMA_GEMV", raising=False)
    calls = []
    real = gluon_gemv.gemv_reg
    monkeypatch.setattr(gluon_gemv, "gemv_reg", lambda x, w, **kw: calls.append(kw) or real(x, w, **kw))
    monkeypatch.setattr(gluon_gemv, "gemv_tma", lambda x, w, **kw: calls.append("tma"))
    qw = random_qweight(2048, 2048, 128, asym)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(1)).half()
    y = w4a16_matmul(x.cuda(), repack(qw, "cuda"), pdl=pdl)
    assert len(calls) == expected
    assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw)) < 2e-3


@pytest.mark.parametrize("kernel", ["gemv_tma", "gemv_reg"])
def test_forcing_a_gluon_gemv_off_hopper_is_a_clear_error(kernel):
    if HOPPER:
        pytest.skip("the kernel runs here")
    w = repack(random_qweight(64, 1024, 128, False), "cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ValueError, match=f"{kernel} kernel needs .* sm_90"):
        w4a16_matmul(torch.zeros(1, 1024, dtype=torch.float16, device=w.qweight.device), w, kernel=kernel)


@hopper
@pytest.mark.parametrize("kernel", ["gemv_tma", "gemv_reg"])
def test_either_gluon_gemv_by_name(kernel):
    qw = random_qweight(600, 2048, 128, False)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(3)).half()
    y = w4a16_matmul(x.cuda(), repack(qw, "cuda"), kernel=kernel)
    assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw)) < 2e-3


@hopper
@pytest.mark.parametrize("n,k,env", [(512, 8192, None), (2048, 2048, "0")])
def test_dispatch_keeps_gemv_h2_for_long_k_or_when_off(n, k, env, monkeypatch):
    if env is None:
        monkeypatch.delenv("KLAQ_TMA_GEMV", raising=False)
    else:
        monkeypatch.setenv("KLAQ_TMA_GEMV", env)
    calls = []
    monkeypatch.setattr(gluon_gemv, "gemv_tma", lambda x, w, **kw: calls.append(kw))
    monkeypatch.setattr(gluon_gemv, "gemv_reg", lambda x, w, **kw: calls.append(kw))
    qw = random_qweight(n, k, 128, False)
    w4a16_matmul(torch.zeros(1, k, dtype=torch.float16, device="cuda"), repack(qw, "cuda"), pdl=True)
    assert calls == []


def test_tma_default_rule(monkeypatch):
    """On below K = 8192 (long K was slower than gemv_h2), off with KLAQ_TMA_GEMV=0."""
    from klaq.kernels.triton_w4a16 import tma_gemv_default

    monkeypatch.delenv("KLAQ_TMA_GEMV", raising=False)
    assert tma_gemv_default(4096) and tma_gemv_default(576) and not tma_gemv_default(8192)
    monkeypatch.setenv("KLAQ_TMA_GEMV", "0")
    assert not tma_gemv_default(4096)


def test_a_gluon_gemv_that_cannot_build_falls_back_once(monkeypatch):
    """Where the Gluon GEMV fails to build or launch (another Triton's Gluon API), the call warns,
    takes gemv_h2 and never tries the kernel again in this process."""
    from klaq.kernels import triton_w4a16

    monkeypatch.delenv("KLAQ_TMA_GEMV", raising=False)
    h2 = dict(kernel="gemv_h2", block_n=8, tiles=2, split=1, num_warps=4, num_stages=1)  # as for large layers
    monkeypatch.setattr(triton_w4a16, "default_config", lambda m, n, k, dtype=None: dict(h2))
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(2)).half()
    falls_back_once(monkeypatch, "_TMA", "gemv_reg", "tma_gemv_ok", random_qweight(64, 1024, 128, False), x,
                    "Gluon GEMV is unavailable")
