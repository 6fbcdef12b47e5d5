"""Lazy, block-by-block loading: the same numbers as a fully loaded model, clear errors on bad files."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from klaq.errors import KlaqError
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.engine import EngineConfig, quantize_blocks
from klaq.toolchain.export import ExportConfig, export_model
from klaq.toolchain.lazy import lazy_weights, streamed
from klaq.toolchain.models import load_model
from klaq.toolchain.quantize import quantize_model_ex

# llama: one file, untied head; qwen2: q/k/v biases; gemma3_text: tied embeddings, 6 blocks,
# sliding-window and global attention
MODEL_TYPES = ["llama", "qwen2", "gemma3_text"]
METHODS = ["rtn", "gptq", "awq", "awq+gptq"]
BLOCK_TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def sharded_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama saved in several safetensors files with a model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    model.save_pretrained(out, max_shard_size="60KB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    assert (out / "model.safetensors.index.json").exists()
    return out


@pytest.fixture
def model_dir(request, tiny_model_dir, sharded_llama_dir):
    return sharded_llama_dir if request.param == "llama-sharded" else tiny_model_dir(request.param)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _assert_same_qweights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        for field in ("codes", "scales", "zeros"):
            x, y = getattr(a[name], field), getattr(b[name], field)
            assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), (name, field)


@pytest.mark.parametrize("model_dir", MODEL_TYPES + ["llama-sharded"], indirect=True)
def test_lazy_model_is_the_full_model(model_dir):
    """Blocks unloaded, the rest loaded; loading the blocks (or a streamed forward) gives exactly
    from_pretrained's tensors, dtypes, buffers, tied head and logits."""
    full = load_model(str(model_dir)).model
    model = load_model(str(model_dir), lazy=True).model
    lazy = lazy_weights(model)
    assert lazy is not None and lazy_weights(full) is None
    for name, p in model.named_parameters():
        assert p.is_meta == name.startswith("model.layers."), name
    for i, block in enumerate(model.model.layers):
        lazy.load_module(block, f"model.layers.{i}.")
    want, have = full.state_dict(), model.state_dict()
    assert want.keys() == have.keys()
    for k in want:
        assert want[k].dtype == have[k].dtype and torch.equal(want[k], have[k]), k
    assert {k: (v.dtype, v.tolist()) for k, v in full.named_buffers()} == \
           {k: (v.dtype, v.tolist()) for k, v in model.named_buffers()}
    tied = full.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied

    streaming = load_model(str(model_dir), lazy=True).model.float()
    ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), streamed(streaming):
        got = streaming(ids).logits
    assert all(p.is_meta for p in streaming.model.layers.parameters())  # dropped again after each forward
    with torch.no_grad():
        assert torch.equal(got, full.float()(ids).logits)


@pytest.mark.parametrize(("model_dir", "method"),
                         [(m, method) for m in MODEL_TYPES for method in METHODS] + [("llama-sharded", "awq+gptq")],
                         indirect=["model_dir"])
def test_lazy_quantization_is_bit_identical(model_dir, method):
    """Same QuantizedWeights, and the same model left behind (AWQ-folded fp32 norms and biases),
    as from the fully loaded model."""
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(4, 32, False)
    engine = EngineConfig(keep_weights=False, progress=False)
    runs = []
    for lazy in (False, True):
        model = load_model(str(model_dir), lazy=lazy).model
        q, _ = quantize_model_ex(model, method, spec, progress=False, calib_ids=ids, engine=engine)
        runs.append((q, {k: v for k, v in model.state_dict().items() if k not in q and not v.is_meta}))
    _assert_same_qweights(runs[0][0], runs[1][0])
    if method != "rtn":  # rtn leaves the model untouched: the lazy one's blocks stay on disk
        assert runs[0][1].keys() == runs[1][1].keys()
        for k, v in runs[0][1].items():
            assert v.dtype == runs[1][1][k].dtype and torch.equal(v, runs[1][1][k]), k


def test_lazy_engine_rtn_and_kept_weights(tiny_model_dir):
    """The engine's own RTN (no statistics) from disk, keeping the fake-quantized weights."""
    src = str(tiny_model_dir("gemma3_text"))
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    cfg = EngineConfig(method="rtn", spec=QuantSpec(4, 32, True), progress=False)
    full, lazy = load_model(src).model, load_model(src, lazy=True).model
    _assert_same_qweights(quantize_blocks(full, ids, cfg).quantized, quantize_blocks(lazy, ids, cfg).quantized)
    a, b = full.state_dict(), lazy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_lazy_export_writes_the_same_package(tiny_model_dir, tmp_path, model_type, method):
    """klaq-export is lazy by default; the package (GGUF, with the reference perplexity computed
    on the streamed model) is byte-identical to the --no-lazy one."""
    paths = {}
    for lazy in (True, False):
        paths[lazy] = tmp_path / f"{lazy}.gguf"
        res = export_model(ExportConfig(model=str(tiny_model_dir(model_type)), output=str(paths[lazy]), method=method,
                                        bits=4, group_size=32, n_calib=4, seqlen=64, reference_windows=1, lazy=lazy),
                           progress=False)
        assert res.lazy == lazy
    assert paths[True].read_bytes() == paths[False].read_bytes()


@pytest.mark.parametrize("method", ["fp16", "rtn"])
def test_lazy_export_onnx_is_the_same(tiny_llama_dir, tmp_path, method):
    """The ONNX package reads the lazy model's unquantized tensors from disk too."""
    outs = []
    for lazy in (True, False):
        out = tmp_path / str(lazy)
        export_model(ExportConfig(model=str(tiny_llama_dir), output=str(out), method=method, format="onnx",
                                  bits=4, group_size=32, reference_windows=0, lazy=lazy), progress=False)
        outs.append({p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outs[0] == outs[1]


def _without_tensor(src, dst, name):
    d = _copy(src, dst)
    tensors = load_file(d / "model.safetensors")
    del tensors[name]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_missing_tensor_is_a_clear_error_before_any_work(tiny_llama_dir, tmp_path):
    d = _without_tensor(tiny_llama_dir, tmp_path / "m", BLOCK_TENSOR)
    with pytest.raises(KlaqError, match=f"lack 1 tensor.*{BLOCK_TENSOR}"):
        load_model(str(d), lazy=True)
    from klaq.cli import export_cmd

    res = CliRunner().invoke(export_cmd, [str(d), "-o", str(tmp_path / "q.gguf"), "--reference-windows", "0"])
    assert res.exit_code != 0 and BLOCK_TENSOR in res.output and "Traceback" not in res.output


def test_bad_files_are_clear_errors(tiny_llama_dir, sharded_llama_dir, tmp_path):
    truncated = _copy(tiny_llama_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KlaqError, match="cannot read safetensors file"):
        load_model(str(truncated), lazy=True)

    lost = _copy(sharded_llama_dir, tmp_path / "lost")
    index = json.loads((lost / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][BLOCK_TENSOR]
    (lost / shard).unlink()
    with pytest.raises(KlaqError, match=f"{shard}.*missing"):
        load_model(str(lost), lazy=True)

    reshaped = _copy(tiny_llama_dir, tmp_path / "reshaped")
    tensors = load_file(reshaped / "model.safetensors")
    tensors[BLOCK_TENSOR] = tensors[BLOCK_TENSOR][:-1].contiguous()
    save_file(tensors, reshaped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KlaqError, match=f"{BLOCK_TENSOR} has shape"):
        load_model(str(reshaped), lazy=True)


def test_file_changed_under_a_lazy_model_is_a_clear_error(tiny_llama_dir, tmp_path):
    """A block's tensors are read only when the engine reaches it: a file gone by then is a
    KlaqError naming the tensors, not a traceback."""
    d = _copy(tiny_llama_dir, tmp_path / "m")
    model = load_model(str(d), lazy=True).model
    (d / "model.safetensors").unlink()
    with pytest.raises(KlaqError, match="cannot read model.layers.0"):
        quantize_model_ex(model, "rtn", QuantSpec(4, 32, True), progress=False)


def test_full_load_where_lazy_does_not_apply(tiny_llama_dir, tmp_path):
    """No safetensors (a pytorch_model.bin): the whole model, as before."""
    from transformers import AutoModelForCausalLM

    d = _copy(tiny_llama_dir, tmp_path / "bin")
    (d / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    lm = load_model(str(d), lazy=True)
    assert lazy_weights(lm.model) is None and not any(p.is_meta for p in lm.model.parameters())


def test_model_level_klawq_needs_the_full_model(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), lazy=True).model
    cfg = EngineConfig(method="klawq", beta=0.5, kl_source="model", progress=False)
    with pytest.raises(KlaqError, match="--no-lazy"):
        quantize_blocks(model, torch.zeros(2, 8, dtype=torch.long), cfg)
