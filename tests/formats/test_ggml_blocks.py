"""klaq's block encoders against gguf-py's reference decoder, bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from klaq.formats.ggml_blocks import from_ggml, ggml_type_for, to_ggml
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.algorithms.rtn import rtn

CASES = [  # (bits, sym, group, K, expected type)
    (4, True, 32, 64, T.Q4_0), (4, True, 64, 576, T.Q4_0), (4, True, 128, 576, T.Q4_0),
    (4, True, 256, 1536, T.Q4_0), (4, True, -1, 576, T.Q4_0),
    (4, False, 32, 64, T.Q4_1), (4, False, 64, 576, T.Q4_1), (4, False, 128, 576, T.Q4_1),
    (4, False, 256, 576, T.Q4_1), (4, False, -1, 192, T.Q4_1),
    (8, True, 32, 96, T.Q8_0), (8, True, 128, 576, T.Q8_0), (8, True, -1, 576, T.Q8_0),
]


@pytest.mark.parametrize("bits,sym,group,k,typ", CASES)
def test_gguf_dequantize_equals_klaq_bit_for_bit(bits, sym, group, k, typ):
    torch.manual_seed(k + group)
    w = torch.randn(24, k) * 0.05
    w[0, :5] = 0.0  # an all-zero-ish start and a zero row segment
    w[1] = 0.0
    qw = rtn(w, QuantSpec(bits, group, sym))
    data, got = to_ggml(qw)
    assert got == typ
    ref = dequantize(data, typ).reshape(24, k)
    np.testing.assert_array_equal(ref.view(np.uint32), qw.dequantize().view(np.uint32))


@pytest.mark.parametrize("bits,sym,group,k,typ", CASES)
def test_from_ggml_recovers_codes(bits, sym, group, k, typ):
    torch.manual_seed(1)
    qw = rtn(torch.randn(8, k), QuantSpec(bits, group, sym))
    data, typ = to_ggml(qw)
    back = from_ggml(data, typ, (8, k))
    np.testing.assert_array_equal(back.codes, qw.codes)
    np.testing.assert_array_equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits,sym,group,k", [(3, True, 64, 576), (2, False, 32, 64), (8, False, 64, 128),
                                              (4, True, 64, 80), (4, False, 32, 48)])
def test_no_llama_cpp_type(bits, sym, group, k):
    qw = rtn(torch.randn(4, k), QuantSpec(bits, group, sym))
    assert ggml_type_for(qw) is None
    with pytest.raises(ValueError):
        to_ggml(qw)
