"""search_grid: the min-max grid when steps = 0, never a worse group, importance decides the clip."""

import numpy as np
import pytest
import torch

from klaq.toolchain.algorithms.gptq import gptq_quantize
from klaq.toolchain.algorithms.grid import QuantSpec, fake_quantize, fit_grid, search_grid


def _group_err(w, s, z, spec, imp):
    gs = spec.groups_for(w.shape[1])
    d = ((w - fake_quantize(w, s, z, spec)) ** 2) * imp
    return torch.stack([d[:, g : g + gs].sum(1) for g in range(0, w.shape[1], gs)], 1)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, False), QuantSpec(4, 64, True), QuantSpec(3, 32, False),
                                  QuantSpec(2, -1, True)])
def test_search_grid_never_worse_and_on_the_candidate_clips(spec):
    g = torch.Generator().manual_seed(spec.bits)
    w = torch.randn(40, 200, generator=g)  # 200: a ragged last group for 64 and 32
    imp = torch.rand(200, generator=g) + 0.1
    s0, z0 = fit_grid(w, spec)
    s, z = search_grid(w, spec, imp, steps=10, min_clip=0.8)
    e0, e = _group_err(w, s0, z0, spec, imp), _group_err(w, s, z, spec, imp)
    assert (e <= e0).all() and e.sum() < 0.97 * e0.sum()  # gaussian weights: clipping pays
    # every group's grid is fit_grid's at one of the 11 clip factors, bit for bit
    cands = [fit_grid(w, spec, clip=c) for c in torch.linspace(1.0, 0.8, 11).tolist()]
    hit = torch.zeros_like(s, dtype=torch.bool)
    for cs, cz in cands:
        hit |= (cs == s) & (cz == z)
    assert hit.all()


def test_search_grid_steps_zero_is_fit_grid():
    w = torch.randn(16, 96)
    for spec in (QuantSpec(4, 32, False), QuantSpec(4, 32, True)):
        for a, b in zip(search_grid(w, spec, torch.rand(96), steps=0), fit_grid(w, spec), strict=True):
            assert torch.equal(a, b)


def test_importance_decides_whether_an_outlier_is_clipped():
    """One large weight in an unimportant input is clipped away; in an important input it is kept."""
    spec = QuantSpec(4, 32, True)
    w = torch.linspace(-1, 1, 32).repeat(4, 1)
    w[:, 5] = 3.0
    imp = torch.ones(32)
    imp[5] = 0.0
    s_clip, _ = search_grid(w, spec, imp, steps=10)
    imp[5] = 1000.0
    s_keep, _ = search_grid(w, spec, imp, steps=10)
    s0, _ = fit_grid(w, spec)
    assert (s_clip.abs() < s0.abs()).all()
    assert torch.equal(s_keep, s0)


def test_padding_of_a_ragged_group_does_not_count():
    """The ragged last group is padded by repeating its last column; the padding must weigh nothing."""
    spec = QuantSpec(4, 64, False)
    w = torch.randn(8, 70, generator=torch.Generator().manual_seed(1))
    imp = torch.rand(70) + 0.5
    s, z = search_grid(w, spec, imp, steps=8)
    s_alone, z_alone = search_grid(w[:, 64:], QuantSpec(4, 6, False), imp[64:], steps=8)
    assert torch.equal(s[:, 1:], s_alone) and torch.equal(z[:, 1:], z_alone)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_grid_search(act_order):
    """GPTQ with grid_steps: static groups are search_grid on the original weight with diag H as the
    importance; the result stays exactly the package's grid; with dynamic groups the first group too."""
    g = torch.Generator().manual_seed(4)
    k = 128
    x = torch.randn(1024, k, generator=g) @ (torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k))
    w = torch.randn(24, k, generator=g) * 0.05
    h = x.T @ x
    spec = QuantSpec(4, 32, False)
    qw, deq, _ = gptq_quantize(w, h, spec, act_order=act_order, grid_steps=12)
    s, z = search_grid(w, spec, h.diagonal(), steps=12)
    if act_order:
        np.testing.assert_array_equal(qw.scales, s.half().numpy())
        np.testing.assert_array_equal(qw.zeros, z.to(torch.uint8).numpy())
    else:
        np.testing.assert_array_equal(qw.scales[:, 0], s.half().numpy()[:, 0])
    np.testing.assert_array_equal(qw.dequantize(), deq.numpy())
    plain, _, _ = gptq_quantize(w, h, spec, act_order=act_order)
    assert not np.array_equal(plain.scales, qw.scales)
