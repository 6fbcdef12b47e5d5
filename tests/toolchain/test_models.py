import pytest

from klaq.errors import KlaqError
from klaq.toolchain.models import ALIASES, load_model, resolve_source


def test_unknown_model_lists_aliases():
    with pytest.raises(KlaqError) as exc:
        resolve_source("not-a-model")
    for alias in ALIASES:
        assert alias in str(exc.value)


def test_bad_paths(tmp_path):
    with pytest.raises(KlaqError, match="no such GGUF"):
        resolve_source(str(tmp_path / "m.gguf"))
    with pytest.raises(KlaqError, match="without config.json"):
        resolve_source(str(tmp_path))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("hf-hub", "HuggingFaceTB/SmolLM2-135M")


def test_gguf_source_is_dequantized_and_cached(tiny_llama_dir, tiny_q4_package, monkeypatch, tmp_path):
    """A .gguf source loads through transformers once, then from the fp16 cache."""
    import numpy as np
    import torch

    monkeypatch.setenv("KLAQ_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(tiny_q4_package))
    assert lm.gguf_path == str(tiny_q4_package) and lm.tokenizer_fields["tokenizer.ggml.model"] == "gpt2"
    assert next(lm.model.parameters()).dtype == torch.float16
    cached = list((tmp_path / "cache" / "fp16").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").exists()
    again = load_model(str(tiny_q4_package))
    a, b = lm.model.state_dict(), again.model.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_hf_dir_source(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir))
    assert lm.gguf_path is None and lm.model.config.model_type == "llama"


def test_hf_dir_passes_directories_through(tiny_llama_dir):
    from klaq.toolchain.models import hf_dir

    assert hf_dir(str(tiny_llama_dir)) == str(tiny_llama_dir)
