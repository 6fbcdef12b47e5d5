"""--rounding greedy: flips only to neighbouring codes, never raises its objective, keeps the layout."""

import numpy as np
import torch
from tiny_archs import _ids, _model

from klaq.toolchain.algorithms.greedy import greedy_refine
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.algorithms.rtn import rtn
from klaq.toolchain.engine import EngineConfig, InputStats, quantize_blocks


def _objective(w, deq, m, v):
    d = deq - w
    return (d @ m) ** 2 + (d * d) @ v


def _bias(x, w, deq):
    return float(((x @ (deq - w).T).mean(0) ** 2).mean())


def test_greedy_lowers_mean_output_error():
    torch.manual_seed(0)
    k = 96
    x = torch.randn(4096, k) + torch.linspace(-1, 2, k)  # inputs with a non-zero mean
    x[0] *= 100  # an outlier token: masked out of the statistics
    w = torch.randn(24, k) * 0.05
    for spec in (QuantSpec(4, 32, False), QuantSpec(3, 32, True), QuantSpec(2, -1, False)):
        st = InputStats(k, "cpu", hessian=False, masked=True)
        st.add(x)
        assert st.m_n == 4095
        m = (st.m_sum / st.m_n).float()
        v = (st.m_sq / st.m_n).float() - m * m
        qw = rtn(w, spec)
        out, deq, info = greedy_refine(w, qw, st, spec)
        np.testing.assert_array_equal(out.dequantize(), deq.numpy())
        np.testing.assert_array_equal(out.scales, qw.scales)
        assert np.abs(out.codes.astype(int) - qw.codes.astype(int)).max() <= 1
        before = _objective(w, torch.from_numpy(qw.dequantize()), m, v)
        after = _objective(w, deq, m, v)
        assert info["flips"] > 0 and (after <= before + 1e-9).all() and after.sum() < 0.9 * before.sum()
        assert _bias(x[1:], w, deq) < _bias(x[1:], w, torch.from_numpy(qw.dequantize()))


def test_greedy_through_engine():
    ids = _ids()
    res = quantize_blocks(_model("llama"), ids, EngineConfig(method="rtn", rounding="greedy", progress=False))
    assert len(res.quantized) == 14 and all(v["greedy_flips"] >= 0 for v in res.layers.values())
