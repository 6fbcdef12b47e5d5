"""Export a tiny random Llama and hold the numpy runtime to transformers' numbers."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from klaq.formats.gguf_package import read_package
from klaq.runtime.package import load_package
from klaq.toolchain.export import ExportConfig, export_model

PROMPT = "The pickle module implements binary protocols"


def _export(src, out, **kw):
    return export_model(ExportConfig(model=str(src), output=str(out), **kw), progress=False)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _greedy_hf(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _greedy_runtime(pkg, ids, n):
    cache = pkg.model.new_cache(len(ids) + n)
    logits = pkg.model.forward(ids, cache)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = pkg.model.forward([out[-1]], cache)
    return out


@pytest.fixture(scope="module")
def f16_package(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("pkg") / "tiny-f16.gguf"
    _export(tiny_llama_dir, path, method="fp16")
    return path


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_f16_logits_match_transformers(tiny_model_dir, tmp_path, model_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir(model_type)
    _export(src, tmp_path / "f16.gguf", method="fp16")
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    pkg = load_package(str(tmp_path / "f16.gguf"))
    ids = pkg.tokenizer.encode(PROMPT)
    assert ids == tok(PROMPT).input_ids  # the package's tokenizer is the model's tokenizer
    ref = _hf_logits(hf, ids)
    got = pkg.model.forward(ids, pkg.model.new_cache(len(ids)))
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    # incremental decode through the KV cache gives the same last-token logits as a full pass
    assert _greedy_runtime(pkg, ids, 12) == _greedy_hf(hf, ids, 12)
    if model_type == "gemma3_text":  # past the sliding window (8): local layers must drop old keys
        long_ids = pkg.tokenizer.encode(PROMPT * 3)
        assert len(long_ids) > 24
        ref = _hf_logits(hf, long_ids)
        got = pkg.model.forward(long_ids, pkg.model.new_cache(len(long_ids)))
        assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_f16_package_metadata(f16_package):
    pf = read_package(f16_package)
    assert pf.hparams.n_layers == 2 and pf.hparams.hidden == 96 and pf.hparams.n_kv_heads == 2
    assert pf.meta["method"] == "fp16" and pf.meta["llama_cpp_compatible"] is True
    assert pf.fields["llama.context_length"] == 256
    assert pf.tensors["blk.0.attn_q.weight"].type == T.F16
    assert pf.tensors["blk.0.attn_norm.weight"].type == T.F32
    assert "output.weight" in pf.tensors  # untied head


@pytest.mark.parametrize("model_type,sym,typ", [("llama", True, T.Q4_0), ("llama", False, T.Q4_1),
                                                ("qwen2", True, T.Q4_0), ("gemma3_text", False, T.Q4_1)])
def test_transformers_loads_quantized_package(tiny_model_dir, tmp_path, model_type, sym, typ):
    """transformers' own GGUF loader (undoing our Q/K permutation, Gemma's norm +1) agrees with
    the numpy runtime: the package is what llama.cpp's converter would have written."""
    from transformers import AutoModelForCausalLM, GgufConfig

    path = tmp_path / "tiny-q4.gguf"
    _export(tiny_model_dir(model_type), path, method="rtn", bits=4, group_size=64, sym=sym)
    pkg = load_package(str(path))
    assert pkg.file.tensors["blk.1.ffn_down.weight"].type == typ  # K = 160: ragged last group
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                              quantization_config=GgufConfig(dequantize=True)).eval()
    if model_type == "gemma3_text":
        # transformers' GGUF reader does not read Gemma's attention scale and assumes 256**-0.5;
        # llama.cpp (and klaq) use 1/sqrt(head_dim), which is what the tiny config asks for.
        for layer in hf.model.layers:
            layer.self_attn.scaling = pkg.file.hparams.head_dim**-0.5
    ids = pkg.tokenizer.encode(PROMPT)
    ref = _hf_logits(hf, ids)
    got = pkg.model.forward(ids, pkg.model.new_cache(len(ids)))
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("bits,sym,group", [(8, True, 32), (3, False, 64), (2, True, 32), (4, True, -1)])
def test_other_widths_roundtrip_through_runtime(tiny_llama_dir, tmp_path, bits, sym, group):
    """Every supported width exports and the runtime reproduces the quantized model exactly."""
    from transformers import AutoModelForCausalLM

    from klaq.toolchain.algorithms.grid import QuantSpec
    from klaq.toolchain.quantize import quantize_model

    path = tmp_path / "tiny.gguf"
    res = _export(tiny_llama_dir, path, method="rtn", bits=bits, group_size=group, sym=sym)
    assert res.n_quantized == 14
    pkg = load_package(str(path))
    assert pkg.file.meta["llama_cpp_compatible"] is (bits in (4, 8))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    q = quantize_model(hf, "rtn", QuantSpec(bits, group, sym), progress=False)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in q:
                p.copy_(torch.from_numpy(q[name].dequantize()))
    ids = pkg.tokenizer.encode(PROMPT)
    ref = _hf_logits(hf, ids)
    got = pkg.model.forward(ids, pkg.model.new_cache(len(ids)))
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def test_reference_perplexity_recorded_and_matches_verify(tiny_llama_dir, tmp_path):
    from klaq.toolchain.verify import verify_package

    path = tmp_path / "q.gguf"
    _export(tiny_llama_dir, path, method="rtn", bits=4, group_size=32, sym=True, reference_windows=2)
    meta = read_package(path).meta
    assert meta["reference_ppl_protocol"] == "pydoc:eval:ctx512:windows2"
    rep = verify_package(str(path), str(tiny_llama_dir), "pydoc", 512, 1.0, max_windows=2, progress=False)
    assert meta["reference_ppl"] == pytest.approx(rep.ppl_reference, rel=1e-5)


def test_fp_target_without_stages_is_refused_before_any_output(tiny_llama_dir, tmp_path):
    from klaq.errors import KlaqError

    out = tmp_path / "m.gguf"
    with pytest.raises(KlaqError, match="true-sequential"):
        _export(tiny_llama_dir, out, method="gptq", fp_target=1.0, true_sequential=False)
    assert not out.exists()


@pytest.mark.parametrize("opts, message", [
    (dict(method="awq", fp_target=1.0), "no such fit"),
    (dict(method="gptq", rounding="bogus"), "--rounding"),
    (dict(method="gptq", damp=-1.0), "--damp >= 0"),
    (dict(method="klawq", beta=0.5, norm_tokens=True), "one or the other"),
])
def test_engine_options_are_refused_before_the_model_loads(tmp_path, opts, message):
    """export_model checks the engine options (engine.check_engine_config) before it loads anything:
    the model path does not exist, so reaching the loader would raise a different error."""
    from klaq.errors import KlaqError

    out = tmp_path / "m.gguf"
    with pytest.raises(KlaqError, match=message):
        _export(tmp_path / "no-such-model", out, **opts)
    assert not out.exists()


@pytest.mark.parametrize("model_type,opts,expect", [
    ("gemma3_text", {}, "shrink=0,norm_tokens=1,fp_target=1"),  # archs.GPTQ_DEFAULTS
    ("gemma3_text", dict(shrink=0.5, norm_tokens=False), "shrink=0.5,fp_target=1"),
    ("gemma3_text", dict(fp_target=0.0), "shrink=0,norm_tokens=1"),
    ("gemma3_text", dict(true_sequential=False), "shrink=0,norm_tokens=1"),
    ("llama", {}, "shrink=0.5"),
])
def test_manifest_records_the_resolved_gptq_defaults(tiny_model_dir, tmp_path, model_type, opts, expect):
    path = tmp_path / "q.gguf"
    _export(tiny_model_dir(model_type), path, method="gptq", bits=4, group_size=32, n_calib=2, seqlen=32,
            reference_windows=0, **opts)
    options = read_package(path).meta["method_options"]
    assert options.endswith(expect)
    assert ("norm_tokens=1" in options) == ("norm_tokens=1" in expect)


@pytest.mark.parametrize("engine,expect", [
    (dict(method="gptq"),
     "rounding=nearest,propagate=1,true_sequential=1,damp=0.01,act_order=1,shrink=0,norm_tokens=1,fp_target=1"),
    (dict(method="klawq", beta=0.5, tau=2.0, shrink=0.3, fp_target=1.0, rounding="greedy", propagate=False),
     "rounding=greedy,propagate=0,true_sequential=1,damp=0.01,act_order=1,shrink=0.3,fp_target=1,"
     "beta=0.5,tau=2,kl_source=layer"),
    (dict(method="awq", salience="l2", true_sequential=False), "rounding=nearest,propagate=1,true_sequential=0,salience=l2"),
])
def test_method_options_come_from_the_resolved_engine_alone(engine, expect):
    """The manifest string is read from one config, after the architecture's defaults are resolved."""
    from klaq.toolchain.engine import EngineConfig, resolve_defaults
    from klaq.toolchain.export import method_options

    assert method_options(resolve_defaults(EngineConfig(**engine), "gemma3_text")) == expect
