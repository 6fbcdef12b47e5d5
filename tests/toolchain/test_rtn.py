import numpy as np
import pytest
import torch

from klaq.toolchain.algorithms.grid import QuantSpec, fake_quantize, fit_grid
from klaq.toolchain.algorithms.rtn import rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group,k", [(32, 96), (64, 576), (128, 576), (256, 600), (-1, 576)])
def test_rtn_codes_scales_and_error(bits, sym, group, k):
    torch.manual_seed(bits + k)
    w = torch.randn(16, k)
    qw = rtn(w, QuantSpec(bits, group, sym))
    expected_group = k if group == -1 else group
    assert qw.group_size == expected_group and qw.n_groups == -(-k // expected_group)
    assert qw.codes.max() < (1 << bits) and qw.symmetric == sym
    deq = qw.dequantize()
    s = np.abs(qw.scales.astype(np.float32))[:, np.arange(k) // expected_group]
    # round-to-nearest: every weight inside the grid's range is within half a step (fp16 slack)
    gi = np.arange(k) // expected_group
    z = qw.zero_points().astype(np.float32)[:, gi]
    sc = qw.scales.astype(np.float32)[:, gi]
    ends = np.stack([(0 - z) * sc, ((1 << bits) - 1 - z) * sc])
    inside = (w.numpy() >= ends.min(0)) & (w.numpy() <= ends.max(0))
    err = np.abs(deq - w.numpy())
    assert inside.mean() > 0.5
    assert (err[inside] <= 0.5 * s[inside] * 1.01 + 1e-6).all()
    # the fake-quantized weight used by the algorithms is exactly the package's dequantized weight
    scale, zero = fit_grid(w, QuantSpec(bits, group, sym))
    np.testing.assert_array_equal(fake_quantize(w, scale, zero, QuantSpec(bits, group, sym)).numpy(), deq)


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [np.abs(rtn(w, QuantSpec(b, 64, False)).dequantize() - w.numpy()).mean() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_zero_group_is_finite():
    w = torch.zeros(4, 64)
    for sym in (True, False):
        qw = rtn(w, QuantSpec(4, 32, sym))
        assert np.isfinite(qw.dequantize()).all() and (qw.dequantize() == 0).all()
