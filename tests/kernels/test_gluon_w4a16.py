"""The Hopper wgmma kernel (kernels/gluon_w4a16.py) against the numpy reference.

Gluon has no interpreter mode: the kernel cases run on an sm_90 GPU only and skip elsewhere; the
dispatch rule that keeps every other machine off this path runs everywhere.
"""

from pathlib import Path

import pytest
from w4_helpers import (
    HAS_CUDA,
    barrier_between,
    check_cuda_kernel,
    falls_back_once,
    random_qweight,
    rel_err,
    without_interpreter,
)

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from klaq.kernels.numpy_ref import reference_matmul  # noqa: E402
from klaq.kernels.triton_w4a16 import repack, w4a16_matmul, wgmma_ok  # noqa: E402

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 (Hopper) GPU")


def check(n, k, group_size, asym, m, seed=0, **config):
    from klaq.kernels.gluon_w4a16 import gemm_wgmma

    return check_cuda_kernel(gemm_wgmma, n, k, group_size, asym, m, seed, **config)


def test_off_hopper_the_kernel_is_never_picked():
    """CPU tensors, bf16, K not a multiple of 8: never the wgmma path; forcing it off Hopper is a
    clear error."""
    x = torch.randn(64, 576).half()
    assert not wgmma_ok(x, 576) and not wgmma_ok(x.bfloat16(), 576) and not wgmma_ok(x[:, :570], 570)
    if not HOPPER:
        w = repack(random_qweight(40, 576, 64, False), "cuda" if HAS_CUDA else "cpu")
        with pytest.raises(ValueError, match="sm_90"):
            w4a16_matmul(x.to(w.qweight.device), w, kernel="wgmma")


@hopper
@pytest.mark.parametrize("n,k,group_size", [(300, 576, 128), (300, 576, 32), (300, 576, 48), (576, 1536, 64),
                                            (576, 1536, 256), (1000, 4096 + 64, 128), (4096, 4096, 128)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [17, 64, 100, 256])
@pytest.mark.parametrize("programs", [None, 7, 1])
def test_wgmma_shapes(n, k, group_size, asym, m, programs):
    """Ragged K (576 at groups 128/256, 4096 + 64), N and M off the tiles; ``programs`` 7 and 1
    give stream-K shares that start and end inside output tiles (partial sums, last arrival).
    Group 48 repacks to slices of 16 codes (one k16 step per slice), the others to 32 or 64."""
    check(n, k, group_size, asym, m, seed=n + m, programs=programs)


@hopper
@pytest.mark.parametrize("block_m,stages", [(64, 4), (128, 6), (128, 8)])
def test_wgmma_configs(block_m, stages):
    check(1000, 4096 + 64, 128, True, 200, block_m=block_m, stages=stages, programs=11)


@hopper
@pytest.mark.parametrize("n,k,m", [(300, 576, 256), (1000, 4096 + 64, 200), (576, 1536, 64)])
@pytest.mark.parametrize("programs,dp", [(7, 3), (12, 5), (40, 2), (9, 9), (3, 100)])
def test_wgmma_whole_tiles_then_shares(n, k, m, programs, dp):
    """``dp`` programs take one whole tile each, the others share the rest (stream-K), including
    shares that cover several tiles, more programs than units left, and ``dp`` past the tiles; the
    same call twice gives the same bits (partials meet in program order) and leaves no counter set."""
    from klaq.kernels.gluon_w4a16 import gemm_wgmma
    from klaq.kernels.triton_w4a16 import _WORKSPACES

    w, x, y = check(n, k, 128, True, m, seed=programs, programs=programs, dp=dp)
    assert torch.equal(y, gemm_wgmma(x, w, programs=programs, dp=dp))
    assert not _WORKSPACES[x.device][1].any()


@hopper
@pytest.mark.parametrize("n,k,m,programs,dp", [(6144, 4096, 256, 252, 132), (4096, 14336, 256, 256, 0),
                                               (1000, 4096 + 64, 200, 64, 0), (1000, 576, 256, 56, 8),
                                               (300, 1536, 64, 8, 2)])
@pytest.mark.parametrize("asym", [False, True])
def test_wgmma_k_halves_in_clusters(n, k, m, programs, dp, asym):
    """Whole tiles and K-halves, each pair of halves a 2-program cluster exchanging its partial sum
    through distributed shared memory: the reference's result, and the same bits as the global exchange
    (head + tail in both), twice; the launch's counters untouched."""
    from klaq.kernels.gluon_w4a16 import gemm_wgmma
    from klaq.kernels.triton_w4a16 import _WORKSPACES

    w, x, y = check(n, k, 128, asym, m, seed=n + programs, programs=programs, dp=dp, cluster=True)
    assert torch.equal(y, gemm_wgmma(x, w, programs=programs, dp=dp))
    assert torch.equal(y, gemm_wgmma(x, w, programs=programs, dp=dp, cluster=True))
    assert not _WORKSPACES[x.device][1].any()


@hopper
@pytest.mark.parametrize("m", [200, 256])
def test_wgmma_default_launch_takes_clusters_for_long_k_halves(m, monkeypatch):
    """4096 x 14336 (28 K-tiles, 128 tiles of 128 tokens): the default launch is all K-halves and exchanges
    them through clusters; ``KLAQ_CLUSTER=0`` gives the global exchange, the same bits."""
    from klaq.kernels.gluon_w4a16 import gemm_wgmma

    w, x, y = check(4096, 14336, 128, False, m, seed=m)
    monkeypatch.setenv("KLAQ_CLUSTER", "0")
    assert torch.equal(y, gemm_wgmma(x, w))


def test_cluster_default_rule(monkeypatch):
    """Clusters by default only where every tile is in K-halves and K is long (16+ K-tiles)."""
    from klaq.kernels.gluon_w4a16 import cluster_default, default_programs

    assert cluster_default(*default_programs(256, 128, 28, 132), 128, 28, 128)  # 4096 x 14336, M = 256
    assert not cluster_default(*default_programs(128, 128, 28, 132), 128, 28, 64)  # M = 128: 64-token tiles
    assert not cluster_default(*default_programs(256, 128, 8, 132), 128, 8, 128)  # 4096 x 4096: whole tiles
    assert not cluster_default(*default_programs(256, 192, 8, 132), 192, 8, 128)  # 6144 x 4096: whole + halves
    monkeypatch.setenv("KLAQ_CLUSTER", "0")
    assert not cluster_default(*default_programs(256, 128, 28, 132), 128, 28, 128)


def test_cluster_pairs_rule():
    """2-program clusters need whole tiles in pairs, then every other tile in two K-halves."""
    from klaq.kernels.gluon_w4a16 import cluster_pairs

    assert cluster_pairs(252, 132, 192, 8) and cluster_pairs(256, 0, 128, 28)
    assert not cluster_pairs(253, 133, 192, 8)  # a whole-tile program would pair with a half
    assert not cluster_pairs(264, 132, 192, 8)  # shares of other lengths than a half
    assert not cluster_pairs(2, 0, 1, 1)  # one K-tile: no halves
    # the cases of test_wgmma_k_halves_in_clusters (tiles of 64 rows x 128 tokens, 64 at M = 64; 8, 28,
    # 9, 3, 3 K-tiles of 512 / 512 / 512 / 256 / 512 codes)
    for programs, dp, tiles, k_tiles in [(252, 132, 96 * 2, 8), (256, 0, 64 * 2, 28), (64, 0, 16 * 2, 9),
                                         (56, 8, 16 * 2, 3), (8, 2, 5, 3)]:
        assert cluster_pairs(programs, dp, tiles, k_tiles)


def test_tokens_per_tile():
    """The asked or default token count, cut to the power of two (at least 64) holding all tokens."""
    gluon_w4a16 = pytest.importorskip("klaq.kernels.gluon_w4a16")

    assert gluon_w4a16.tokens_per_tile(256, 4096, 132) == 128
    assert gluon_w4a16.tokens_per_tile(100, 14336, 132) == 128
    assert gluon_w4a16.tokens_per_tile(17, 4096, 132, block_m=128) == 64
    assert gluon_w4a16.tokens_per_tile(256, 4096, 132, block_m=64) == 64


def test_grid_keeps_every_share_nonempty():
    """(programs, dp) as launched: dp within the tiles and the grid, at least one unit per share."""
    gluon_w4a16 = pytest.importorskip("klaq.kernels.gluon_w4a16")

    assert gluon_w4a16.grid(264, 132, 192, 8) == (264, 132)  # 132 whole tiles, 132 shares of 60 tiles
    assert gluon_w4a16.grid(528, 264, 448, 8) == (528, 264)
    assert gluon_w4a16.grid(128, 0, 128, 8) == (128, 0)  # one program per tile
    assert gluon_w4a16.grid(500, 0, 10, 8) == (80, 0)  # no more shares than units
    assert gluon_w4a16.grid(20, 9, 10, 8) == (17, 9)  # 1 tile left: 8 shares of one unit
    assert gluon_w4a16.grid(9, 9, 10, 8) == (10, 9)  # a tile nobody took gets a share
    assert gluon_w4a16.grid(3, 100, 10, 8) == (4, 3)  # dp past the grid: 3 whole tiles, one share of the rest
    assert gluon_w4a16.grid(0, 0, 10, 8) == (1, 0)


@hopper
def test_wgmma_partial_tiles_leave_the_workspace_clean():
    from klaq.kernels.triton_w4a16 import _WORKSPACES

    w, x, y = check(576, 1536, 64, True, 100, programs=5)  # at most 2 shares per tile: sums repeat exactly
    from klaq.kernels.gluon_w4a16 import gemm_wgmma

    assert torch.equal(y, gemm_wgmma(x, w, programs=5))
    ws, counters = _WORKSPACES[x.device]
    assert not ws.any() and not counters.any()


@hopper
@pytest.mark.parametrize("m", [17, 64, 256])
def test_dispatch_takes_wgmma_on_hopper(m, monkeypatch):
    """Default dispatch above M = 16 with fp16 on Hopper is the wgmma kernel."""
    from klaq.kernels import gluon_w4a16

    calls = []
    real = gluon_w4a16.gemm_wgmma
    monkeypatch.setattr(gluon_w4a16, "gemm_wgmma", lambda x, w: calls.append(x.shape) or real(x, w))
    qw = random_qweight(576, 1536, 64, False)
    x = torch.randn(m, 1536, generator=torch.Generator().manual_seed(m)).half()
    y = w4a16_matmul(x.cuda(), repack(qw, "cuda"))
    assert calls == [(m, 1536)]
    assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw)) < 2e-3


def test_default_tiles_and_grid():
    """The launch rules as measured on an H100 (132 SMs): 64-token tiles for up to 64 tokens, and
    up to 128 when 128-token tiles would fill at most half the SMs; stream-K below 65 tokens, one
    program per tile above, two K-halves per tile when K is long and the tiles do not fill the SMs,
    one whole tile per SM and K-halves for the rest up to 1.5 tiles per SM, and past two waves of two per SM whole tiles for the full SM-waves, the rest shared."""
    gluon_w4a16 = pytest.importorskip("klaq.kernels.gluon_w4a16")

    assert gluon_w4a16.default_block_m(17, 4096, 132) == 64
    assert gluon_w4a16.default_block_m(128, 4096, 132) == 64
    assert gluon_w4a16.default_block_m(128, 14336, 132) == 128
    assert gluon_w4a16.default_block_m(256, 4096, 132) == 128
    assert gluon_w4a16.default_programs(64, 64, 8, 132) == (264, 0)
    assert gluon_w4a16.default_programs(256, 128, 8, 132) == (128, 0)
    assert gluon_w4a16.default_programs(256, 128, 28, 132) == (256, 0)
    assert gluon_w4a16.default_programs(256, 224, 28, 132) == (224, 0)
    assert gluon_w4a16.default_programs(256, 192, 8, 132) == (252, 132)  # 132 whole, 60 tiles in K-halves
    assert gluon_w4a16.default_programs(256, 199, 8, 132) == (199, 0)  # past 1.5 tiles per SM
    assert gluon_w4a16.default_programs(256, 192, 1, 132) == (192, 0)  # one K-tile: nothing to halve
    assert gluon_w4a16.default_programs(256, 448, 8, 132) == (528, 396)  # 3 SM-waves whole, 52 tiles shared


@pytest.mark.parametrize("stages", [0, 2, 3])
def test_too_few_stages_is_refused_before_launch(stages):
    """Under 4 stages no x slice is in flight when the first MMA waits: the kernel would hang, so
    the launcher refuses before touching a device (this runs on CPU too)."""
    gluon_w4a16 = pytest.importorskip("klaq.kernels.gluon_w4a16")
    w = repack(random_qweight(64, 512, 128, False), "cpu")
    with pytest.raises(ValueError, match="stages must be at least 4"):
        gluon_w4a16.gemm_wgmma(torch.zeros(64, 512, dtype=torch.float16), w, stages=stages)


def test_a_gluon_that_cannot_build_falls_back_once(monkeypatch):
    """Where the Hopper kernel fails to build or launch (another Triton's Gluon API), the call
    warns, takes the Triton GEMM and never tries the kernel again in this process."""
    x = torch.randn(24, 576, generator=torch.Generator().manual_seed(1)).half()
    falls_back_once(monkeypatch, "_GLUON", "gemm_prefill", "wgmma_ok", random_qweight(40, 576, 64, False), x,
                    "wgmma kernel is unavailable")


@hopper
def test_wgmma_shares_repeat_bit_exactly():
    """6144 x 4096 at M = 256 puts 60 of its 192 tiles in K-halves (the last program adds the other's
    slot): 200 calls give the same bits, so the last program always sees the other share's stores."""
    from klaq.kernels.gluon_w4a16 import gemm_wgmma

    w = repack(random_qweight(6144, 4096, 128, False), "cuda")
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(2)).half().cuda()
    out = torch.stack([gemm_wgmma(x, w) for _ in range(200)])
    differ = (out != out[0]).flatten(1).any(dim=1)
    assert int(differ.sum()) == 0, f"{int(differ.sum())} of 200 calls differ from the first"


# the wgmma kernel's sm_90a PTX at its default launch, from bench/wgmma_ptxas.py (run by path: bench/
# on sys.path would shadow HF's ``kernels`` with bench/kernels.py)
_PTX_CHILD = f"""
import runpy
print(runpy.run_path({str(Path(__file__).parents[2] / "bench" / "wgmma_ptxas.py")!r})["wgmma_ptx"]())
"""


def test_shares_publish_their_slot_by_barrier_then_one_release():
    """In the sm_90 PTX, a share's partial sum goes to its slot, then a CTA barrier, then one thread
    bumps the tile's counter with an acq_rel atomic (no per-thread fence: triton_w4a16._store_split
    says why); the tile's last program crosses a barrier before it loads the other slots (compiled
    on CPU, no GPU needed)."""
    pytest.importorskip("triton.experimental.gluon")
    lines = without_interpreter(_PTX_CHILD).splitlines()
    count = [i for i, s in enumerate(lines) if "atom.global" in s and ".add.u32" in s]
    assert len(count) == 1 and ".acq_rel" in lines[count[0]] and lines[count[0]].strip().startswith("@")
    assert not any("fence.acq_rel.gpu" in s for s in lines)
    slot_stores = [i for i, s in enumerate(lines[:count[0]]) if "st.global" in s and ".b32" in s]
    assert slot_stores, "no slot stores before the count"
    slot_loads = [i for i, s in enumerate(lines) if "ld.global.cg" in s and i > count[0]]
    assert slot_loads, "no slot loads after the count"
    assert barrier_between(lines, max(slot_stores), count[0])
    assert barrier_between(lines, count[0], min(slot_loads))
