"""Per-architecture facts for calibration-based quantization, as data keyed by HF ``model_type``.

Each :class:`QuantArch` says where the decoder blocks live, which linears a block has (in
true-sequential order: a stage's linears see the same input), and which scaling groups exist:
an op whose output feeds a set of linears, so a per-input-channel scale ``s`` can be divided out of
that op and multiplied into the linears (AWQ). Adding an architecture is a few lines here; no class.

Module paths inside a block are relative to the block. ``prev_kind`` tells how to fold a scale
into the previous op: ``rmsnorm`` (weight / s), ``rmsnorm1p`` (Gemma: the norm multiplies by
``1 + w``, so ``w' = (1 + w) / s - 1``), ``layernorm`` (weight and bias / s), ``linear`` (rows of
the previous linear's weight and bias / s). ``inspect`` is the module whose output measures the
group's loss (the attention or MLP sub-block). ``conv1d`` marks GPT-2's transposed ``Conv1D``
linears (weight stored ``[in, out]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from klaq.errors import KlaqError


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module whose output feeds `linears`
    prev_kind: str  # rmsnorm | rmsnorm1p | layernorm | linear
    linears: tuple[str, ...]
    inspect: str  # module whose output is compared before/after (the loss of the search)
    optional: bool = False  # skipped when shapes do not allow it (e.g. v -> o under GQA)


@dataclass(frozen=True)
class QuantArch:
    layers: str  # dotted path to the ModuleList of decoder blocks
    stages: tuple[tuple[str, ...], ...]  # true-sequential order of the block's linears
    groups: tuple[ScaleGroup, ...]
    conv1d: bool = False
    # (linear, norm): an RMSNorm that normalizes this linear's *output* (Gemma 3's post-norms after
    # o_proj / down_proj, Qwen 3's and Gemma 3's per-head q_norm / k_norm). Its Jacobian scales an
    # output error by 1 / rms, which the engine's norm-weighted Hessian (``norm_tokens``) uses.
    normed: tuple[tuple[str, str], ...] = ()


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_STAGES = (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


_QK_NORMS = (("self_attn.q_proj", "self_attn.q_norm"), ("self_attn.k_proj", "self_attn.k_norm"))


def _llama_like(norm_kind: str, mlp_norm: str, normed: tuple[tuple[str, str], ...] = ()) -> QuantArch:
    return QuantArch(
        layers="model.layers",
        stages=_LLAMA_STAGES,
        groups=(
            ScaleGroup("input_layernorm", norm_kind, _ATTN, "self_attn"),
            ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj", optional=True),
            ScaleGroup(mlp_norm, norm_kind, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
        ),
        normed=normed,
    )


QUANT_ARCHS: dict[str, QuantArch] = {
    "llama": _llama_like("rmsnorm", "post_attention_layernorm"),
    "mistral": _llama_like("rmsnorm", "post_attention_layernorm"),
    "qwen2": _llama_like("rmsnorm", "post_attention_layernorm"),
    "qwen3": _llama_like("rmsnorm", "post_attention_layernorm", _QK_NORMS),
    # Gemma 3: post_attention_layernorm normalizes the attention *output*; the MLP input norm is
    # pre_feedforward_layernorm.
    "gemma3_text": _llama_like("rmsnorm1p", "pre_feedforward_layernorm",
                               _QK_NORMS + (("self_attn.o_proj", "post_attention_layernorm"),
                                            ("mlp.down_proj", "post_feedforward_layernorm"))),
    "opt": QuantArch(
        layers="model.decoder.layers",
        stages=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                ("fc1",), ("fc2",)),
        groups=(
            ScaleGroup("self_attn_layer_norm", "layernorm",
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            ScaleGroup("self_attn.v_proj", "linear", ("self_attn.out_proj",), "self_attn.out_proj"),
            ScaleGroup("final_layer_norm", "layernorm", ("fc1",), "fc1"),
            # ReLU is positively homogeneous: relu(x / s) = relu(x) / s, so fc1's rows can carry it
            ScaleGroup("fc1", "linear", ("fc2",), "fc2"),
        ),
    ),
    "gpt2": QuantArch(
        layers="transformer.h",
        stages=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        groups=(
            ScaleGroup("ln_1", "layernorm", ("attn.c_attn",), "attn"),
            # v is the last third of the fused c_attn outputs (a linear prev scales its last rows)
            ScaleGroup("attn.c_attn", "linear", ("attn.c_proj",), "attn.c_proj", optional=True),
            ScaleGroup("ln_2", "layernorm", ("mlp.c_fc",), "mlp"),
        ),
        conv1d=True,
    ),
}
QUANT_ARCHS["gemma3"] = QUANT_ARCHS["gemma3_text"]

# GPTQ's defaults where one architecture measured differently from the rest (`gptq` only: AWQ's
# scaled weights and KLAWQ's H + beta A keep the generic ones). Every other architecture takes
# GPTQ_GENERIC. Evidence in BENCHMARKS.md:
# - generic: Hessian shrink 0.5 was the best of 0 / 0.5 / 2 on SmolLM2 W4 g64 (held-out KL in- and
#   out-of-domain); norm weighting changes nothing where no linear's output is normalized.
# - gemma3: shrink 0 was the best of 0 / 0.1 / 0.2 / 0.5 on Gemma-3-270M W4 g128 and of 0 / 0.05 / 0.5
#   at W3 (0.5: W4 KL 0.236 / 0.373 against 0.204 / 0.342; W3 0.849 / 1.594 against 0.669 / 1.177
#   with norm weighting); norm-weighted Hessians (its post-norms and q/k norms) took W4's
#   out-of-domain KL from 0.342 to 0.327. The FP-output fit (fp_target, ridge 1) is what put `gptq`
#   ahead of llm-compressor's GPTQ on all four held-out figures at W3, where plain GPTQ is 5% behind
#   out of domain (same environment: 189.2 against 179.7); at W4 both are ahead on all four. It costs
#   about 1.6x the quantization time (one more FP forward per stage), so it stays off elsewhere.
#   fp_target needs true-sequential stages: with true_sequential=False its default is 0 (resolve_defaults).
GPTQ_GENERIC: dict[str, object] = {"shrink": 0.5, "norm_tokens": False, "fp_target": 0.0}
GPTQ_DEFAULTS: dict[str, dict[str, object]] = {
    "gemma3_text": {"shrink": 0.0, "norm_tokens": True, "fp_target": 1.0},
}
GPTQ_DEFAULTS["gemma3"] = GPTQ_DEFAULTS["gemma3_text"]


def gptq_defaults(method: str, model_type: str) -> dict[str, object]:
    """The GPTQ options a method takes on ``model_type`` when the user sets none."""
    if method == "gptq":
        return {**GPTQ_GENERIC, **GPTQ_DEFAULTS.get(model_type, {})}
    return dict(GPTQ_GENERIC)


def get_quant_arch(model_type: str) -> QuantArch:
    try:
        return QUANT_ARCHS[model_type]
    except KeyError:
        raise KlaqError(
            f"unsupported architecture {model_type!r} for quantization; supported: {', '.join(QUANT_ARCHS)} "
            "(extend QUANT_ARCHS in toolchain/archs.py)"
        ) from None
