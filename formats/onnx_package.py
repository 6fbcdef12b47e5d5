"""A klaq package as an ONNX directory that onnxruntime (and onnxruntime-genai) runs.

Layout of the directory::

    model.onnx            the decoder graph (opset 17 + com.microsoft contrib ops)
    model.onnx.data       its initializers (external data)
    tokenizer.json        ``tokenizers`` file built from the package's TokenizerFacts
    tokenizer_config.json special tokens, for onnxruntime-genai / transformers
    klaq_tokenizer.json   the TokenizerFacts themselves (what klaq's runtime reads back)
    genai_config.json     onnxruntime-genai model folder description
    klaq.json             manifest: model type, hparams, klaq.* facts, graph options, sha256 of every file

The graph is built from a :class:`~klaq.formats.gguf_package.Package` (HF tensor names, HF row
order, so RoPE rotates halves for every architecture). Inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value`` ([batch, kv_heads, past, head_dim], fp32);
outputs ``logits`` ([batch, seq, vocab], fp32) and ``present.N.key/value``. Every quantized
linear is one ``com.microsoft::MatMulNBits`` carrying klaq's codes exactly
(:mod:`klaq.formats.matmulnbits`); q/k/v and gate/up are stacked into one node each when their
groupings agree (rows concatenated: still exact).

:class:`GraphOptions` picks, per part, the contrib op onnxruntime fuses on CPU or a plain-op
equivalent, so each contrib op can be checked against plain ONNX:

* ``norm``: ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` or
  ReduceMean/Sqrt/Div;
* ``rope``: fused into ``GroupQueryAttention`` (``gqa``), ``com.microsoft::RotaryEmbedding``
  (``op``) or Gather/Split/Mul/Concat (``plain``);
* ``attention``: ``com.microsoft::GroupQueryAttention`` or Concat/MatMul/Softmax with an explicit
  causal (and sliding-window) mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from klaq.errors import KlaqError
from klaq.formats.arch import get_package_arch
from klaq.formats.gguf_package import HParams, Package
from klaq.formats.matmulnbits import (
    ALLOWED_BITS,
    ALLOWED_BLOCK_SIZES,
    MatMulNBitsWeight,
    concat_rows,
    quantize_symmetric,
    to_matmulnbits,
)
from klaq.formats.qweight import QuantizedWeight
from klaq.formats.tokenizer import TokenizerFacts

FORMAT = "klaq-onnx"
FORMAT_VERSION = 1
OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FACTS_FILE = "klaq_tokenizer.json"
GENAI_FILE = "genai_config.json"
MANIFEST_FILE = "klaq.json"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


@dataclass(frozen=True)
class OnnxArch:
    act: str  # silu | gelu_tanh
    embed_scale: bool = False  # x * sqrt(hidden) after the embedding (Gemma)
    sandwich: bool = False  # norms after attention and after the MLP (Gemma)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Gemma 3)
    swa_pattern: int = 0  # every n-th layer global, the others sliding-window (Gemma 3)
    local_rope_theta: float = 10000.0


# Keyed by HParams.arch (llama.cpp's architecture name), like the numpy runtime's RUNTIME_FACTS.
ONNX_ARCHS = {
    "llama": OnnxArch("silu"),
    "qwen2": OnnxArch("silu"),
    "gemma3": OnnxArch("gelu_tanh", embed_scale=True, sandwich=True, qk_norm=True, swa_pattern=6),
}


@dataclass(frozen=True)
class GraphOptions:
    norm: str = "fused"  # fused | plain
    rope: str = "gqa"  # gqa | op | plain   ("gqa" needs attention="gqa")
    attention: str = "gqa"  # gqa | plain
    accuracy_level: int = 0  # MatMulNBits: 0 = fp32 compute, 4 = int8 activations (faster on CPU)
    quantize_head: int = 0  # 0: fp16 head (computed in fp32); 4 or 8: MatMulNBits head, symmetric RTN
    head_group_size: int = 32
    fuse_linears: bool = True  # one MatMulNBits for q/k/v and one for gate/up when groupings agree
    max_length: int = 0  # RoPE table length; 0 = min(context_length, 8192)

    def check(self) -> None:
        for name, allowed in (("norm", ("fused", "plain")), ("rope", ("gqa", "op", "plain")),
                              ("attention", ("gqa", "plain"))):
            if getattr(self, name) not in allowed:
                raise KlaqError(f"GraphOptions.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.rope == "gqa" and self.attention != "gqa":
            raise KlaqError("rope='gqa' (RoPE fused into GroupQueryAttention) needs attention='gqa'")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise KlaqError(f"accuracy_level must be 0..4 (0 unset, 4 int8), got {self.accuracy_level}")
        if self.quantize_head not in (0, *ALLOWED_BITS):
            raise KlaqError(f"quantize_head must be 0 (off), 4 or 8, got {self.quantize_head}")
        if self.quantize_head and self.head_group_size not in ALLOWED_BLOCK_SIZES:
            raise KlaqError(f"head_group_size must be one of {ALLOWED_BLOCK_SIZES}, got {self.head_group_size}")


PLAIN = GraphOptions(norm="plain", rope="plain", attention="plain")


def resolve_options(opts: GraphOptions, hp: HParams) -> GraphOptions:
    """The options a model can have: onnxruntime's GroupQueryAttention needs head_dim % 16 == 0."""
    opts.check()
    if opts.attention == "gqa" and hp.head_dim % 16:
        rope = "op" if opts.rope == "gqa" else opts.rope
        return replace(opts, attention="plain", rope=rope)
    return opts


# -- graph building ----------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers with generated names; one place that knows onnx.helper."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.nodes, self.inits, self._n = [], [], 0
        self._consts: dict = {}

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}/{self._n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.nh.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer, shared by value."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const/{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, **attrs):
        name = name or self.fresh(op_type)
        outs = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs


@dataclass
class _Linear:
    """A decoder linear as stored: quantized (MatMulNBits) or dense fp16 (fp16 packages)."""

    name: str
    q: QuantizedWeight | None
    dense: np.ndarray | None
    bias: np.ndarray | None
    out_features: int


class _Builder:
    def __init__(self, pkg: Package, opts: GraphOptions):
        self.pkg, self.hp, self.opts = pkg, pkg.hparams, opts
        if self.hp.arch not in ONNX_ARCHS:
            raise KlaqError(f"ONNX packages support architectures {', '.join(ONNX_ARCHS)}; got {self.hp.arch!r}")
        self.arch = ONNX_ARCHS[self.hp.arch]
        self.norm_offset = get_package_arch(pkg.model_type).norm_offset
        self.g = _Graph()
        self.max_length = opts.max_length or min(self.hp.context_length, 8192)
        self.matmulnbits: dict[str, MatMulNBitsWeight] = {}  # initializer prefix -> packed weight

    # tensors ---------------------------------------------------------------------------------
    def tensor(self, name: str):
        try:
            return self.pkg.tensors[name]
        except KeyError:
            raise KlaqError(f"package lacks tensor {name!r}") from None

    def norm_weight(self, name: str) -> str:
        w = np.asarray(self.tensor(name), dtype=np.float32) + np.float32(self.norm_offset)
        return self.g.init(name, w)

    def linear_spec(self, name: str) -> _Linear:
        w = self.tensor(f"{name}.weight")
        b = self.pkg.tensors.get(f"{name}.bias")
        b = None if b is None else np.asarray(b, dtype=np.float32)
        if isinstance(w, QuantizedWeight):
            return _Linear(name, w, None, b, w.out_features)
        w = np.asarray(w)
        return _Linear(name, None, w, b, w.shape[0])

    def fused(self, specs: list[_Linear], name: str) -> _Linear | None:
        if not self.opts.fuse_linears:
            return None
        biases = [s.bias for s in specs]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        bias = None if biases[0] is None else np.concatenate(biases)
        n = sum(s.out_features for s in specs)
        if all(s.q is not None for s in specs):
            q = concat_rows([s.q for s in specs])
            return None if q is None else _Linear(name, q, None, bias, n)
        if all(s.dense is not None for s in specs):
            return _Linear(name, None, np.concatenate([s.dense for s in specs]), bias, n)
        return None

    def linear(self, x: str, spec: _Linear) -> str:
        g = self.g
        if spec.q is not None:
            m = to_matmulnbits(spec.q, spec.name)
            self.matmulnbits[spec.name] = m
            ins = [x, g.init(f"{spec.name}.qweight", m.B), g.init(f"{spec.name}.scales", m.scales)]
            if m.zero_points is not None:
                ins.append(g.init(f"{spec.name}.qzeros", m.zero_points))
            if spec.bias is not None:
                ins += [""] * (5 - len(ins)) + [g.init(f"{spec.name}.bias", spec.bias)]
            return g.op("MatMulNBits", ins, domain="com.microsoft", name=f"{spec.name}/MatMulNBits",
                        **m.attributes(self.opts.accuracy_level))
        w16 = g.init(f"{spec.name}.weight", np.asarray(spec.dense, dtype=np.float16).T)  # [K, N]
        w32 = g.op("Cast", [w16], to=1, name=f"{spec.name}/Cast")  # folded at session start
        y = g.op("MatMul", [x, w32], name=f"{spec.name}/MatMul")
        if spec.bias is not None:
            y = g.op("Add", [y, g.init(f"{spec.name}.bias", spec.bias)])
        return y

    # norms -----------------------------------------------------------------------------------
    def rms(self, x: str, w: str) -> str:
        g, eps = self.g, float(self.hp.rms_eps)
        if self.opts.norm == "fused":
            return g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=eps, stash_type=1)
        ms = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[-1], keepdims=1)
        rs = g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])
        return g.op("Mul", [g.op("Div", [x, rs]), w])

    def skip_rms(self, delta: str, resid: str, w: str) -> tuple[str, str]:
        """(rms(resid + delta) * w, resid + delta)."""
        g = self.g
        if self.opts.norm == "fused":
            out, _, _, total = g.op("SkipSimplifiedLayerNormalization", [delta, resid, w], outputs=4,
                                    domain="com.microsoft", epsilon=float(self.hp.rms_eps))
            return out, total
        total = g.op("Add", [resid, delta])
        return self.rms(total, w), total

    # rope ------------------------------------------------------------------------------------
    def rope_tables(self) -> dict[float, tuple[str, str]]:
        hp = self.hp
        thetas = {float(hp.rope_theta)}
        if any(self.is_local(i) for i in range(hp.n_layers)):
            thetas.add(float(self.arch.local_rope_theta))
        tables = {}
        exps = np.arange(hp.head_dim // 2, dtype=np.float64) * 2 / hp.head_dim
        pos = np.arange(self.max_length, dtype=np.float64)[:, None]
        for theta in sorted(thetas):
            ang = pos * (1.0 / theta**exps)[None, :]
            tag = f"rope.theta{theta:g}"
            tables[theta] = (self.g.init(f"{tag}.cos", np.cos(ang).astype(np.float32)),
                             self.g.init(f"{tag}.sin", np.sin(ang).astype(np.float32)))
        return tables

    def rope(self, x: str, n_heads: int, table: tuple[str, str]) -> str:
        """RoPE (rotate-half) on x [B, S, n_heads * head_dim] at position_ids."""
        g, hd = self.g, self.hp.head_dim
        cos, sin = table
        if self.opts.rope == "op":
            return g.op("RotaryEmbedding", [x, "position_ids", cos, sin], domain="com.microsoft",
                        interleaved=0, num_heads=n_heads, rotary_embedding_dim=hd)
        c = g.op("Unsqueeze", [g.op("Gather", [cos, "position_ids"]), g.const([2])])  # [B, S, 1, hd/2]
        s = g.op("Unsqueeze", [g.op("Gather", [sin, "position_ids"]), g.const([2])])
        x4 = g.op("Reshape", [x, g.const([0, 0, n_heads, hd])])
        x1, x2 = g.op("Split", [x4, g.const([hd // 2, hd // 2])], outputs=2, axis=-1)
        r1 = g.op("Sub", [g.op("Mul", [x1, c]), g.op("Mul", [x2, s])])
        r2 = g.op("Add", [g.op("Mul", [x1, s]), g.op("Mul", [x2, c])])
        return g.op("Reshape", [g.op("Concat", [r1, r2], axis=-1), g.const([0, 0, n_heads * hd])])

    def is_local(self, layer: int) -> bool:
        p = self.arch.swa_pattern
        return bool(p and self.hp.sliding_window and (layer + 1) % p != 0)

    # attention -------------------------------------------------------------------------------
    def gqa_lengths(self) -> tuple[str, str]:
        g = self.g
        total = g.op("ReduceSum", ["attention_mask", g.const([1])], keepdims=0)
        seqlens_k = g.op("Cast", [g.op("Sub", [total, g.const(1)])], to=6)  # int32 [B]
        shape = g.op("Shape", ["attention_mask"])
        total_len = g.op("Cast", [g.op("Gather", [shape, g.const(1)], axis=0)], to=6)  # int32 scalar
        return seqlens_k, total_len

    def plain_masks(self) -> dict[bool, str]:
        """Additive masks [B, 1, 1, S, T] for global (False) and local (True) layers."""
        g, hp = self.g, self.hp
        t = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
        kpos = g.op("Range", [g.const(0), t, g.const(1)])  # [T]
        qpos = g.op("Unsqueeze", ["position_ids", g.const([2])])  # [B, S, 1]
        pad = g.op("Unsqueeze", [g.op("Equal", ["attention_mask", g.const(0)]), g.const([1])])  # [B, 1, T]
        bad = g.op("Or", [g.op("Greater", [kpos, qpos]), pad])
        neg = g.const(np.finfo(np.float32).min, np.float32)
        zero = g.const(0.0, np.float32)
        masks = {False: g.op("Unsqueeze", [g.op("Where", [bad, neg, zero]), g.const([1, 2])])}
        if any(self.is_local(i) for i in range(hp.n_layers)):
            far = g.op("LessOrEqual", [kpos, g.op("Sub", [qpos, g.const(hp.sliding_window)])])
            bad_local = g.op("Or", [bad, far])
            masks[True] = g.op("Unsqueeze", [g.op("Where", [bad_local, neg, zero]), g.const([1, 2])])
        return masks

    def attention(self, i: int, h: str, tables, lengths, masks) -> str:
        g, hp, opts, arch = self.g, self.hp, self.opts, self.arch
        pre = f"model.layers.{i}.self_attn"
        specs = [self.linear_spec(f"{pre}.{p}_proj") for p in "qkv"]
        qdim, kvdim = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        fused = self.fused(specs, f"{pre}.qkv_proj")
        # GroupQueryAttention takes packed QKV directly when nothing sits between it and the linear
        use_packed = fused is not None and opts.rope == "gqa" and not arch.qk_norm
        packed = q = k = v = None
        if use_packed:
            packed = self.linear(h, fused)
        elif fused is not None:
            q, k, v = g.op("Split", [self.linear(h, fused), g.const([qdim, kvdim, kvdim])], outputs=3, axis=-1)
        else:
            q, k, v = (self.linear(h, s) for s in specs)
        if arch.qk_norm:
            q = self.head_norm(q, hp.n_heads, self.norm_weight(f"{pre}.q_norm.weight"))
            k = self.head_norm(k, hp.n_kv_heads, self.norm_weight(f"{pre}.k_norm.weight"))
        local = self.is_local(i)
        table = tables[self.arch.local_rope_theta if local else float(hp.rope_theta)]
        if opts.rope != "gqa":
            q, k = self.rope(q, hp.n_heads, table), self.rope(k, hp.n_kv_heads, table)
        past_k, past_v = PAST_KEY % i, PAST_VALUE % i
        present_k, present_v = PRESENT_KEY % i, PRESENT_VALUE % i
        scale = 1.0 / float(np.sqrt(hp.head_dim))
        if opts.attention == "gqa":
            seqlens_k, total_len = lengths
            qkv = [packed, "", ""] if use_packed else [q, k, v]
            ins = [*qkv, past_k, past_v, seqlens_k, total_len]
            if opts.rope == "gqa":
                ins += [table[0], table[1], "position_ids"]
            out, _, _ = g.op(
                "GroupQueryAttention", ins, outputs=[f"{pre}/attn", present_k, present_v], domain="com.microsoft",
                name=f"{pre}/GroupQueryAttention", num_heads=hp.n_heads, kv_num_heads=hp.n_kv_heads, scale=scale,
                do_rotary=int(opts.rope == "gqa"), rotary_interleaved=0,
                local_window_size=hp.sliding_window if local else -1)
            return out
        group = hp.n_heads // hp.n_kv_heads
        bnsh = lambda x, n: g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, hp.head_dim])])],  # noqa: E731
                                 perm=[0, 2, 1, 3])
        g.op("Concat", [past_k, bnsh(k, hp.n_kv_heads)], outputs=[present_k], axis=2)
        g.op("Concat", [past_v, bnsh(v, hp.n_kv_heads)], outputs=[present_v], axis=2)
        q5 = g.op("Reshape", [g.op("Mul", [bnsh(q, hp.n_heads), g.const(scale, np.float32)]),
                              g.const([0, hp.n_kv_heads, group, -1, hp.head_dim])])  # [B, kvH, G, S, hd]
        k5 = g.op("Unsqueeze", [present_k, g.const([2])])  # [B, kvH, 1, T, hd]
        v5 = g.op("Unsqueeze", [present_v, g.const([2])])
        s = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])  # [B, kvH, G, S, T]
        p = g.op("Softmax", [g.op("Add", [s, masks[local]])], axis=-1)
        o = g.op("Reshape", [g.op("MatMul", [p, v5]), g.const([0, hp.n_heads, -1, hp.head_dim])])
        return g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const([0, 0, qdim])])

    def head_norm(self, x: str, n_heads: int, w: str) -> str:
        g = self.g
        x4 = g.op("Reshape", [x, g.const([0, 0, n_heads, self.hp.head_dim])])
        return g.op("Reshape", [self.rms(x4, w), g.const([0, 0, n_heads * self.hp.head_dim])])

    # mlp -------------------------------------------------------------------------------------
    def mlp(self, i: int, h: str) -> str:
        g, hp = self.g, self.hp
        pre = f"model.layers.{i}.mlp"
        gate_s, up_s = self.linear_spec(f"{pre}.gate_proj"), self.linear_spec(f"{pre}.up_proj")
        fused = self.fused([gate_s, up_s], f"{pre}.gate_up_proj")
        if fused is not None:
            gate, up = g.op("Split", [self.linear(h, fused), g.const([hp.ffn, hp.ffn])], outputs=2, axis=-1)
        else:
            gate, up = self.linear(h, gate_s), self.linear(h, up_s)
        return self.linear(g.op("Mul", [self.act(gate), up]), self.linear_spec(f"{pre}.down_proj"))

    def act(self, x: str) -> str:
        g = self.g
        if self.arch.act == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x])])
        if self.opts.norm == "fused":  # contrib ops on: FastGelu is exactly the tanh approximation
            return g.op("FastGelu", [x], domain="com.microsoft")
        c = float(np.sqrt(2.0 / np.pi))
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [g.const(0.044715, np.float32),
                                                          g.op("Mul", [x, g.op("Mul", [x, x])])])]),
                             g.const(c, np.float32)])
        return g.op("Mul", [g.op("Mul", [x, g.const(0.5, np.float32)]),
                            g.op("Add", [g.const(1.0, np.float32), g.op("Tanh", [inner])])])

    # whole model -----------------------------------------------------------------------------
    def build(self):
        from onnx import TensorProto

        g, hp, arch, h = self.g, self.hp, self.arch, self.g.h
        emb16 = g.init("model.embed_tokens.weight", np.asarray(self.tensor("model.embed_tokens.weight"), np.float16))
        x = g.op("Cast", [g.op("Gather", [emb16, "input_ids"], name="embed/Gather")], to=1)
        if arch.embed_scale:
            x = g.op("Mul", [x, g.const(np.sqrt(hp.hidden), np.float32)])
        tables = self.rope_tables()
        lengths = self.gqa_lengths() if self.opts.attention == "gqa" else None
        masks = self.plain_masks() if self.opts.attention == "plain" else None
        delta = None
        for i in range(hp.n_layers):
            pre = f"model.layers.{i}"
            w_in = self.norm_weight(f"{pre}.input_layernorm.weight")
            hn, x = (self.rms(x, w_in), x) if delta is None else self.skip_rms(delta, x, w_in)
            o = self.linear(self.attention(i, hn, tables, lengths, masks), self.linear_spec(f"{pre}.self_attn.o_proj"))
            if arch.sandwich:
                o = self.rms(o, self.norm_weight(f"{pre}.post_attention_layernorm.weight"))
                w_ffn = self.norm_weight(f"{pre}.pre_feedforward_layernorm.weight")
            else:
                w_ffn = self.norm_weight(f"{pre}.post_attention_layernorm.weight")
            hn, x = self.skip_rms(o, x, w_ffn)
            delta = self.mlp(i, hn)
            if arch.sandwich:
                delta = self.rms(delta, self.norm_weight(f"{pre}.post_feedforward_layernorm.weight"))
        hn, _ = self.skip_rms(delta, x, self.norm_weight("model.norm.weight"))
        self.head(hn)

        dims = lambda *d: list(d)  # noqa: E731
        kv = dims("batch_size", hp.n_kv_heads, "past_sequence_length", hp.head_dim)
        kv_out = dims("batch_size", hp.n_kv_heads, "total_sequence_length", hp.head_dim)
        inputs = [h.make_tensor_value_info("input_ids", TensorProto.INT64, dims("batch_size", "sequence_length")),
                  h.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                           dims("batch_size", "total_sequence_length")),
                  h.make_tensor_value_info("position_ids", TensorProto.INT64, dims("batch_size", "sequence_length"))]
        outputs = [h.make_tensor_value_info("logits", TensorProto.FLOAT,
                                            dims("batch_size", "sequence_length", hp.vocab_size))]
        for i in range(hp.n_layers):
            for name in (PAST_KEY % i, PAST_VALUE % i):
                inputs.append(h.make_tensor_value_info(name, TensorProto.FLOAT, kv))
            for name in (PRESENT_KEY % i, PRESENT_VALUE % i):
                outputs.append(h.make_tensor_value_info(name, TensorProto.FLOAT, kv_out))
        graph = h.make_graph(g.nodes, f"klaq-{hp.arch}", inputs, outputs, g.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("com.microsoft", 1)],
                             producer_name="klaq")
        model.ir_version = 8
        return model

    def head(self, hn: str) -> None:
        g, opts = self.g, self.opts
        tied = "lm_head.weight" not in self.pkg.tensors
        w = self.tensor("model.embed_tokens.weight" if tied else "lm_head.weight")
        if isinstance(w, QuantizedWeight):  # a head quantized by the toolchain
            self.linear(hn, _Linear("lm_head", w, None, None, w.out_features))
            g.nodes[-1].output[0] = "logits"
            return
        if opts.quantize_head:
            q = quantize_symmetric(np.asarray(w, dtype=np.float32), opts.quantize_head, opts.head_group_size)
            self.linear(hn, _Linear("lm_head", q, None, None, q.out_features))
            g.nodes[-1].output[0] = "logits"
            return
        src = "model.embed_tokens.weight" if tied else g.init("lm_head.weight", np.asarray(w, np.float16))
        wt = g.op("Transpose", [g.op("Cast", [src], to=1, name="lm_head/Cast")], perm=[1, 0], name="lm_head/T")
        g.op("MatMul", [hn, wt], outputs=["logits"], name="lm_head/MatMul")


def build_onnx_model(pkg: Package, opts: GraphOptions = GraphOptions()):
    """``(onnx.ModelProto, {linear name: MatMulNBitsWeight})`` for ``pkg``."""
    b = _Builder(pkg, resolve_options(opts, pkg.hparams))
    return b.build(), b.matmulnbits


# -- package directory -------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _genai_config(pkg: Package, opts: GraphOptions, max_length: int) -> dict:
    hp, tok = pkg.hparams, pkg.tokenizer
    share = opts.attention == "gqa"
    return {
        "model": {
            "bos_token_id": tok.bos_id if tok.bos_id is not None else 0,
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": hp.head_dim,
                "hidden_size": hp.hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST_KEY,
                           "past_value_names": PAST_VALUE},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                            "present_value_names": PRESENT_VALUE},
                "num_attention_heads": hp.n_heads,
                "num_hidden_layers": hp.n_layers,
                "num_key_value_heads": hp.n_kv_heads,
            },
            "eos_token_id": tok.eos_id if tok.eos_id is not None else 0,
            "pad_token_id": tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0),
            "type": {"gemma3": "gemma3_text"}.get(hp.arch, hp.arch),
            "vocab_size": hp.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": max_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def _tokenizer_config(tok: TokenizerFacts) -> dict:
    name = lambda i: None if i is None or i >= len(tok.tokens) else tok.tokens[i]  # noqa: E731
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_id),
            "eos_token": name(tok.eos_id), "unk_token": name(tok.unk_id), "pad_token": name(tok.pad_id),
            "add_bos_token": tok.add_bos, "add_eos_token": tok.add_eos, "chat_template": tok.chat_template}


def write_onnx_package(pkg: Package, out_dir: str | os.PathLike, quantize_head: int | bool = False,
                       accuracy_level: int = 0, options: GraphOptions | None = None) -> dict:
    """Write the ONNX package directory ``out_dir`` atomically; returns the manifest (``klaq.json``).

    ``quantize_head``: False/0 keeps the (tied) head in fp16, computed in fp32; True or 4 quantizes
    it to int4 (symmetric RTN, groups of 32), 8 to int8. ``accuracy_level`` 4 lets onnxruntime
    quantize activations to int8 inside MatMulNBits (faster on CPU, slightly less exact).
    ``options`` overrides the graph options wholesale (tests build plain-op graphs with it).
    """
    import onnx

    if options is None:
        options = GraphOptions(accuracy_level=accuracy_level,
                               quantize_head=4 if quantize_head is True else int(quantize_head or 0))
    options = resolve_options(options, pkg.hparams)
    model, packed = build_onnx_model(pkg, options)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise KlaqError(f"{out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, MANIFEST_FILE)):
        raise KlaqError(f"{out_dir} is a non-empty directory that is not a klaq ONNX package; refusing to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".klaq-onnx-", dir=parent)
    try:
        onnx.save_model(model, os.path.join(tmp, MODEL_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        pkg.tokenizer.build().save(os.path.join(tmp, TOKENIZER_FILE))
        _dump(os.path.join(tmp, TOKENIZER_CONFIG_FILE), _tokenizer_config(pkg.tokenizer))
        _dump(os.path.join(tmp, TOKENIZER_FACTS_FILE), asdict(pkg.tokenizer))
        max_length = options.max_length or min(pkg.hparams.context_length, 8192)
        _dump(os.path.join(tmp, GENAI_FILE), _genai_config(pkg, options, max_length))
        files = {}
        for fname in sorted(os.listdir(tmp)):
            p = os.path.join(tmp, fname)
            files[fname] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
        quant = list(packed.values())
        data_bytes = files[DATA_FILE]["bytes"]
        head_reads_embedding = "lm_head.weight" not in pkg.tensors and not options.quantize_head
        embed_bytes = int(np.asarray(pkg.tensors["model.embed_tokens.weight"]).size) * 2  # fp16 on disk
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": pkg.name, "model_type": pkg.model_type,
            "hparams": asdict(pkg.hparams),
            "meta": {**pkg.meta, "llama_cpp_compatible": False},
            "onnx": {**asdict(options), "max_length": max_length, "opset": OPSET,
                     "past_present_share_buffer": options.attention == "gqa",
                     "matmulnbits": len(quant),
                     "matmulnbits_bytes": int(sum(q.nbytes for q in quant)),
                     # what one decode step reads: the embedding table only when it is also the head
                     "streamed_bytes": int(data_bytes if head_reads_embedding else data_bytes - embed_bytes),
                     "onnxruntime_min": "1.20"},
            "files": files,
        }
        _dump(os.path.join(tmp, MANIFEST_FILE), manifest)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _dump(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


# -- reading -----------------------------------------------------------------------------------


@dataclass
class OnnxPackageFile:
    """An ONNX package directory read back (the counterpart of gguf_package.PackageFile)."""

    path: str
    hparams: HParams
    tokenizer: TokenizerFacts
    meta: dict
    manifest: dict = field(repr=False)

    @property
    def model_path(self) -> str:
        return os.path.join(self.path, MODEL_FILE)

    @property
    def options(self) -> GraphOptions:
        o = self.manifest["onnx"]
        return GraphOptions(**{f.name: o[f.name] for f in fields(GraphOptions) if f.name in o})

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one decode step reads (the fp16 embedding table counts only when it is the head)."""
        o = self.manifest["onnx"]
        return int(o.get("streamed_bytes", self.manifest["files"][DATA_FILE]["bytes"]))

    def to_dict(self) -> dict:
        return {"path": self.path, "hparams": asdict(self.hparams), "meta": self.meta, "onnx": self.manifest["onnx"]}


def is_onnx_package(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST_FILE))


def read_onnx_package(path: str | os.PathLike, check_hashes: bool = False) -> OnnxPackageFile:
    """Read the manifest and tokenizer of an ONNX package directory, with clear errors.

    File sizes are always checked against the manifest; ``check_hashes`` also re-hashes every file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise KlaqError(f"no such package: {path}")
    if not os.path.isdir(path):
        raise KlaqError(f"{path} is not a directory (ONNX packages are directories)")
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(mpath):
        raise KlaqError(f"{path} has no {MANIFEST_FILE}: not a klaq ONNX package")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise KlaqError(f"{mpath} is unreadable: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise KlaqError(f"{mpath} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise KlaqError(f"{path} has format version {manifest['format_version']}; this klaq reads up to "
                        f"{FORMAT_VERSION}")
    for fname, facts in manifest.get("files", {}).items():
        p = os.path.join(path, fname)
        if not os.path.exists(p):
            raise KlaqError(f"{path} is incomplete: {fname} is missing")
        if os.path.getsize(p) != facts["bytes"]:
            raise KlaqError(f"{p} has {os.path.getsize(p)} bytes, the manifest says {facts['bytes']}: "
                            "truncated or modified")
        if check_hashes and _sha256(p) != facts["sha256"]:
            raise KlaqError(f"{p} does not match its sha256 in {MANIFEST_FILE}")
    with open(os.path.join(path, TOKENIZER_FACTS_FILE), encoding="utf-8") as f:
        tok = TokenizerFacts(**json.load(f))
    hp = HParams(**manifest["hparams"])
    return OnnxPackageFile(path, hp, tok, dict(manifest.get("meta", {})), manifest)
