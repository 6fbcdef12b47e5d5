"""The Hopper 128 x 256 GEMM split in K over clusters (kernels/gluon_w4a16_cluster.py).

Gluon has no interpreter mode: the kernel cases run on an sm_90 GPU only and skip elsewhere. The
launch plans, and a mirror of the kernel's integer rules (shares, owners, tails) that checks every
tile's parts add up to its whole K exactly once, run everywhere.
"""

import pytest
from w4_helpers import HAS_CUDA, check_cuda_kernel, random_qweight

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from klaq.kernels.triton_w4a16 import repack  # noqa: E402

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 (Hopper) GPU")


def cluster():
    return pytest.importorskip("klaq.kernels.gluon_w4a16_cluster")


def check_plan(ctas: int, per: int, n: int) -> None:
    """Every warp's rows of every tile have exactly one owner, and what it adds covers K once."""
    L = per * n
    share = [(q * L // ctas, (q + 1) * L // ctas) for q in range(ctas)]
    final = {}
    early = {}
    for q, (b, e) in enumerate(share):
        jf = (e - 1) // n
        final[q] = (jf, max(b, jf * n) - jf * n, e - jf * n)
        if b // n != jf:
            early[b // n] = (b - (b // n) * n, n)
    holder = lambda kt: ((kt + 1) * ctas - 1) // L  # noqa: E731
    for j in range(per):
        first, last = holder(j * n), holder((j + 1) * n - 1)
        tail = (last + 1) * L // ctas > (j + 1) * n
        r = last - first + 1 - tail
        assert tail == (j in early)
        owners = [q for q in range(ctas) if final[q][0] == j]
        assert owners == list(range(first, first + r))
        for w in range(8):
            holders = [q for q in owners if w * r // 8 == q - first]
            assert len(holders) == 1, (ctas, per, n, j, w)
            ranges = sorted([final[q][1:] for q in owners] + ([early[j]] if tail else []))
            covered = [kt for lo, hi in ranges for kt in range(lo, hi)]
            assert covered == list(range(n)), (ctas, per, n, j, ranges)


def exchange(ctas: int, per: int, n: int, seed: int = 0) -> None:
    """The kernel's exchange, element by element in numpy with its own index arithmetic (``_thread_pos``,
    ``owner``, ``w0``, ``nthreads``, ``slot``, ``at``, ``where``): integer-valued parts, so that any part
    lost, doubled or read from the wrong slot shows; every write inside the owner's exchange area (what
    ``Plan.exchange_bytes`` sizes) and none on another's."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts = rng.integers(-8, 8, (per, n, 128, 256)).astype(np.float64)  # each (tile, K-tile)'s product
    L = per * n
    r_ = np.arange(128)[:, None]
    col = np.arange(256)[None, :]
    rr = r_ % 16
    warp, lane = r_ // 16, (rr % 8) * 4 + (col % 8) // 2
    i = (col // 8) * 4 + (rr // 8) * 2 + col % 2
    assert len(np.unique((i * 256 + warp * 32 + lane).ravel())) == 128 * 256  # a bijection onto the tile
    holder = lambda kt: ((kt + 1) * ctas - 1) // L  # noqa: E731
    area = max((r - 1) * -(-8 // r) * 32 * 128 for r in
               [sum((((q + 1) * L // ctas) - 1) // n == j for q in range(ctas)) for j in range(per)])
    ring = np.full((ctas, area), np.nan)
    ws = np.full((per, 128 * 256), np.nan)
    acc, meta = {}, {}
    for q in range(ctas):
        b, e = q * L // ctas, (q + 1) * L // ctas
        u = b
        while u < e:
            j, t0 = divmod(u, n)
            t1 = min(n, t0 + e - u)
            a = parts[j, t0:t1].sum(axis=0)
            u += t1 - t0
            if u < e:
                ws[j, (i * 256 + warp * 32 + lane).ravel()] = a.ravel()
        acc[q] = a
        jf = (e - 1) // n
        first, last = holder(jf * n), holder((jf + 1) * n - 1)
        tail = (last + 1) * L // ctas > (jf + 1) * n
        r = last - first + 1 - int(tail)
        k = q - first
        owner = warp * r // 8 + 0 * col
        w0 = (owner * 8 + r - 1) // r
        nthreads = ((owner + 1) * 8 + r - 1) // r * 32 - w0 * 32
        meta[q] = (jf, first, r, k, tail, owner, w0, nthreads)
        slot = k - (k > owner)
        at = slot * (nthreads * 128) + i * nthreads + (warp * 32 + lane - w0 * 32)
        send = owner != k
        assert (at[send] >= 0).all() and (at[send] < (r - 1) * nthreads[send] * 128).all()
        dest = first + owner[send]
        assert np.isnan(ring[dest, at[send]]).all()  # no two writes on one word
        ring[dest, at[send]] = a[send]
    y = np.full((per, 128, 256), np.nan)
    for q in range(ctas):
        jf, first, r, k, tail, owner, w0, nthreads = meta[q]
        mine = owner == k
        total = acc[q].copy()
        for s in range(r):
            if s != k:
                where = (s - (s > k)) * (nthreads * 128) + i * nthreads + (warp * 32 + lane - w0 * 32)
                total[mine] += ring[q, where[mine]]
        if tail:
            total[mine] += ws[jf, (i * 256 + warp * 32 + lane)[mine]]
        assert np.isnan(y[jf][mine]).all()
        y[jf][mine] = total[mine]
    np.testing.assert_array_equal(y, parts.sum(axis=1))


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 28])
def test_the_exchange_delivers_every_part_once(n):
    for ctas in (2, 4, 8):
        for per in range(1, ctas + 1):
            if per * n >= ctas:
                exchange(ctas, per, n, seed=ctas * 100 + per * 10 + n)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 16, 28])
def test_every_plan_sums_each_tile_once(n):
    """All cluster sizes and tiles per cluster the launch allows, over K-tile counts from 1 to 28."""
    for ctas in (2, 4, 8):
        for per in range(1, ctas + 1):
            if per * n >= ctas:
                check_plan(ctas, per, n)


def test_host_plan_matches_the_kernel_rules():
    cl = cluster()
    for ctas in (2, 4, 8):
        for per in range(1, ctas + 1):
            for n in (1, 3, 8, 28):
                if per * n < ctas:
                    continue
                plan = cl.Plan(ctas, per, 1)
                shares = plan.shares(n)
                assert [((e - 1) // n) for _, e in shares].count(0) == plan.owners(n)[0]
                assert sum(plan.owners(n)) == ctas
                assert plan.longest(n) == max(e - b for b, e in shares)


def test_best_plans_for_the_llama_shapes():
    """M = 256 on 132 SMs (block_k 512: 8 K-tiles at K = 4096, 28 at 14336): every SM but 4 busy, and the
    longest share well under a whole tile where one tile per program leaves SMs idle."""
    cl = cluster()
    assert cl.best_plan(48, 8, 132) == cl.Plan(8, 3, 16)  # 6144 x 4096: 3 K-tiles per program, not 8
    assert cl.best_plan(32, 8, 132) == cl.Plan(4, 1, 32)  # 4096 x 4096: 2
    assert cl.best_plan(112, 8, 132) == cl.Plan(8, 7, 16)  # 14336 x 4096: 7
    assert cl.best_plan(32, 28, 132) == cl.Plan(4, 1, 32)  # 4096 x 14336: 7 of 28
    for plan, n in [(cl.best_plan(48, 8, 132), 8), (cl.best_plan(32, 8, 132), 8), (cl.best_plan(112, 8, 132), 8)]:
        assert plan.programs == 128 and plan.exchange_bytes(n) <= 6 * 256 * 32 * 2  # within a 6-stage ring
    assert cl.best_plan(132, 8, 132) is None  # one tile per SM already: nothing to split
    assert cl.best_plan(448, 8, 132) is None  # more tiles than programs: a cluster holds at most 8 tiles


@pytest.mark.parametrize("tiles,n", [(1, 1), (1, 8), (3, 1), (448, 8), (132, 8)])
def test_the_default_plan_gives_every_program_a_share(tiles, n):
    """Where no plan beats one tile per program (one tile of one K-tile, more tiles than SMs), the fallback
    still gives every program at least one K-tile and sums each tile once."""
    cl = cluster()
    plan = cl.default_plan(tiles, n, 132)
    assert all(e > b for b, e in plan.shares(n)) and plan.clusters * plan.per >= tiles
    check_plan(plan.ctas, plan.per, n)
    exchange(plan.ctas, plan.per, n)


def test_cluster_refuses_bad_plans_before_launch():
    cl = cluster()
    w = repack(random_qweight(256, 1024, 128, False), "cpu")
    x = torch.zeros(256, 1024, dtype=torch.float16)
    for ctas, per in [(3, 1), (2, 3), (8, 1)]:  # not a cluster size; per > ctas; 2 K-tiles for 8 programs
        with pytest.raises(ValueError, match="clusters of"):
            cl.gemm_cluster(x, w, ctas=ctas, per=per)
    with pytest.raises(ValueError, match="give both"):
        cl.gemm_cluster(x, w, ctas=4)
    with pytest.raises(ValueError, match="stages must be at least 4"):
        cl.gemm_cluster(x, w, stages=3)


def check(n, k, group_size, asym, m, seed=0, **config):
    return check_cuda_kernel(cluster().gemm_cluster, n, k, group_size, asym, m, seed, **config)


@hopper
@pytest.mark.parametrize("n,k,group_size", [(300, 576, 128), (1000, 4096 + 64, 128), (6144, 4096, 128)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [129, 300])
def test_cluster_shapes(n, k, group_size, asym, m):
    """The default plan: ragged K (576, 4096 + 64), N off the 128-row tiles, M off the 256-token tiles; the
    same call twice gives the same bits."""
    w, x, y = check(n, k, group_size, asym, m, seed=n + m)
    assert torch.equal(y, cluster().gemm_cluster(x, w))


@hopper
@pytest.mark.parametrize("ctas,per", [(2, 1), (2, 2), (4, 1), (4, 3), (8, 3), (8, 5), (8, 8)])
def test_cluster_plans(ctas, per):
    """Every kind of share: a tile split 2-8 ways, shares over two tiles (early tails), partial clusters
    (1000 rows x 300 tokens: 16 tiles), group 64, zero points."""
    w, x, y = check(1000, 4096 + 64, 64, True, 300, seed=ctas * 10 + per, ctas=ctas, per=per)
    assert torch.equal(y, cluster().gemm_cluster(x, w, ctas=ctas, per=per))


@hopper
def test_cluster_repeats_bit_exactly():
    """6144 x 4096 at M = 256 (clusters of 8 over 3 tiles): 100 calls give the same bits, so every owner
    always sees the others' parts and the early tails."""
    w = repack(random_qweight(6144, 4096, 128, False), "cuda")
    x = torch.randn(256, 4096, generator=torch.Generator().manual_seed(2)).half().cuda()
    out = torch.stack([cluster().gemm_cluster(x, w) for _ in range(100)])
    differ = (out != out[0]).flatten(1).any(dim=1)
    assert int(differ.sum()) == 0, f"{int(differ.sum())} of 100 calls differ from the first"


def test_the_dispatch_takes_the_cluster_kernel_only_when_switched_on(monkeypatch):
    """``KLAQ_CLUSTER_SPLIT=1``, more than 128 tokens and a plan that beats one tile per program."""
    cl = cluster()
    w = repack(random_qweight(6144, 512, 128, False), "cpu")  # 48 tiles at M = 256; block_k 512, 1 K-tile
    big = repack(random_qweight(6144, 4096, 128, False), "cpu")  # 8 K-tiles
    monkeypatch.delenv("KLAQ_CLUSTER_SPLIT", raising=False)
    assert not cl.use_cluster(256, big, 132)
    monkeypatch.setenv("KLAQ_CLUSTER_SPLIT", "1")
    assert cl.use_cluster(256, big, 132) and not cl.use_cluster(128, big, 132)
    assert not cl.use_cluster(256, w, 132)  # one K-tile per tile: a share cannot be shorter than a whole tile


def test_the_exchange_mirror_uses_the_kernels_own_index_arithmetic():
    """:func:`exchange` stands in for a kernel that cannot run here: its index expressions must be the
    kernel's, character for character (but for ``_WARPS`` = 8 and the kernel's int32 casts)."""
    import inspect
    import re
    from pathlib import Path

    source = Path(cluster().__file__).read_text().replace("_WARPS", "8").replace(".to(gl.int32)", "")
    mirror = inspect.getsource(exchange)
    names = ["lane", "i", "owner", "w0", "nthreads", "slot", "at", "where"]
    for name in names:
        found = re.findall(rf"^\s*{name} = (.+)$", source, re.M)
        assert found, name
        for expr in found:
            assert expr.split("#")[0].strip() in mirror, (name, expr)
