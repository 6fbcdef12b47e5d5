"""The decoder in torch: int4 weights resident on the device, a static KV cache, CUDA-graph decode.

Same graph and interface as :class:`klaq.runtime.model.NumpyDecoder` (``new_cache``, ``forward``),
so ``generate`` and ``verify`` run on it unchanged, plus two fast paths:

* ``decode_step(token, cache)``: one token through a captured CUDA graph, logits back as numpy;
* ``greedy_decode(token, n, cache)``: ``n`` greedy steps with no host work between them: the graph
  takes its argmax as the next input token and advances the position itself.

Design (kernels-and-style.md §1, §2.2; gpt-fast): every quantized linear is converted once at load by
``klaq.kernels.prepare`` (Triton GEMV/GEMM, or dequantize + matmul in plain torch); Q/K/V and
gate/up are concatenated into one weight each, so a block runs four matmuls. Activations are fp16
on CUDA (fp32 on CPU, where this path exists for tests and parity), the residual stream is fp32.
The KV cache is preallocated ``[layers, kv_heads, max_len, head_dim]``; the decode step reads its
token and position from device tensors and attends over the static cache with a position mask, so
its shapes never change and one CUDA graph per cache replays every step. Prefill runs eagerly.

On CUDA with Triton the non-matmul work runs in the fused kernels of :mod:`klaq.runtime.triton_ops`
(four launches per block); elsewhere (CPU, Jetson without Triton) the plain torch ops below do the
same arithmetic. Only the torch backend imports this module: the numpy runtime never imports torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from klaq.formats.gguf_package import PackageFile
from klaq.formats.qweight import QuantizedWeight
from klaq.runtime.model import RUNTIME_FACTS
from klaq.runtime.weights import concat_rows, dense, load_weight

KERNEL_BACKENDS = ("torch", "triton")  # which kernels.prepare backend runs the quantized matmuls


# -- weights ---------------------------------------------------------------------------------


class Linear:
    """``x @ W.T`` for one or more weights stacked along N (fused Q/K/V or gate/up)."""

    def __init__(self, weights: list[QuantizedWeight | np.ndarray], device: torch.device, dtype: torch.dtype,
                 backend: str):
        self.fns, self.nbytes, self.out_features, self.quantized = [], 0, 0, []
        for w in concat_rows(weights):
            if isinstance(w, QuantizedWeight):
                from klaq.kernels import prepare

                self.fns.append(prepare(w, device, backend))
                self.nbytes += w.nbytes_packed()
                self.out_features += w.out_features
                self.quantized.append(True)
            else:
                d = torch.from_numpy(np.ascontiguousarray(w)).to(device=device, dtype=dtype)
                self.fns.append(lambda x, d=d: F.linear(x, d))
                self.nbytes += d.numel() * d.element_size()
                self.out_features += d.shape[0]
                self.quantized.append(False)

    decode_config: dict | None = None  # launch overrides for M = 1 (Triton kernels only)

    def _apply(self, f, q: bool, x: torch.Tensor) -> torch.Tensor:
        if q and self.decode_config and x.shape[0] == 1:
            return f(x, **self.decode_config)
        return f(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.fns) == 1:
            return self._apply(self.fns[0], self.quantized[0], x)
        return torch.cat([self._apply(f, q, x) for f, q in zip(self.fns, self.quantized, strict=True)], dim=-1)


# -- the non-matmul ops in plain torch (the reference for triton_ops) ------------------------


def add_rmsnorm_torch(x, delta, post_w, w, eps: float, dtype):
    if delta is not None:
        d = delta.float()
        if post_w is not None:
            d = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + eps) * post_w
        x += d
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w).to(dtype)


def rope_qkv_torch(qkv, bias, pos, cos, sin, q_norm, k_norm, k_cache, v_cache, n_heads: int, n_kv: int,
                   head_dim: int, adjacent: bool, eps: float):
    m = qkv.shape[0]
    x = qkv.float()
    if bias is not None:
        x = x + bias
    x = x.view(m, n_heads + 2 * n_kv, head_dim)
    q, k, v = x[:, :n_heads], x[:, n_heads:n_heads + n_kv], x[:, n_heads + n_kv:]
    if q_norm is not None:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * q_norm
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]  # [M, 1, D/2]

    def rot(t):
        if adjacent:
            t0, t1 = t[..., 0::2], t[..., 1::2]
            return torch.stack((t0 * c - t1 * s, t0 * s + t1 * c), dim=-1).flatten(-2)
        t0, t1 = t[..., : head_dim // 2], t[..., head_dim // 2:]
        return torch.cat((t0 * c - t1 * s, t0 * s + t1 * c), dim=-1)

    k_cache.index_copy_(1, pos, rot(k).transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, pos, v.transpose(0, 1).to(v_cache.dtype))
    return rot(q).to(k_cache.dtype)


def attention_torch(q, k_cache, v_cache, pos, end: int, window: int, scale: float):
    """``q [M, H, D]`` over ``cache[:, :end]`` with causal (and sliding-window) masks -> ``[M, H*D]``.

    ``end`` may be the whole cache (static shapes for a CUDA graph): the mask comes from ``pos``.
    """
    m, h, d = q.shape
    n_kv = k_cache.shape[0]
    g = h // n_kv
    keys, vals = k_cache[:, :end].float(), v_cache[:, :end].float()
    qf = q.float().view(m, n_kv, g, d).permute(1, 2, 0, 3).reshape(n_kv, g * m, d)
    s = (qf @ keys.transpose(1, 2)).view(n_kv, g, m, end) * scale
    kpos = torch.arange(end, device=q.device)[None, :]
    mask = kpos > pos[:, None]
    if window > 0:
        mask |= kpos <= pos[:, None] - window
    p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1).view(n_kv, g * m, end)
    o = (p @ vals).view(n_kv, g, m, d).permute(2, 0, 1, 3).reshape(m, h * d)
    return o.to(q.dtype)


def act_mul_torch(gate_up, gelu: bool):
    f = gate_up.shape[-1] // 2
    g, u = gate_up[:, :f].float(), gate_up[:, f:].float()
    a = F.gelu(g, approximate="tanh") if gelu else g * torch.sigmoid(g)
    return (a * u).to(gate_up.dtype)


# -- the model -------------------------------------------------------------------------------


class TorchKVCache:
    """Preallocated keys/values ``[layers, kv_heads, max_len, head_dim]`` on the model's device."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, device, dtype, rope):
        self.k = torch.zeros((n_layers, n_kv_heads, max_len, head_dim), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.max_len = max_len
        self.rope = rope  # {theta: (cos, sin)} covering max_len; kept alive for this cache's graph
        self.graph: DecodeGraph | None = None

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class _Block:
    def __init__(self, pf: PackageFile, i: int, dev, dtype, backend: str):
        def vec(name: str, required: bool = True):
            full = f"blk.{i}.{name}"
            if full not in pf.tensors and not required:
                return None
            return torch.from_numpy(dense(pf, full)).to(dev)  # fp32

        def w(name: str):
            return load_weight(pf, f"blk.{i}.{name}.weight")

        self.attn_norm, self.ffn_norm = vec("attn_norm.weight"), vec("ffn_norm.weight")
        self.post_attn_norm = vec("post_attention_norm.weight", False)
        self.post_ffn_norm = vec("post_ffw_norm.weight", False)
        self.q_norm, self.k_norm = vec("attn_q_norm.weight", False), vec("attn_k_norm.weight", False)
        self.qkv = Linear([w("attn_q"), w("attn_k"), w("attn_v")], dev, dtype, backend)
        biases = [vec(f"{n}.bias", False) for n in ("attn_q", "attn_k", "attn_v")]
        self.qkv_bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(n, device=dev) for b, n in zip(biases, self._qkv_sizes(pf), strict=True)])
        self.wo = Linear([w("attn_output")], dev, dtype, backend)
        self.gate_up = Linear([w("ffn_gate"), w("ffn_up")], dev, dtype, backend)
        self.down = Linear([w("ffn_down")], dev, dtype, backend)
        self.linears = (self.qkv, self.wo, self.gate_up, self.down)

    @staticmethod
    def _qkv_sizes(pf: PackageFile):
        hp = pf.hparams
        return hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim


@dataclass
class DecodeSplit:
    step_s: float  # one decode step (graph replay), seconds
    matmul_s: float  # the same step's matmuls alone
    rest_s: float


class TorchDecoder:
    """A package's decoder on a torch device; see the module docstring."""

    def __init__(self, pf: PackageFile, device: str = "cpu", backend: str | None = None,
                 dtype: torch.dtype | None = None, fused_ops: bool | None = None, cuda_graphs: bool | None = None):
        from klaq.kernels import triton_available

        self.hp = hp = pf.hparams
        self.facts = RUNTIME_FACTS[hp.arch]
        self.device = dev = torch.device(device)
        is_cuda = dev.type == "cuda"
        if backend is None:
            backend = "triton" if is_cuda and triton_available() else "torch"
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; choose from {KERNEL_BACKENDS}")
        self.backend = backend
        self.dtype = dtype or (torch.float16 if is_cuda else torch.float32)
        self.fused_ops = (backend == "triton") if fused_ops is None else fused_ops
        if self.fused_ops:
            from klaq.runtime import triton_ops

            self._ops = triton_ops
        else:
            self._ops = None
        self.cuda_graphs = is_cuda if cuda_graphs is None else cuda_graphs
        t0 = time.perf_counter()
        embed = load_weight(pf, "token_embd.weight")
        embed_dense = embed.dequantize() if isinstance(embed, QuantizedWeight) else embed
        self.embed = torch.from_numpy(np.ascontiguousarray(embed_dense)).to(dev, self.dtype)
        if "output.weight" in pf.tensors:
            self.head = Linear([load_weight(pf, "output.weight")], dev, self.dtype, backend)
        elif isinstance(embed, QuantizedWeight):
            self.head = Linear([embed], dev, self.dtype, backend)
        else:  # tied fp16 head: share the embedding table
            self.head = Linear.__new__(Linear)
            e = self.embed
            self.head.fns, self.head.quantized = [lambda x: F.linear(x, e)], [False]
            self.head.nbytes, self.head.out_features = e.numel() * e.element_size(), e.shape[0]
        self.norm = torch.from_numpy(dense(pf, "output_norm.weight")).to(dev)
        self.blocks = [_Block(pf, i, dev, self.dtype, backend) for i in range(hp.n_layers)]
        self.prepare_s = time.perf_counter() - t0
        half = hp.head_dim // 2
        exps = np.arange(half, dtype=np.float64) * 2 / hp.head_dim
        self.inv_freq = {"global": 1.0 / hp.rope_theta**exps, "local": 1.0 / self.facts.local_rope_theta**exps}
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rope_len = 0
        self._mm_log: list | None = None
        self.attn_block_n = 128  # keys per step of the Triton decode-attention loop
        self.embed_scale = float(np.float32(np.sqrt(hp.hidden))) if self.facts.embed_scale else None

    @property
    def uses_pdl(self) -> bool:
        """Whether the decode step's Triton kernels launch with programmatic dependent launch
        (klaq.kernels.pdl: on Hopper or later unless ``KLAQ_PDL=0``; read when a graph is captured)."""
        if self.device.type != "cuda" or (self.backend != "triton" and self._ops is None):
            return False
        from klaq.kernels.pdl import pdl_enabled

        return pdl_enabled(self.device)

    # -- sizes -----------------------------------------------------------------------------
    def set_decode_config(self, config: dict | None) -> None:
        """Triton launch overrides (``block_n``, ``split``, ``num_warps`` ...) for the M = 1 matmuls.

        Takes effect for caches whose decode graph is captured afterwards.
        """
        if self.backend == "triton":
            for lin in self.linears():
                lin.decode_config = config

    def linears(self) -> list[Linear]:
        return [lin for b in self.blocks for lin in b.linears] + [self.head]

    def weight_bytes_per_step(self) -> int:
        """Bytes a decode step reads for weights: every linear (the head too), norms, one embedding row."""
        norms = sum(t.numel() * 4 for b in self.blocks for t in (b.attn_norm, b.ffn_norm, b.post_attn_norm,
                                                                   b.post_ffn_norm, b.q_norm, b.k_norm)
                    if t is not None)
        row = self.embed.shape[1] * self.embed.element_size()
        return sum(lin.nbytes for lin in self.linears()) + norms + row

    def kv_bytes_per_step(self, context: int) -> int:
        hp = self.hp
        return 2 * hp.n_layers * hp.n_kv_heads * hp.head_dim * context * self.embed.element_size()

    # -- cache -----------------------------------------------------------------------------
    def is_local(self, layer: int) -> bool:
        p = self.facts.swa_pattern
        return bool(p and self.hp.sliding_window and (layer + 1) % p != 0)

    def _rope_tables(self, max_len: int):
        if max_len > self._rope_len:
            n = max(max_len, 2 * self._rope_len)
            pos = np.arange(n, dtype=np.float64)[:, None]
            self._rope = {}
            for key, inv in self.inv_freq.items():
                ang = pos * inv[None, :]
                self._rope[key] = (torch.from_numpy(np.cos(ang).astype(np.float32)).to(self.device),
                                   torch.from_numpy(np.sin(ang).astype(np.float32)).to(self.device))
            self._rope_len = n
        return self._rope

    def new_cache(self, max_len: int) -> TorchKVCache:
        hp = self.hp
        return TorchKVCache(hp.n_layers, hp.n_kv_heads, hp.head_dim, max_len, self.device, self.dtype,
                            self._rope_tables(max_len))

    # -- the step --------------------------------------------------------------------------
    def _mm(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        if self._mm_log is not None:
            self._mm_log.append((lin, tuple(x.shape)))
        return lin(x)

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, cache: TorchKVCache, end: int | None) -> torch.Tensor:
        """Logits ``[M, vocab]`` for tokens ``ids`` at positions ``pos`` (device tensors).

        ``end=None`` is the graph-safe decode form: attention spans the whole cache behind a mask
        (or the Triton kernel reads the length from ``pos``); otherwise it spans ``cache[:, :end]``.
        """
        hp, ops = self.hp, self._ops
        add_rmsnorm = ops.add_rmsnorm if ops else add_rmsnorm_torch
        rope_qkv = ops.rope_qkv if ops else rope_qkv_torch
        act_mul = ops.act_mul if ops else act_mul_torch
        gelu = self.facts.act == "gelu_tanh"
        scale = 1.0 / math.sqrt(hp.head_dim)
        x = self.embed.index_select(0, ids).float()
        if self.embed_scale is not None:
            x = x * self.embed_scale
        h = add_rmsnorm(x, None, None, self.blocks[0].attn_norm, hp.rms_eps, self.dtype)
        for li, b in enumerate(self.blocks):
            local = self.is_local(li)
            cos, sin = cache.rope["local" if local else "global"]
            window = hp.sliding_window if local else 0
            kc, vc = cache.k[li], cache.v[li]
            qkv = self._mm(b.qkv, h)
            q = rope_qkv(qkv, b.qkv_bias, pos, cos, sin, b.q_norm, b.k_norm, kc, vc, hp.n_heads, hp.n_kv_heads,
                         hp.head_dim, self.facts.rope_pairs == "adjacent", hp.rms_eps)
            if ops is not None and end is None:
                o = ops.decode_attention(q, kc, vc, pos, window, scale, self.attn_block_n)
            else:
                o = attention_torch(q, kc, vc, pos, cache.max_len if end is None else end, window, scale)
            o = self._mm(b.wo, o)
            h = add_rmsnorm(x, o, b.post_attn_norm, b.ffn_norm, hp.rms_eps, self.dtype)
            a = act_mul(self._mm(b.gate_up, h), gelu)
            m = self._mm(b.down, a)
            nxt = self.blocks[li + 1].attn_norm if li + 1 < len(self.blocks) else self.norm
            h = add_rmsnorm(x, m, b.post_ffn_norm, nxt, hp.rms_eps, self.dtype)
        return self._mm(self.head, h)

    @torch.inference_mode()
    def forward(self, ids, cache: TorchKVCache) -> np.ndarray:
        """Run ``ids`` (new tokens) through the model, append to ``cache``; logits [T, vocab] (numpy)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        t = ids.shape[0]
        start = cache.length
        if start + t > cache.max_len:
            raise ValueError(f"KV cache full: {start} + {t} > {cache.max_len}")
        if t == 1 and self.cuda_graphs:
            return self.decode_step(int(ids[0]), cache)[None, :]
        ids_t = torch.from_numpy(ids).to(self.device)
        pos = torch.arange(start, start + t, device=self.device)
        logits = self._run(ids_t, pos, cache, end=start + t)
        cache.length = start + t
        return logits.float().cpu().numpy()

    # -- CUDA graphs -----------------------------------------------------------------------
    def _graph(self, cache: TorchKVCache) -> DecodeGraph:
        if cache.graph is None:
            cache.graph = DecodeGraph(self, cache)
        return cache.graph

    @torch.inference_mode()
    def decode_step(self, token: int, cache: TorchKVCache) -> np.ndarray:
        """One token at ``cache.length``; logits ``[vocab]`` as float32 numpy."""
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + 1 > {cache.max_len}")
        if not self.cuda_graphs:
            return self.forward([token], cache)[0]
        g = self._graph(cache)
        g.tok.fill_(token)
        g.pos.fill_(cache.length)
        g.graph.replay()
        cache.length += 1
        return g.logits[0].float().cpu().numpy()

    @torch.inference_mode()
    def greedy_decode(self, token: int, n: int, cache: TorchKVCache) -> list[int]:
        """Feed ``token``, then each argmax in turn: the ``n`` tokens that greedy decoding emits."""
        if cache.length + n > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + {n} > {cache.max_len}")
        if n <= 0:
            return []
        if not self.cuda_graphs:
            out = []
            for _ in range(n):
                token = int(np.argmax(self.forward([token], cache)[-1]))
                out.append(token)
            return out
        g = self._graph(cache)
        start = cache.length
        g.tok.fill_(token)
        g.pos.fill_(start)
        for _ in range(n):
            g.graph.replay()
        cache.length += n
        return g.tokens[start:start + n].tolist()

    @torch.inference_mode()
    def decode_split(self, cache: TorchKVCache, iters: int = 100) -> DecodeSplit:
        """Time one decode step and its matmuls alone (both as CUDA graphs); the rest is the difference.

        Replays run at positions ``cache.length ..``; the cache's length is left unchanged.
        """
        if not self.cuda_graphs:
            raise RuntimeError("decode_split needs CUDA graphs")
        start = cache.length
        if start >= cache.max_len:
            raise ValueError("decode_split needs a free cache slot (allocate the cache a little longer)")
        g = self._graph(cache)
        reps = min(iters, cache.max_len - start)
        g.pos.fill_(start)
        g.tok.fill_(0)
        step = _time_graph(g.graph, reps, lambda: g.pos.fill_(start))
        mm = g.matmul_graph()
        matmul = _time_graph(mm, iters)
        g.pos.fill_(start)
        return DecodeSplit(step, matmul, step - matmul)


def _time_graph(graph, iters: int, reset=None) -> float:
    """Median seconds per replay (events around each replay)."""
    times = []
    for _ in range(iters):
        if reset is not None:
            reset()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


class DecodeGraph:
    """The decode step of one model on one cache, captured once and replayed for every token.

    Inputs ``tok``/``pos`` are device tensors; the graph writes ``logits``, stores its argmax in
    ``tokens[pos]`` and feeds it back: ``tok = argmax``, ``pos += 1``.
    """

    def __init__(self, model: TorchDecoder, cache: TorchKVCache):
        if cache.length >= cache.max_len:
            raise ValueError("cannot capture a decode step on a full KV cache")
        dev = model.device
        self.model, self.cache = model, cache
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(cache.max_len + 1, dtype=torch.long, device=dev)
        model._mm_log = []
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm-up: compile kernels, grow workspaces outside the capture
            for _ in range(2):
                self.pos.fill_(cache.length)  # scratch writes land on the next, not yet valid, slot
                self._body()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.mm_calls = model._mm_log[: len(model._mm_log) // 2]
        model._mm_log = None
        self.pos.fill_(cache.length)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()
        self.pos.fill_(cache.length)
        # Keep what the kernels allocated for the capture alive even if they later grow new ones.
        import sys

        tw = sys.modules.get("klaq.kernels.triton_w4a16")
        self._keep = dict(getattr(tw, "_WORKSPACES", {}) or {})
        self._mm_graph = None

    def _body(self) -> torch.Tensor:
        logits = self.model._run(self.tok, self.pos, self.cache, end=None)
        nxt = torch.argmax(logits, dim=-1)
        self.tokens.index_copy_(0, self.pos, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        return logits

    def matmul_graph(self):
        """A graph of the step's matmuls alone, same weights and shapes (for the time split)."""
        if self._mm_graph is None:
            dev = self.model.device
            xs = {shape: torch.randn(shape, device=dev).to(self.model.dtype) for _, shape in self.mm_calls}
            for lin, shape in self.mm_calls:  # warm-up
                lin(xs[shape])
            torch.cuda.synchronize(dev)
            self._mm_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._mm_graph):
                for lin, shape in self.mm_calls:
                    lin(xs[shape])
            self._mm_inputs = xs
        return self._mm_graph
