"""Fused Triton kernels for everything in a decode step that is not a matmul.

At batch 1 a small model's step is a few hundred tiny kernels, so launches, not bytes, set the
speed (kernels-and-style.md §1: "the overhead argument"). These kernels cut the non-matmul work of a
block to four launches, each written against the plain-torch versions in
:mod:`klaq.runtime.torch_model` (tests/runtime/test_torch_model.py runs them under
``TRITON_INTERPRET=1`` on CPU):

* :func:`add_rmsnorm`: ``x += post_norm(delta)`` (optional parts), then ``out = rms_norm(x) * w``;
  the residual stream ``x`` stays fp32, ``out`` is in the activation dtype.
* :func:`rope_qkv`: optional bias, Q/K RMSNorm (Gemma), RoPE (adjacent pairs or halves) from
  precomputed cos/sin tables, K and V stored into the cache at each token's position, Q returned.
* :func:`decode_attention`: one program per (token, query head), online softmax over the cache up to
  the token's position (a device tensor, so a CUDA graph can replay it), optional sliding window.
* :func:`act_mul`: ``act(gate) * up`` on the fused gate/up output.

Positions are read from device memory everywhere, so shapes never change between decode steps.
On Hopper each kernel launches with programmatic dependent launch (off with ``KLAQ_PDL=0``) and
waits for its predecessor before touching memory (:mod:`klaq.kernels.pdl`), so its launch overlaps
the kernel before it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from klaq.kernels.pdl import launch_kwargs, pdl_enabled, pdl_enter


def _pdl(t: torch.Tensor) -> dict:
    """``PDL`` and ``launch_pdl`` for a kernel on ``t``'s device (klaq.kernels.pdl: it waits for the
    previous kernel before touching memory, so it may launch while that one still runs)."""
    on = pdl_enabled(t.device)
    return dict(PDL=on, **launch_kwargs(on))


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, pw_ptr, w_ptr, out_ptr, H, eps,
                        HAS_DELTA: tl.constexpr, HAS_POST: tl.constexpr, BLOCK: tl.constexpr,
                        PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_POST:
            pw = tl.load(pw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = d * tl.rsqrt(tl.sum(d * d, axis=0) / H + eps) * pw
        x = x + d
        tl.store(x_ptr + row * H + offs, x, mask=mask)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / H + eps) * w
    tl.store(out_ptr + row * H + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, post_w: torch.Tensor | None, w: torch.Tensor,
                eps: float, dtype: torch.dtype) -> torch.Tensor:
    """In place on the fp32 residual ``x [M, H]``; returns ``rms_norm(x) * w`` in ``dtype``."""
    m, h = x.shape
    out = torch.empty((m, h), device=x.device, dtype=dtype)
    block = triton.next_power_of_2(h)
    _add_rmsnorm_kernel[(m,)](x, x if delta is None else delta, w if post_w is None else post_w, w, out, h, eps,
                              HAS_DELTA=delta is not None, HAS_POST=post_w is not None, BLOCK=block,
                              num_warps=4 if block <= 2048 else 8, **_pdl(x))
    return out


@triton.jit
def _rope_qkv_kernel(qkv_ptr, b_ptr, pos_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, q_ptr, kc_ptr, vc_ptr,
                     stride_qkv, max_len, eps,
                     H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF_BLOCK: tl.constexpr,
                     ADJ: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QKNORM: tl.constexpr,
                     PDL: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half: tl.constexpr = D // 2
    i = tl.arange(0, HALF_BLOCK)
    mask = i < half
    if ADJ:  # llama.cpp NORM rope: pairs (2i, 2i + 1)
        i0 = 2 * i
        i1 = 2 * i + 1
    else:  # NEOX: pairs (i, i + D/2)
        i0 = i
        i1 = i + half
    src = qkv_ptr + m * stride_qkv + h * D
    x0 = tl.load(src + i0, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + i1, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x0 += tl.load(b_ptr + h * D + i0, mask=mask, other=0.0).to(tl.float32)
        x1 += tl.load(b_ptr + h * D + i1, mask=mask, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + m)
    if h < H + HKV:  # Q or K: [norm], rotate
        if HAS_QKNORM:
            if h < H:
                w0 = tl.load(qn_ptr + i0, mask=mask, other=0.0)
                w1 = tl.load(qn_ptr + i1, mask=mask, other=0.0)
            else:
                w0 = tl.load(kn_ptr + i0, mask=mask, other=0.0)
                w1 = tl.load(kn_ptr + i1, mask=mask, other=0.0)
            r = tl.rsqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / D + eps)
            x0 = x0 * r * w0
            x1 = x1 * r * w1
        c = tl.load(cos_ptr + pos * half + i, mask=mask, other=0.0)
        s = tl.load(sin_ptr + pos * half + i, mask=mask, other=0.0)
        y0 = x0 * c - x1 * s
        y1 = x0 * s + x1 * c
        if h < H:
            dst = q_ptr + (m * H + h) * D
        else:
            dst = kc_ptr + ((h - H) * max_len + pos) * D
        tl.store(dst + i0, y0.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + i1, y1.to(dst.dtype.element_ty), mask=mask)
    else:  # V: straight into the cache
        dst = vc_ptr + ((h - H - HKV) * max_len + pos) * D
        tl.store(dst + i0, x0.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + i1, x1.to(dst.dtype.element_ty), mask=mask)


def rope_qkv(qkv: torch.Tensor, bias, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_norm, k_norm,
             k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
             adjacent: bool, eps: float) -> torch.Tensor:
    """``qkv [M, (H + 2 Hkv) D]`` -> rotated Q ``[M, H, D]``; K/V written to ``cache[:, pos]``."""
    m = qkv.shape[0]
    q = torch.empty((m, n_heads, head_dim), device=qkv.device, dtype=k_cache.dtype)
    _rope_qkv_kernel[(m, n_heads + 2 * n_kv)](
        qkv, qkv if bias is None else bias, pos, cos, sin, cos if q_norm is None else q_norm,
        cos if k_norm is None else k_norm, q, k_cache, v_cache, qkv.stride(0), k_cache.shape[1], eps,
        H=n_heads, HKV=n_kv, D=head_dim, HALF_BLOCK=triton.next_power_of_2(head_dim // 2), ADJ=adjacent,
        HAS_BIAS=bias is not None, HAS_QKNORM=q_norm is not None, num_warps=1 if head_dim <= 128 else 2,
        **_pdl(qkv))
    return q


@triton.jit
def _decode_attn_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, max_len, window, scale,
                        H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, LOCAL: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kvh = h // GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + (m * H + h) * D + d, mask=dmask, other=0.0).to(tl.float32) * scale
    end = tl.load(pos_ptr + m) + 1
    if LOCAL:
        lo = tl.maximum(end - window, 0)
    else:
        lo = end * 0
    k_base = kc_ptr + kvh.to(tl.int64) * max_len * D
    v_base = vc_ptr + kvh.to(tl.int64) * max_len * D
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range((lo // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = (n < end) & (n >= lo)
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + n[:, None] * D + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(nmask, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_base + n[:, None] * D + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(o_ptr + (m * H + h) * D + d, out.to(o_ptr.dtype.element_ty), mask=dmask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     window: int, scale: float, block_n: int = 128) -> torch.Tensor:
    """``q [M, H, D]`` (token ``m`` at position ``pos[m]``) over the cache -> ``[M, H * D]``."""
    m, h, d = q.shape
    n_kv, max_len = k_cache.shape[0], k_cache.shape[1]
    out = torch.empty((m, h * d), device=q.device, dtype=q.dtype)
    _decode_attn_kernel[(m, h)](q, k_cache, v_cache, pos, out, max_len, max(window, 1), scale, H=h,
                                GROUP=h // n_kv, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
                                LOCAL=window > 0, num_warps=4 if block_n <= 64 else 8, **_pdl(q))
    return out


@triton.jit
def _act_mul_kernel(gu_ptr, out_ptr, F, GELU: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(gu_ptr + m * 2 * F + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + m * 2 * F + F + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # tanh(z) = 2 * sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))
    else:
        a = g * tl.sigmoid(g)
    tl.store(out_ptr + m * F + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def act_mul(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``gate_up [M, 2F]`` (gate first) -> ``act(gate) * up`` ``[M, F]``."""
    m, f2 = gate_up.shape
    f = f2 // 2
    out = torch.empty((m, f), device=gate_up.device, dtype=gate_up.dtype)
    block = min(1024, triton.next_power_of_2(f))
    _act_mul_kernel[(m, triton.cdiv(f, block))](gate_up, out, f, GELU=gelu, BLOCK=block, num_warps=4, **_pdl(gate_up))
    return out
