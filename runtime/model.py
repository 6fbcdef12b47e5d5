"""The Llama-family decoder in numpy: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache.

Mirrors llama.cpp's ``llama`` graph on the package's tensors as stored: Q/K rows are in llama.cpp's
order, so RoPE rotates adjacent pairs (x[2i], x[2i+1]). Computation is float32; batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klaq.formats.gguf_package import PackageFile
from klaq.runtime.weights import dense


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: np.ndarray  # [out, in]
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray


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


class NumpyLlama:
    def __init__(self, pf: PackageFile):
        self.hp = hp = pf.hparams
        self.embed = dense(pf, "token_embd.weight")
        self.head = dense(pf, "output.weight") if "output.weight" in pf.tensors else self.embed
        self.norm = dense(pf, "output_norm.weight")
        self.layers = []
        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
        for i in range(hp.n_layers):
            self.layers.append(Layer(*(dense(pf, f"blk.{i}.{n}.weight") for n in names)))
        half = hp.head_dim // 2
        self.inv_freq = (1.0 / hp.rope_theta ** (np.arange(half, dtype=np.float64) * 2 / hp.head_dim))

    def new_cache(self, max_len: int) -> KVCache:
        hp = self.hp
        return KVCache(hp.n_layers, hp.n_kv_heads, hp.head_dim, max_len)

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x: [heads, T, head_dim]; rotate adjacent pairs (llama.cpp NORM rope)."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, ids, cache: KVCache) -> np.ndarray:
        """Run ``ids`` (new tokens) through the model, append to ``cache``; logits [T, vocab]."""
        hp = self.hp
        ids = np.asarray(ids, dtype=np.int64)
        t = ids.shape[0]
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"KV cache full: {start} + {t} > {cache.max_len}")
        pos = np.arange(start, start + t)
        end = start + t
        group = hp.n_heads // hp.n_kv_heads
        scale = 1.0 / np.sqrt(hp.head_dim)
        # causal mask for the new queries against all cached keys
        mask = np.where(np.arange(end)[None, :] > pos[:, None], -np.inf, 0.0).astype(np.float32)
        x = self.embed[ids]
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.attn_norm, hp.rms_eps)
            q = (h @ L.wq.T).reshape(t, hp.n_heads, hp.head_dim).transpose(1, 0, 2)
            k = (h @ L.wk.T).reshape(t, hp.n_kv_heads, hp.head_dim).transpose(1, 0, 2)
            v = (h @ L.wv.T).reshape(t, hp.n_kv_heads, hp.head_dim).transpose(1, 0, 2)
            cache.k[li, :, start:end] = self._rope(k, pos)
            cache.v[li, :, start:end] = v
            q = self._rope(q, pos).reshape(hp.n_kv_heads, group * t, hp.head_dim)
            keys, vals = cache.k[li, :, :end], cache.v[li, :, :end]
            s = (q @ keys.transpose(0, 2, 1)).reshape(hp.n_kv_heads, group, t, end) * scale + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            p = (s / s.sum(axis=-1, keepdims=True)).reshape(hp.n_kv_heads, group * t, end)
            o = (p @ vals).reshape(hp.n_heads, t, hp.head_dim).transpose(1, 0, 2).reshape(t, -1)
            x = x + o @ L.wo.T
            h = rms_norm(x, L.ffn_norm, hp.rms_eps)
            x = x + (silu(h @ L.w_gate.T) * (h @ L.w_up.T)) @ L.w_down.T
        cache.length = end
        return rms_norm(x, self.norm, hp.rms_eps) @ self.head.T
