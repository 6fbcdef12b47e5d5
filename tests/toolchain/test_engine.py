"""The sequential engine on tiny random models of every supported architecture."""

import numpy as np
import pytest
import torch
from tiny_archs import _ids, _model

from klaq.errors import KlaqError
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.archs import QUANT_ARCHS
from klaq.toolchain.engine import EngineConfig, capture_inputs, quantize_blocks, run_block

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "opt"]


@pytest.mark.parametrize("model_type", ARCHS)
def test_capture_replays_the_model(model_type):
    """Captured block-0 inputs + per-block kwargs, run block by block, give the model's own hidden
    states (per-block masks and RoPE for Gemma 3, positional arguments for GPT-2)."""
    model = _model(model_type).float()
    arch = QUANT_ARCHS[model_type]
    layers = model.get_submodule(arch.layers)
    ids = _ids(6, 24)
    inputs, kwargs = capture_inputs(model, layers, ids, micro_batch=4)
    assert [x.shape[0] for x in inputs] == [4, 2]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    h = inputs
    for i in range(len(layers) - 1):
        h = run_block(layers[i], h, kwargs[i], "cpu")
        torch.testing.assert_close(torch.cat(h), hs[i + 1].float(), rtol=1e-4, atol=1e-4)


def _logits(model, ids):
    with torch.no_grad():
        return model.float()(ids).logits


@pytest.mark.parametrize("model_type", ARCHS)
def test_each_architecture_quantizes_end_to_end(model_type):
    arch = QUANT_ARCHS[model_type]
    ids = _ids()
    ref = _logits(_model(model_type), ids)
    errs = {}
    for method in ("rtn", "gptq"):
        model = _model(model_type)
        res = quantize_blocks(model, ids, EngineConfig(method=method, spec=QuantSpec(3, 32, False), progress=False))
        n_linears = sum(len(s) for s in arch.stages) * len(model.get_submodule(arch.layers))
        assert len(res.quantized) == n_linears and res.peak_rss_mb > 0
        params = dict(model.named_parameters())
        for name, qw in res.quantized.items():  # the model now holds exactly the package's weights
            w = params[name].detach().float()
            np.testing.assert_array_equal(qw.dequantize(), (w.T if arch.conv1d else w).numpy())
        errs[method] = float(((_logits(model, ids) - ref) ** 2).mean())
    assert errs["gptq"] < errs["rtn"]  # on the calibration tokens GPTQ must win


def test_deterministic_and_switches():
    ids = _ids()
    spec = QuantSpec(4, 32, True)
    runs = [quantize_blocks(_model("llama"), ids, EngineConfig(method="gptq", spec=spec, progress=False))
            for _ in range(2)]
    for k, qw in runs[0].quantized.items():
        np.testing.assert_array_equal(qw.codes, runs[1].quantized[k].codes)
    # switching off propagation / true-sequential changes what later layers see, so their codes
    other = [quantize_blocks(_model("llama"), ids, EngineConfig(method="gptq", spec=spec, progress=False, **kw))
             for kw in ({"propagate": False}, {"true_sequential": False})]
    for res in other:
        first = "model.layers.0.self_attn.q_proj.weight"  # stage 1 of block 0 sees identical inputs
        np.testing.assert_array_equal(res.quantized[first].codes, runs[0].quantized[first].codes)
        assert any(not np.array_equal(qw.codes, runs[0].quantized[k].codes) for k, qw in res.quantized.items())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_processed_blocks_return_in_the_model_dtype(method):
    """An fp16 model stays an fp16 model (no fp32 copy of every processed block on the host): the
    quantized linears hold fp16(dequantized), the norms (with AWQ's folded scales) stay fp32;
    keep_weights=False drops the quantized weights and changes nothing else."""
    spec = QuantSpec(4, 32, False)
    kept, dropped = _model("llama").half(), _model("llama").half()
    res = quantize_blocks(kept, _ids(), EngineConfig(method=method, spec=spec, progress=False))
    res2 = quantize_blocks(dropped, _ids(), EngineConfig(method=method, spec=spec, progress=False, keep_weights=False))
    params, params2 = dict(kept.named_parameters()), dict(dropped.named_parameters())
    for name, qw in res.quantized.items():
        np.testing.assert_array_equal(qw.codes, res2.quantized[name].codes)
        assert params[name].dtype == torch.float16 and params2[name].numel() == 0
        torch.testing.assert_close(params[name], torch.from_numpy(qw.dequantize()).half(), rtol=0, atol=0)
    rest = [n for n in params if n not in res.quantized and ".layers." in n]
    assert rest and all(params[n].dtype == torch.float32 for n in rest)
    for n in rest:
        torch.testing.assert_close(params[n], params2[n], rtol=0, atol=0)
    if method == "awq":  # the folded norm scales are not fp16-rounded
        norm = params["model.layers.0.input_layernorm.weight"]
        assert not torch.equal(norm, norm.half().float())


def test_augment_calibrates_on_the_shuffled_windows_too():
    """augment = f is exactly calibrating on data.shuffled_windows(ids, f, seed)."""
    from klaq.toolchain.data import shuffled_windows

    ids, spec = _ids(8, 16), QuantSpec(4, 32, False)
    aug = quantize_blocks(_model("llama"), ids, EngineConfig(method="gptq", spec=spec, augment=0.5, progress=False))
    ref = quantize_blocks(_model("llama"), shuffled_windows(ids.numpy(), 0.5, 0),
                          EngineConfig(method="gptq", spec=spec, progress=False))
    plain = quantize_blocks(_model("llama"), ids, EngineConfig(method="gptq", spec=spec, progress=False))
    for k, qw in aug.quantized.items():
        np.testing.assert_array_equal(qw.codes, ref.quantized[k].codes)
    assert any(not np.array_equal(qw.codes, plain.quantized[k].codes) for k, qw in aug.quantized.items())


def test_micro_batch_size_does_not_change_the_result():
    ids = _ids(8, 16)
    a = quantize_blocks(_model("qwen2"), ids, EngineConfig(method="gptq", micro_batch=8, progress=False))
    b = quantize_blocks(_model("qwen2"), ids, EngineConfig(method="gptq", micro_batch=3, progress=False))
    same = [np.array_equal(qw.codes, b.quantized[k].codes) for k, qw in a.quantized.items()]
    assert np.mean(same) > 0.8  # fp32 sums in another order: rare rounding ties may flip


def test_unsupported_architecture_and_bad_options():
    model = _model("llama")
    model.config.model_type = "mamba"
    with pytest.raises(KlaqError, match="QUANT_ARCHS in toolchain/archs.py"):
        quantize_blocks(model, _ids(), EngineConfig(progress=False))
    with pytest.raises(KlaqError, match="rounding"):
        quantize_blocks(_model("llama"), _ids(), EngineConfig(rounding="up", progress=False))
    with pytest.raises(KlaqError, match="unknown method"):
        quantize_blocks(_model("llama"), _ids(), EngineConfig(method="spqr", progress=False))


def test_awq_methods_need_awq_module():
    try:
        import klaq.toolchain.algorithms.awq  # noqa: F401
    except ImportError:
        with pytest.raises(KlaqError, match="awq"):
            quantize_blocks(_model("llama"), _ids(), EngineConfig(method="awq+gptq", progress=False))
    else:
        res = quantize_blocks(_model("llama"), _ids(), EngineConfig(method="awq+gptq", progress=False))
        assert len(res.quantized) == 14


@pytest.mark.parametrize("method", ["gptq", "klawq"])
def test_calibrated_export_roundtrips_through_runtime(tiny_llama_dir, tmp_path, method):
    """gptq / klawq export through the GGUF writer; the numpy runtime reproduces the quantized model."""
    from transformers import AutoModelForCausalLM

    from klaq.formats.gguf_package import read_package
    from klaq.runtime.package import load_package
    from klaq.toolchain.export import ExportConfig, export_model

    out = tmp_path / "m.gguf"
    res = export_model(ExportConfig(model=str(tiny_llama_dir), output=str(out), method=method, bits=3, group_size=64,
                                    sym=False, n_calib=8, seqlen=64, beta=0.2), progress=False)
    assert res.n_quantized == 14 and res.peak_rss_mb > 0 and res.quant_seconds > 0
    meta = read_package(out).meta
    assert meta["method"] == method and meta["calibration"] == "pydoc:8x64:seed0"
    assert len(meta["calibration_hash"]) == 16 and "damp=0.01" in meta["method_options"]
    # the same quantization in memory, loaded into transformers, matches the runtime's logits
    from klaq.toolchain.export import calibration_ids
    from klaq.toolchain.models import load_model
    from klaq.toolchain.quantize import quantize_model

    lm = load_model(str(tiny_llama_dir))
    calib = calibration_ids(lm, ExportConfig(model="", output="", n_calib=8, seqlen=64))
    q = quantize_model(lm.model, method, QuantSpec(3, 64, False), progress=False, calib_ids=calib,
                       engine=EngineConfig(beta=0.2))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in q:
                p.copy_(torch.from_numpy(q[name].dequantize()))
    pkg = load_package(str(out))
    ids = pkg.tokenizer.encode("The pickle module implements binary protocols")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = pkg.model.forward(ids, pkg.model.new_cache(len(ids)))
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
