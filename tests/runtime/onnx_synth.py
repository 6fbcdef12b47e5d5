"""Synthetic klaq Packages (no torch): random quantized decoders for the ONNX tests.

head_dim 16 so that onnxruntime's GroupQueryAttention (head_dim % 16 == 0) is exercised; hidden 64
and ffn 96 so that group sizes 64/128 leave ragged last groups.
"""

from __future__ import annotations

import numpy as np

from klaq.formats.gguf_package import HParams, Package
from klaq.formats.qweight import QuantizedWeight, n_groups
from klaq.formats.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TokenizerFacts

ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}  # model_type -> HParams.arch


def byte_tokenizer() -> TokenizerFacts:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", *alphabet]
    types = [TOKEN_CONTROL] + [TOKEN_NORMAL] * len(alphabet)
    return TokenizerFacts(model="gpt2", tokens=tokens, token_types=types, merges=[], pre="gpt-2", bos_id=0,
                          eos_id=0, add_bos=True)


def random_qweight(rng, n: int, k: int, bits: int, group: int, sym: bool, std: float = 0.08) -> QuantizedWeight:
    g = n_groups(k, group)
    half = 1 << (bits - 1)
    scales = (std / (0.6 * half) * (0.5 + rng.random((n, g)))).astype(np.float16)
    codes = np.clip(np.rint(rng.standard_normal((n, k)) * 0.6 * half) + half, 0, 2 * half - 1).astype(np.uint8)
    zeros = None if sym else np.clip(half + rng.integers(-2, 3, (n, g)), 0, 2 * half - 1).astype(np.uint8)
    return QuantizedWeight(codes, scales, zeros, bits, group)


def synthetic_package(model_type: str = "llama", bits: int = 4, group: int = 64, sym: bool = False, seed: int = 0,
                      n_layers: int | None = None, tied: bool | None = None) -> Package:
    rng = np.random.default_rng(seed)
    arch = ARCHS[model_type]
    tok = byte_tokenizer()
    gemma = arch == "gemma3"
    hidden, ffn, heads, kv, hd = 64, 96, 4, 2, 16
    n_layers = n_layers or (6 if gemma else 2)
    tied = gemma if tied is None else tied
    hp = HParams(arch=arch, n_layers=n_layers, hidden=hidden, ffn=ffn, n_heads=heads, n_kv_heads=kv, head_dim=hd,
                 rope_theta=1e6 if gemma else 10000.0, rms_eps=1e-6, context_length=256, vocab_size=len(tok.tokens),
                 sliding_window=8 if gemma else 0)
    norm = lambda n: ((0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    q = lambda n, k: random_qweight(rng, n, k, bits, group, sym)  # noqa: E731
    t: dict = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((hp.vocab_size, hidden))).astype(np.float16)
               .astype(np.float32)}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm(hidden)
        t[f"{p}.self_attn.q_proj.weight"] = q(heads * hd, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = q(kv * hd, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = q(kv * hd, hidden)
        t[f"{p}.self_attn.o_proj.weight"] = q(hidden, heads * hd)
        if arch == "qwen2":
            for name, n in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                t[f"{p}.self_attn.{name}_proj.bias"] = (0.05 * rng.standard_normal(n)).astype(np.float32)
        if gemma:
            t[f"{p}.self_attn.q_norm.weight"] = norm(hd)
            t[f"{p}.self_attn.k_norm.weight"] = norm(hd)
            t[f"{p}.pre_feedforward_layernorm.weight"] = norm(hidden)
            t[f"{p}.post_feedforward_layernorm.weight"] = norm(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
        t[f"{p}.mlp.gate_proj.weight"] = q(ffn, hidden)
        t[f"{p}.mlp.up_proj.weight"] = q(ffn, hidden)
        t[f"{p}.mlp.down_proj.weight"] = q(hidden, ffn)
    t["model.norm.weight"] = norm(hidden)
    if not tied:
        t["lm_head.weight"] = (0.1 * rng.standard_normal((hp.vocab_size, hidden))).astype(np.float16).astype(np.float32)
    meta = {"method": "synthetic", "bits": bits, "group_size": group, "sym": sym}
    return Package(model_type, hp, t, tok, meta, name=f"synthetic-{model_type}")
