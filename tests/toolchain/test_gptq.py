"""GPTQ on klaq's grid: better than RTN on correlated inputs, RTN's layout, exact on the package grid."""

import numpy as np
import pytest
import torch

from klaq.toolchain.algorithms.gptq import gptq_quantize, hinv_upper
from klaq.toolchain.algorithms.grid import QuantSpec, fit_grid
from klaq.toolchain.algorithms.rtn import rtn


def _correlated(k: int, tokens: int = 2048, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, : k // 8] *= 4  # a few salient channels
    return x


def _out_err(x, w, deq):
    return float(((x @ (w - deq).T) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group,k", [(32, 96), (64, 200), (128, 320), (-1, 160)])
def test_gptq_beats_rtn_with_rtn_layout(bits, sym, group, k):
    x = _correlated(k, seed=bits + k)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(k)) * 0.05
    spec = QuantSpec(bits, group, sym)
    qw, deq, info = gptq_quantize(w, x.T @ x, spec)
    ref = rtn(w, spec)
    # same layout as RTN: group size, groups (ragged last one included), zeros or not
    assert (qw.group_size, qw.scales.shape, qw.symmetric) == (ref.group_size, ref.scales.shape, ref.symmetric)
    assert qw.codes.max() < (1 << bits)
    # the returned fake-quantized weight is exactly what the package will dequantize
    np.testing.assert_array_equal(qw.dequantize(), deq.numpy())
    assert _out_err(x, w, deq) < 0.9 * _out_err(x, w, torch.from_numpy(ref.dequantize()))
    assert info.damp == 0.01 and not info.fallback


def test_identity_hessian_is_rtn():
    """With H = I nothing is propagated: GPTQ must be exactly RTN (dynamic and static groups)."""
    w = torch.randn(32, 200) * 0.1
    for spec in (QuantSpec(4, 64, False), QuantSpec(3, 32, True), QuantSpec(4, -1, False)):
        ref = rtn(w, spec)
        for act_order in (False, True):
            qw, _, _ = gptq_quantize(w, torch.eye(200), spec, act_order=act_order)
            np.testing.assert_array_equal(qw.codes, ref.codes)
            np.testing.assert_array_equal(qw.scales, ref.scales)


def test_act_order_uses_static_groups():
    k = 256
    x = _correlated(k)
    x[:, 200:] *= 10  # act-order moves these columns first
    w = torch.randn(16, k) * 0.05
    spec = QuantSpec(4, 64, False)
    qw, deq, _ = gptq_quantize(w, x.T @ x, spec, act_order=True)
    s, z = fit_grid(w, spec)  # groups fitted before any reordering or update
    np.testing.assert_array_equal(qw.scales, s.half().numpy())
    np.testing.assert_array_equal(qw.zeros, z.to(torch.uint8).numpy())
    np.testing.assert_array_equal(qw.dequantize(), deq.numpy())
    assert _out_err(x, w, deq) < _out_err(x, w, torch.from_numpy(rtn(w, spec).dequantize()))


def test_dynamic_groups_follow_updated_columns():
    """Without act-order a group's grid is fitted on the error-updated columns, not the originals."""
    x = _correlated(128)
    w = torch.randn(16, 128) * 0.05
    spec = QuantSpec(4, 32, False)
    qw, _, _ = gptq_quantize(w, x.T @ x, spec)
    s0, _ = fit_grid(w, spec)
    assert np.array_equal(qw.scales[:, 0], s0.half().numpy()[:, 0])  # first group: nothing updated yet
    assert not np.array_equal(qw.scales[:, 1:], s0.half().numpy()[:, 1:])


def test_dead_columns_and_singular_hessian():
    k = 64
    x = _correlated(k)
    x[:, 10] = 0  # a dead input
    x = x[:, :].clone()
    x[:, 20] = x[:, 21]  # rank deficient
    w = torch.randn(8, k) * 0.05
    qw, deq, info = gptq_quantize(w, x.T @ x, QuantSpec(4, 32, True))
    assert info.dead == 1 and np.isfinite(qw.dequantize()).all()
    assert (deq[:, 10] == 0).all()  # the dead column's weight is zeroed, as in the references
    # no damping and an exactly singular H: the damping must grow until Cholesky succeeds
    h = torch.ones(k, k)
    u, used = hinv_upper(h, 0.0)
    assert u is not None and used > 0
    qw2, deq2, info2 = gptq_quantize(w, h, QuantSpec(4, 32, True), damp=0.0)
    assert info2.damp > 0 and np.isfinite(qw2.dequantize()).all()


def test_scale_invariance():
    """GPTQ is invariant to the Hessian's scale (relative damping): same codes for H and 7H."""
    x = _correlated(96)
    w = torch.randn(8, 96) * 0.05
    h = x.T @ x
    a, _, _ = gptq_quantize(w, h, QuantSpec(4, 32, False))
    b, _, _ = gptq_quantize(w, h * 8, QuantSpec(4, 32, False))  # power of two: exact in fp32
    np.testing.assert_array_equal(a.codes, b.codes)


def test_hessian_shrink_moves_gptq_toward_rtn():
    """shrink = 0 is plain GPTQ; a huge shrink leaves only the diagonal, so no error feedback: RTN."""
    import torch

    from klaq.toolchain.algorithms.gptq import gptq_quantize
    from klaq.toolchain.algorithms.grid import QuantSpec, fit_grid, quantize_codes

    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(400, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated inputs
    h = x.T @ x
    spec = QuantSpec(4, 32, False)
    plain, _, _ = gptq_quantize(w, h, spec)
    zero, _, _ = gptq_quantize(w, h, spec, shrink=0.0)
    mild, _, _ = gptq_quantize(w, h, spec, shrink=0.5)
    huge, _, _ = gptq_quantize(w, h, spec, shrink=1e7)
    s, z = fit_grid(w, spec)
    rtn = quantize_codes(w, s, z, spec).to(torch.uint8).numpy()
    assert (zero.codes == plain.codes).all()
    assert (mild.codes != plain.codes).any() and (mild.codes != rtn).any()
    assert (huge.codes != rtn).mean() < 0.005
