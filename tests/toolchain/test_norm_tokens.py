"""Norm-weighted GPTQ Hessians: tokens weighted by 1 / ms of a linear's output where an RMSNorm
normalizes that output (Gemma 3's post-norms and q/k norms, Qwen 3's q/k norms)."""

import numpy as np
import pytest
import torch
from tiny_archs import _ids, _model

from klaq.errors import KlaqError
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.algorithms.klawq import norm_token_weights
from klaq.toolchain.archs import get_quant_arch
from klaq.toolchain.engine import EngineConfig, quantize_blocks


def test_norm_token_weights_formula():
    torch.manual_seed(0)
    x, w = torch.randn(12, 6), torch.randn(8, 6)
    y = x @ w.T
    torch.testing.assert_close(norm_token_weights(x, w, 8, chunk=5), 1 / y.pow(2).mean(-1))
    ms = y.reshape(12, 4, 2).pow(2).mean(-1)  # per-head norms: the mean of the heads' weights
    torch.testing.assert_close(norm_token_weights(x, w, 2), (1 / ms.clamp_min(0.01 * ms.mean(0))).mean(-1))
    # a token whose output is ~0 is floored at 1% of the batch's mean square, not infinite
    x[0] = 0
    k = norm_token_weights(x, w, 8)
    assert torch.isfinite(k).all() and float(k[0]) == pytest.approx(1 / (0.01 * float(y[1:].pow(2).mean(-1).sum() / 12)))
    # doubling a token's output quarters its weight
    x2 = torch.randn(3, 6)
    x2[1] = 2 * x2[0]
    k2 = norm_token_weights(x2, w, 8)
    assert float(k2[1]) == pytest.approx(float(k2[0]) / 4)


def test_arch_table_names_norms_that_exist():
    for model_type, expect in [("gemma3_text", 4), ("qwen3", 2), ("llama", 0)]:
        arch = get_quant_arch(model_type)
        assert len(arch.normed) == expect
        block = _model(model_type).get_submodule(arch.layers)[0]
        for lin, norm in arch.normed:
            block.get_submodule(lin)
            block.get_submodule(norm)


def _codes(res):
    return {n: qw.codes for n, qw in res.quantized.items()}


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3"])
def test_only_normed_linears_change(model_type):
    """Each block sees the FP inputs, all linears at once (no propagation): only the weights whose
    Hessian is norm-weighted can change."""
    ids = _ids()
    kw = dict(method="gptq", spec=QuantSpec(4, 32, False), propagate=False, true_sequential=False, progress=False)
    plain = _codes(quantize_blocks(_model(model_type), ids, EngineConfig(norm_tokens=False, **kw)))
    normed = _codes(quantize_blocks(_model(model_type), ids, EngineConfig(norm_tokens=True, **kw)))
    lins = {lin for lin, _ in get_quant_arch(model_type).normed}
    changed = {n for n in plain if not np.array_equal(plain[n], normed[n])}
    touched = {n for n in plain if n.split(".", 3)[3].removesuffix(".weight") in lins}
    assert changed and changed <= touched


def test_llama_has_no_output_norms_so_nothing_changes():
    ids = _ids()
    spec = QuantSpec(4, 32, True)
    plain = _codes(quantize_blocks(_model("llama"), ids, EngineConfig(method="gptq", spec=spec, progress=False)))
    normed = _codes(quantize_blocks(_model("llama"), ids, EngineConfig(method="gptq", spec=spec, norm_tokens=True,
                                                                       progress=False)))
    for n in plain:
        np.testing.assert_array_equal(plain[n], normed[n])


def test_not_with_klawq():
    with pytest.raises(KlaqError, match="norm-tokens"):
        quantize_blocks(_model("qwen3"), _ids(), EngineConfig(method="klawq", beta=1.0, norm_tokens=True,
                                                              progress=False))


def test_gptq_on_gemma3_defaults_to_no_shrink_norm_tokens_and_fp_target():
    """archs.GPTQ_DEFAULTS: `gptq` left at its defaults on Gemma 3 is `gptq` with shrink 0,
    norm-weighted Hessians and the FP-output fit (ridge 1), code for code; on Llama it keeps shrink
    0.5 without norm weighting or the fit."""
    ids, spec = _ids(), QuantSpec(4, 32, False)

    def gptq(model_type, **opts):
        return _codes(quantize_blocks(_model(model_type), ids, EngineConfig(method="gptq", spec=spec, progress=False,
                                                                            **opts)))

    for model_type, explicit in [("gemma3_text", dict(shrink=0.0, norm_tokens=True, fp_target=1.0)),
                                 ("llama", dict(shrink=0.5, norm_tokens=False, fp_target=0.0))]:
        default, pinned = gptq(model_type), gptq(model_type, **explicit)
        assert default.keys() == pinned.keys()
        for n in default:
            np.testing.assert_array_equal(default[n], pinned[n])
    # on Gemma 3 the generic options give other codes, so the identity above is not vacuous
    default = gptq("gemma3_text")
    for other in (dict(shrink=0.5, norm_tokens=False, fp_target=0.0), dict(fp_target=0.0)):
        generic = gptq("gemma3_text", **other)
        assert any(not np.array_equal(default[n], generic[n]) for n in default)


def test_resolve_defaults_per_method_and_arch():
    from klaq.toolchain.engine import resolve_defaults

    gemma = resolve_defaults(EngineConfig(method="gptq"), "gemma3_text")
    assert (gemma.shrink, gemma.norm_tokens, gemma.fp_target) == (0.0, True, 1.0)
    # what the user sets wins
    mine = resolve_defaults(EngineConfig(method="gptq", shrink=0.2, norm_tokens=False, fp_target=0.0), "gemma3")
    assert (mine.shrink, mine.norm_tokens, mine.fp_target) == (0.2, False, 0.0)
    # the FP-output fit needs true-sequential stages: without them its default is off, not an error
    one_pass = resolve_defaults(EngineConfig(method="gptq", true_sequential=False), "gemma3_text")
    assert (one_pass.shrink, one_pass.norm_tokens, one_pass.fp_target) == (0.0, True, 0.0)
    # AWQ-scaled GPTQ and KLAWQ keep the generic defaults (measured: awq+gptq with shrink 0 lost on Gemma)
    for method in ("awq+gptq", "klawq", "awq+klawq"):
        other = resolve_defaults(EngineConfig(method=method), "gemma3_text")
        assert (other.shrink, other.norm_tokens, other.fp_target) == (0.5, False, 0.0)
    llama = resolve_defaults(EngineConfig(method="gptq"), "llama")
    assert (llama.shrink, llama.norm_tokens, llama.fp_target) == (0.5, False, 0.0)
