"""Per-architecture facts for packages, as tables (gguf-py's ``TensorNameMap`` in miniature).

Keys are Hugging Face ``config.model_type``. Each entry says which llama.cpp architecture the
package declares, how HF tensor names map to llama.cpp's, and whether Q/K rows must be permuted
(llama.cpp's ``llama`` arch applies RoPE to adjacent pairs, HF checkpoints to halves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from klaq.errors import KlaqError

_LLAMA_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


_GEMMA3_TENSORS = {
    **{k: v for k, v in _LLAMA_TENSORS.items() if "post_attention_layernorm" not in k},
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
}


@dataclass(frozen=True)
class PackageArch:
    gguf_arch: str  # general.architecture
    tensors: dict[str, str]  # HF name pattern -> GGUF name pattern, "{i}" = layer index
    permute_qk: bool  # llama.cpp RoPE type NORM (adjacent pairs) needs HF rows permuted
    norm_offset: float = 0.0  # Gemma: HF norms multiply by (1 + w); llama.cpp stores 1 + w
    _regex: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        for hf, gg in self.tensors.items():
            pattern = "^" + re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
            self._regex.append((re.compile(pattern), gg))

    def gguf_name(self, hf_name: str) -> str | None:
        for rx, gg in self._regex:
            m = rx.match(hf_name)
            if m:
                return gg.format(**m.groupdict())
        return None


PACKAGE_ARCHS: dict[str, PackageArch] = {
    "llama": PackageArch("llama", _LLAMA_TENSORS, permute_qk=True),
    # llama.cpp loads Mistral checkpoints as its llama architecture.
    "mistral": PackageArch("llama", _LLAMA_TENSORS, permute_qk=True),
    # NEOX RoPE (rotate-half) in llama.cpp: rows stay in HF order.
    "qwen2": PackageArch("qwen2", _LLAMA_TENSORS, permute_qk=False),
    "gemma3_text": PackageArch("gemma3", _GEMMA3_TENSORS, permute_qk=False, norm_offset=1.0),
}


def get_package_arch(model_type: str) -> PackageArch:
    try:
        return PACKAGE_ARCHS[model_type]
    except KeyError:
        raise KlaqError(
            f"unsupported architecture {model_type!r} for GGUF packages; supported: "
            f"{', '.join(PACKAGE_ARCHS)} (extend PACKAGE_ARCHS in formats/arch.py)"
        ) from None


def permute_rows(x, n_heads: int):
    """HF rotate-half row order -> llama.cpp adjacent-pair order (convert_hf_to_gguf's permute).

    Works on any array whose first axis is ``n_heads * head_dim`` (weights, codes, scales, biases);
    rows move as a whole, so per-row quantization groups are unchanged.
    """
    rows = x.shape[0]
    head_dim = rows // n_heads
    rest = x.shape[1:]
    return x.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def unpermute_rows(x, n_heads: int):
    """Inverse of :func:`permute_rows`."""
    rows = x.shape[0]
    head_dim = rows // n_heads
    rest = x.shape[1:]
    return x.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
