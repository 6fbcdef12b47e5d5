"""QuantizedWeight -> MatMulNBits: exact packing, the unpack inverse, and onnxruntime's own reading."""

from __future__ import annotations

import numpy as np
import pytest

from klaq.errors import KlaqError
from klaq.formats.matmulnbits import (
    ALLOWED_BLOCK_SIZES,
    concat_rows,
    from_matmulnbits,
    padded_codes,
    quantize_symmetric,
    to_matmulnbits,
)
from klaq.formats.qweight import QuantizedWeight, n_groups


def random_qweight(rng, n, k, bits, group, sym):
    g = n_groups(k, group)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = (rng.random((n, g)) * 0.02 + 1e-3).astype(np.float16)
    zeros = None if sym else rng.integers(0, 1 << bits, (n, g)).astype(np.uint8)
    return QuantizedWeight(codes, scales, zeros, bits, group)


def exact_dequant(qw: QuantizedWeight) -> np.ndarray:
    """(q - z) * s in fp32: what MatMulNBits computes (no fp16 rounding of z * s)."""
    gi = np.arange(qw.in_features) // qw.group_size
    z = qw.zero_points().astype(np.float32)[:, gi]
    return (qw.codes.astype(np.float32) - z) * qw.scales.astype(np.float32)[:, gi]


def ort_matmulnbits(qw: QuantizedWeight, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m = to_matmulnbits(qw)
    inits = [numpy_helper.from_array(m.B, "B"), numpy_helper.from_array(m.scales, "scales")]
    ins = ["A", "B", "scales"]
    if m.zero_points is not None:
        inits.append(numpy_helper.from_array(m.zero_points, "zp"))
        ins.append("zp")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", **m.attributes(accuracy_level))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, m.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, m.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", ALLOWED_BLOCK_SIZES)
@pytest.mark.parametrize("k", [576, 96])  # 576 = 4.5 x 128 (SmolLM2), 96 < 128 / 256: one ragged block
@pytest.mark.parametrize("sym", [True, False])
def test_pack_unpack_is_exact_and_onnxruntime_agrees(bits, group, k, sym):
    rng = np.random.default_rng(bits * 1000 + group + k + sym)
    qw = random_qweight(rng, 24, k, bits, group, sym)
    m = to_matmulnbits(qw)
    kb = n_groups(k, group)
    assert m.B.shape == (24, kb, group * bits // 8) and m.B.dtype == np.uint8
    assert m.scales.dtype == np.float32 and m.scales.shape == (24, kb)
    if sym:
        assert m.zero_points is None
    else:
        assert m.zero_points.shape == (24, -(-kb * bits // 8))
    back = from_matmulnbits(m)
    assert np.array_equal(back.codes, qw.codes)
    assert np.array_equal(back.scales, qw.scales)
    assert (back.zeros is None) == sym and (sym or np.array_equal(back.zeros, qw.zeros))
    assert back.bits == bits and back.group_size == group
    # padding past K: the last group's zero point, i.e. weights of exactly zero
    pad = padded_codes(m)[:, k:]
    assert np.array_equal(pad, np.broadcast_to(qw.zero_points()[:, -1:], pad.shape))
    x = rng.standard_normal((3, k)).astype(np.float32)
    want = x @ exact_dequant(qw).T
    got = ort_matmulnbits(qw, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_nibble_order_matches_reference_example():
    """formats.md §3.2: B[n, b, i] = c[32b + 2i] | c[32b + 2i + 1] << 4."""
    codes = np.arange(64, dtype=np.uint8).reshape(1, 64) % 16
    qw = QuantizedWeight(codes, np.ones((1, 2), np.float16), None, 4, 32)
    B = to_matmulnbits(qw).B
    assert B.shape == (1, 2, 16)
    assert B[0, 1, 3] == codes[0, 32 + 6] | (codes[0, 32 + 7] << 4)
    zq = QuantizedWeight(codes, np.ones((1, 2), np.float16), np.array([[3, 12]], np.uint8), 4, 32)
    assert to_matmulnbits(zq).zero_points.tolist() == [[3 | (12 << 4)]]


def test_symmetric_dequant_equals_klaq_dequant():
    rng = np.random.default_rng(0)
    qw = random_qweight(rng, 32, 576, 4, 128, True)
    x = rng.standard_normal((2, 576)).astype(np.float32)
    want = x @ qw.dequantize().T
    assert np.abs(ort_matmulnbits(qw, x) - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("bits,group", [(3, 32), (2, 64), (4, 100), (4, 512), (8, 8), (4, 576)])
def test_other_groupings_get_a_clear_error(bits, group):
    rng = np.random.default_rng(0)
    qw = random_qweight(rng, 4, 576, bits, group, True)
    with pytest.raises(KlaqError, match=r"bits 4 or 8 with group sizes 16, 32, 64, 128, 256"):
        to_matmulnbits(qw, "model.layers.0.mlp.up_proj")


def test_concat_rows_and_head_quantizer():
    rng = np.random.default_rng(1)
    a, b = random_qweight(rng, 8, 64, 4, 32, False), random_qweight(rng, 4, 64, 4, 32, False)
    ab = concat_rows([a, b])
    assert np.array_equal(ab.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))
    assert concat_rows([a, random_qweight(rng, 4, 64, 4, 64, False)]) is None
    assert concat_rows([a, random_qweight(rng, 4, 64, 4, 32, True)]) is None
    w = rng.standard_normal((16, 80)).astype(np.float32)
    for bits, tol in ((4, 0.1), (8, 0.006)):
        q = quantize_symmetric(w, bits, 32)
        assert q.symmetric and q.bits == bits and q.codes.max() < (1 << bits)
        assert np.abs(q.dequantize() - w).max() <= tol * np.abs(w).max() * 2
