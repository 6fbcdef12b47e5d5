"""KLAWQ: the seed's per-token weights, H + beta*A, and beta = 0 reproducing GPTQ bit for bit."""

import numpy as np
import pytest
import torch
from tiny_archs import _ids, _model

from klaq.errors import KlaqError
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.algorithms.klawq import add_weighted_outer, klawq_hessian, layer_token_weights
from klaq.toolchain.engine import EngineConfig, quantize_blocks


def test_layer_token_weights_formula():
    torch.manual_seed(0)
    x, w = torch.randn(10, 6), torch.randn(5, 6)
    for tau in (0.5, 1.0, 3.0):
        p = torch.softmax(x @ w.T / tau, -1)
        expected = 1 - (p**2).sum(-1)  # trace of the softmax Jacobian
        torch.testing.assert_close(layer_token_weights(x, w, tau), expected)
        torch.testing.assert_close(layer_token_weights(x, w.T.contiguous(), tau, conv1d=True), expected)
        k = layer_token_weights(x, w, tau)
        assert (k >= 0).all() and (k <= 1 - 1 / 5 + 1e-6).all()
    # a peaked output (one dominant channel) weighs ~0, a flat one ~1 - 1/N
    w_peak = torch.zeros(5, 6)
    w_peak[0, 0] = 100
    assert float(layer_token_weights(torch.eye(6)[:1], w_peak, 1.0)) < 1e-6
    assert abs(float(layer_token_weights(torch.zeros(1, 6), w, 1.0)) - 0.8) < 1e-6


def test_weighted_outer_and_beta_zero():
    torch.manual_seed(1)
    x, k = torch.randn(20, 4), torch.rand(20)
    a = torch.zeros(4, 4)
    add_weighted_outer(a, x, k, chunk=7)
    torch.testing.assert_close(a, (x * k[:, None]).T @ x)
    h = torch.eye(4)
    assert klawq_hessian(h, a, 0.0) is h
    torch.testing.assert_close(klawq_hessian(h, a, 0.5), h + 0.5 * a)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_beta_zero_is_gptq_bit_exact(model_type):
    ids = _ids()
    spec = QuantSpec(4, 32, False)
    g = quantize_blocks(_model(model_type), ids, EngineConfig(method="gptq", spec=spec, progress=False))
    k0 = quantize_blocks(_model(model_type), ids, EngineConfig(method="klawq", beta=0.0, tau=0.5, spec=spec,
                                                                progress=False))
    kb = quantize_blocks(_model(model_type), ids, EngineConfig(method="klawq", beta=2.0, tau=0.5, spec=spec,
                                                                progress=False))
    assert g.quantized.keys() == k0.quantized.keys()
    for name, qw in g.quantized.items():
        np.testing.assert_array_equal(qw.codes, k0.quantized[name].codes)
        np.testing.assert_array_equal(qw.scales, k0.quantized[name].scales)
    # beta > 0 really changes the Hessian: some codes move
    assert any(not np.array_equal(qw.codes, kb.quantized[n].codes) for n, qw in g.quantized.items())


def test_model_fisher_source():
    ids = _ids(4, 16)
    spec = QuantSpec(4, 32, True)
    res = quantize_blocks(_model("qwen2"), ids, EngineConfig(method="klawq", beta=1.0, kl_source="model",
                                                              spec=spec, micro_batch=2, progress=False))
    lay = quantize_blocks(_model("qwen2"), ids, EngineConfig(method="klawq", beta=1.0, kl_source="layer",
                                                              spec=spec, micro_batch=2, progress=False))
    assert len(res.quantized) == 14
    assert any(not np.array_equal(qw.codes, lay.quantized[n].codes) for n, qw in res.quantized.items())
    from klaq.toolchain.algorithms.klawq import model_fisher_weights

    model = _model("qwen2")
    w = model_fisher_weights(model, model.model.layers, {0: ["mlp.down_proj"], 1: ["self_attn.q_proj"]}, ids, 2, 0)
    assert set(w) == {"0.mlp.down_proj", "1.self_attn.q_proj"}
    for v in w.values():
        assert v.shape == (4, 16) and abs(float(v.mean()) - 1) < 1e-4 and (v >= 0).all()
    # the model comes back as it was: dtype and requires_grad restored
    assert next(model.parameters()).dtype == torch.float32 and all(p.requires_grad for p in model.parameters())
    with pytest.raises(KlaqError, match="kl-source"):
        quantize_blocks(_model("qwen2"), ids, EngineConfig(method="klawq", beta=1.0, kl_source="logits",
                                                            progress=False))
