"""The decoder in numpy: RMSNorm, RoPE, grouped-query attention, gated MLP, KV cache.

Follows llama.cpp's graphs for the architectures in :data:`RUNTIME_FACTS`, on the package's
tensors as stored: for ``llama`` the Q/K rows are in llama.cpp's order, so RoPE rotates adjacent
pairs; ``qwen2`` and ``gemma3`` keep HF order and rotate halves (NEOX). Gemma 3 adds an embedding
scale, Q/K norms, "sandwich" norms around attention and MLP, GELU-tanh, and sliding-window layers
(every 6th layer global, local layers with RoPE base 10000). float32 throughout; batch size 1.

Weights are resident in one of two forms (``resident``): ``"f32"`` dequantizes every tensor once
at load and multiplies with BLAS (fastest, 4 bytes per weight); ``"int4"`` keeps 4-bit linears
packed (:class:`klaq.kernels.NumpyW4`, about 4.1 bits per weight) and an fp16 embedding in fp16,
for devices where memory, not speed, is what runs out. Q/K/V and gate/up are stacked into one
weight each either way, so a block makes four matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from klaq.errors import KlaqError
from klaq.formats.gguf_package import PackageFile
from klaq.formats.qweight import QuantizedWeight
from klaq.kernels.numpy_ref import NumpyW4
from klaq.runtime.weights import concat_rows, dense, load_weight

RESIDENT = ("f32", "int4")


@dataclass(frozen=True)
class ArchFacts:
    rope_pairs: str  # "adjacent" (llama.cpp NORM) or "halves" (NEOX)
    act: str  # silu | gelu_tanh
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden)
    sandwich: bool = False  # post-attention / post-MLP norms (Gemma)
    swa_pattern: int = 0  # every n-th layer is global, the others use the sliding window
    local_rope_theta: float = 10000.0


RUNTIME_FACTS = {
    "llama": ArchFacts("adjacent", "silu"),
    "qwen2": ArchFacts("halves", "silu"),
    "gemma3": ArchFacts("halves", "gelu_tanh", embed_scale=True, sandwich=True, swa_pattern=6),
}


class KVCache:
    """Preallocated keys/values: [layers, kv_heads, max_len, head_dim]."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32):
        self.k = np.zeros((n_layers, n_kv_heads, max_len, head_dim), dtype=dtype)
        self.v = np.zeros_like(self.k)
        self.length = 0
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


class Linear:
    """``x @ W.T`` for one or more weights stacked along N; returns one output per weight."""

    def __init__(self, pf: PackageFile, names: list[str], resident: str):
        if resident == "int4":
            ws = [load_weight(pf, n) for n in names]
            self.fns = [NumpyW4(w) if isinstance(w, QuantizedWeight) else _dense_fn(w) for w in concat_rows(ws)]
        else:
            ws = [dense(pf, n) for n in names]
            self.fns = [_dense_fn(np.concatenate(ws) if len(ws) > 1 else ws[0])]
        self.sizes = [w.out_features if isinstance(w, QuantizedWeight) else w.shape[0] for w in ws]
        self.bounds = np.cumsum(self.sizes)[:-1]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        y = self.fns[0](x) if len(self.fns) == 1 else np.concatenate([f(x) for f in self.fns], axis=-1)
        return np.split(y, self.bounds, axis=-1) if len(self.sizes) > 1 else [y]


def _dense_fn(w: np.ndarray):
    return lambda x: x @ w.T


class HalfHead:
    """``x @ E.T`` for an fp16 embedding kept in fp16: widened a block of rows at a time."""

    block_rows = 4096

    def __init__(self, w: np.ndarray):
        self.w = w

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = self.w.shape[0]
        y = np.empty((*x.shape[:-1], n), dtype=np.float32)
        for r0 in range(0, n, self.block_rows):
            y[..., r0:r0 + self.block_rows] = x @ self.w[r0:r0 + self.block_rows].astype(np.float32).T
        return y


class Layer:
    """One block's tensors; optional ones (biases, Q/K norms, sandwich norms) are None."""

    def __init__(self, pf: PackageFile, i: int, resident: str = "f32"):
        def has(name: str) -> bool:
            full = f"blk.{i}.{name}"
            return full in pf.tensors or f"{full.removesuffix('.weight')}.qweight" in pf.tensors

        def get(name: str, required: bool = True):
            return dense(pf, f"blk.{i}.{name}") if (required or has(name)) else None

        def lin(*names: str) -> Linear:
            return Linear(pf, [f"blk.{i}.{n}.weight" for n in names], resident)

        self.attn_norm, self.ffn_norm = get("attn_norm.weight"), get("ffn_norm.weight")
        self.qkv, self.wo = lin("attn_q", "attn_k", "attn_v"), lin("attn_output")
        self.bq, self.bk, self.bv = (get(f"{n}.bias", False) for n in ("attn_q", "attn_k", "attn_v"))
        self.q_norm, self.k_norm = get("attn_q_norm.weight", False), get("attn_k_norm.weight", False)
        self.post_attn_norm, self.post_ffn_norm = get("post_attention_norm.weight", False), get("post_ffw_norm.weight", False)
        self.gate_up, self.down = lin("ffn_gate", "ffn_up"), lin("ffn_down")


def _bias(y: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return y if b is None else y + b


class NumpyDecoder:
    def __init__(self, pf: PackageFile, resident: str = "f32"):
        if resident not in RESIDENT:
            raise KlaqError(f"unknown weight residency {resident!r}; choose from {', '.join(RESIDENT)}")
        self.hp = hp = pf.hparams
        self.facts = RUNTIME_FACTS[hp.arch]
        self.resident = resident
        emb = pf.tensors.get("token_embd.weight")
        keep_half = resident == "int4" and emb is not None and emb.type == T.F16
        self.embed = dense(pf, "token_embd.weight", np.float16 if keep_half else np.float32)
        if "output.weight" in pf.tensors or "output.qweight" in pf.tensors:
            self.head = Linear(pf, ["output.weight"], resident)
        elif keep_half:
            self.head = HalfHead(self.embed)
        else:
            self.head = _dense_fn(self.embed)
        self.norm = dense(pf, "output_norm.weight")
        self.layers = [Layer(pf, i, resident) for i in range(hp.n_layers)]
        half = hp.head_dim // 2
        exps = np.arange(half, dtype=np.float64) * 2 / hp.head_dim
        self.inv_freq = 1.0 / hp.rope_theta**exps
        self.local_inv_freq = 1.0 / self.facts.local_rope_theta**exps
        self.act = ACTIVATIONS[self.facts.act]

    def new_cache(self, max_len: int) -> KVCache:
        hp = self.hp
        return KVCache(hp.n_layers, hp.n_kv_heads, hp.head_dim, max_len)

    def is_local(self, layer: int) -> bool:
        p = self.facts.swa_pattern
        return bool(p and self.hp.sliding_window and (layer + 1) % p != 0)

    def _rope(self, x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        """x: [heads, T, head_dim]."""
        ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        if self.facts.rope_pairs == "adjacent":
            x0, x1 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x0, x1 = x[..., :half], x[..., half:]
        r0, r1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        if self.facts.rope_pairs == "adjacent":
            out = np.empty_like(x)
            out[..., 0::2], out[..., 1::2] = r0, r1
            return out
        return np.concatenate([r0, r1], axis=-1)

    def forward(self, ids, cache: KVCache) -> np.ndarray:
        """Run ``ids`` (new tokens) through the model, append to ``cache``; logits [T, vocab]."""
        hp, facts = self.hp, self.facts
        ids = np.asarray(ids, dtype=np.int64)
        t = ids.shape[0]
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"KV cache full: {start} + {t} > {cache.max_len}")
        pos = np.arange(start, start + t)
        end = start + t
        group = hp.n_heads // hp.n_kv_heads
        scale = np.float32(1.0 / np.sqrt(hp.head_dim))  # a float64 scalar would promote everything after it
        kpos = np.arange(end)[None, :]
        causal = np.where(kpos > pos[:, None], -np.inf, 0.0).astype(np.float32)
        local = np.where((kpos > pos[:, None]) | (kpos <= pos[:, None] - hp.sliding_window), -np.inf, 0.0)
        local = local.astype(np.float32)
        x = self.embed[ids].astype(np.float32)
        if facts.embed_scale:
            x = x * np.float32(np.sqrt(hp.hidden))
        for li, L in enumerate(self.layers):
            is_local = self.is_local(li)
            inv_freq = self.local_inv_freq if is_local else self.inv_freq
            h = rms_norm(x, L.attn_norm, hp.rms_eps)
            q, k, v = L.qkv(h)
            q = _bias(q, L.bq).reshape(t, hp.n_heads, hp.head_dim).transpose(1, 0, 2)
            k = _bias(k, L.bk).reshape(t, hp.n_kv_heads, hp.head_dim).transpose(1, 0, 2)
            v = _bias(v, L.bv).reshape(t, hp.n_kv_heads, hp.head_dim).transpose(1, 0, 2)
            if L.q_norm is not None:
                q, k = rms_norm(q, L.q_norm, hp.rms_eps), rms_norm(k, L.k_norm, hp.rms_eps)
            cache.k[li, :, start:end] = self._rope(k, pos, inv_freq)
            cache.v[li, :, start:end] = v
            q = self._rope(q, pos, inv_freq).reshape(hp.n_kv_heads, group * t, hp.head_dim)
            keys, vals = cache.k[li, :, :end], cache.v[li, :, :end]
            s = (q @ keys.transpose(0, 2, 1)).reshape(hp.n_kv_heads, group, t, end) * scale
            s = s + (local if is_local else causal)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            p = (s / s.sum(axis=-1, keepdims=True)).reshape(hp.n_kv_heads, group * t, end)
            o = L.wo((p @ vals).reshape(hp.n_heads, t, hp.head_dim).transpose(1, 0, 2).reshape(t, -1))[0]
            if facts.sandwich:
                o = rms_norm(o, L.post_attn_norm, hp.rms_eps)
            x = x + o
            h = rms_norm(x, L.ffn_norm, hp.rms_eps)
            gate, up = L.gate_up(h)
            m = L.down(self.act(gate) * up)[0]
            if facts.sandwich:
                m = rms_norm(m, L.post_ffn_norm, hp.rms_eps)
            x = x + m
        cache.length = end
        logits = self.head(rms_norm(x, self.norm, hp.rms_eps))
        return logits[0] if isinstance(logits, list) else logits
