import numpy as np
import pytest

from klaq.formats.qweight import QuantizedWeight, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 32, 576, 577])
def test_pack_unpack_roundtrip(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    codes = rng.integers(0, 1 << bits, size=(5, k), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, -(-(k * bits) // 8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, k), codes)


def test_4bit_canonical_nibble_order():
    codes = np.array([[1, 2, 3, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, 4), [[0x21, 0x43]])  # element 2i in the low nibble


def test_dequantize_symmetric_and_asymmetric_ragged():
    codes = np.array([[0, 15, 8, 3, 9]], dtype=np.uint8)
    scales = np.array([[0.5, 2.0]], dtype=np.float16)  # groups of 4: [0..3], [4]
    sym = QuantizedWeight(codes, scales, None, 4, 4)
    np.testing.assert_array_equal(sym.dequantize(), [[-4.0, 3.5, 0.0, -2.5, 2.0]])
    zeros = np.array([[3, 1]], dtype=np.uint8)
    asym = QuantizedWeight(codes, scales, zeros, 4, 4)
    np.testing.assert_array_equal(asym.dequantize(), [[-1.5, 6.0, 2.5, 0.0, 16.0]])
    assert asym.n_groups == 2 and sym.symmetric and not asym.symmetric


def test_shape_validation():
    with pytest.raises(ValueError):
        QuantizedWeight(np.zeros((2, 8), np.uint8), np.ones((2, 3), np.float16), None, 4, 4)
    with pytest.raises(ValueError):
        QuantizedWeight(np.zeros((2, 8), np.uint8), np.ones((2, 2), np.float16), None, 5, 4)
