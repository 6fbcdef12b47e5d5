"""GPTQ: column-by-column rounding on klaq's integer grid with Hessian-based error feedback.

Given a linear layer's weight ``W`` [out, in] and the Hessian of its inputs ``H = E[x xᵀ]`` (any
positive scale: GPTQ is invariant to it), columns are quantized left to right; the rounding error
of each column is spread over the columns not yet quantized through the upper Cholesky factor of
``H⁻¹`` (Frantar et al. 2022; reference notes §4). Facts of this implementation:

* Damping ``λ = damp · mean(diag H)``; when a Cholesky factorization fails the damping grows
  (+0.01 per retry, doubling above 0.1) and the damping actually used is reported.
* ``shrink`` (``--hessian-shrink``) adds ``shrink · diag(H)`` before damping: a shrinkage of the
  input correlations toward their diagonal. The diagonal (each input's energy) is what a narrow
  calibration set estimates well; the off-diagonal correlations are what GPTQ's error feedback
  exploits and what overfits to it. ``shrink = 0`` is plain GPTQ; large values approach
  importance-weighted rounding (llama.cpp's imatrix), which holds up out of domain.
* Dead inputs (``H_ii = 0``: the column never sees a non-zero input) get ``H_ii = 1`` and a zero
  weight, as in every reference implementation.
* Lazy blocks of ``block_size`` (128) columns, rounded to a multiple of the group size so that a
  group never straddles two blocks: a group's scale/zero come from :func:`fit_grid` on the group's
  *current* (error-updated) columns when the loop reaches its first column.
* ``act_order`` (columns by descending ``H_ii``) only with static groups: all group grids are
  fitted up front on the unpermuted weight, so the result is an ordinary grouped weight that maps
  exactly onto GGUF / ONNX group layouts (no ``g_idx``).
* The result is a :class:`QuantizedWeight` with exactly RTN's layout (ragged last group and
  per-channel included); its ``dequantize()`` equals the returned fake-quantized tensor bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from klaq.formats.qweight import QuantizedWeight
from klaq.toolchain.algorithms.grid import (
    QuantSpec,
    dequantize_codes,
    fit_grid,
    quantize_codes,
    search_grid,
    to_qweight,
)


@dataclass
class GPTQInfo:
    damp: float  # the damping fraction actually used
    loss: float  # sum over columns of (w - q)^2 / d^2 / 2 (the GPTQ objective's proxy)
    dead: int  # dead input columns
    fallback: bool = False  # True when no damping made H factorizable and RTN was used


def hinv_upper(h: torch.Tensor, damp: float, max_tries: int = 30) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` and the damping fraction used (None: gave up)."""
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(max_tries):
        hd = h + (damp * mean_diag) * eye
        low, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            # cholesky_solve(I): torch's CPU cholesky_inverse took 0.93 s at K = 576 where this
            # takes 32 ms (2 threads; both about 110 ms at 1536).
            hinv = torch.cholesky_solve(eye, low)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(up).all()):
                return up, damp
        damp = damp + 0.01 if damp < 0.1 else damp * 2
    return None, damp


def lazy_block(block_size: int, group: int, k: int) -> int:
    """A block size that is a multiple of the group size (groups never straddle blocks)."""
    if group >= k:
        return block_size
    return group * max(1, block_size // group)


KERNELS = ("numpy", "torch", "triton")


def _column_kernel(kernel: str | None, device: torch.device) -> str:
    """The column loop to run: the given one, else Triton on CUDA when installed, numpy on CPU."""
    if kernel not in (None, *KERNELS):
        raise ValueError(f"unknown GPTQ column kernel {kernel!r}; choose from {KERNELS}")
    if kernel is None:
        if device.type == "cpu":
            return "numpy"
        import importlib.util

        return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "torch"
    return kernel


def _columns_numpy(w1, u1, scale, offset, col_g, codes1, err1, a, b, spec):
    """:func:`_columns_torch` on numpy views of the same CPU tensors, bit for bit: the same fp32
    operations in the same order (round half to even, no fused multiply-add), without torch's
    per-operation dispatch, which made the loop most of a CPU GPTQ's time on SmolLM2-sized
    layers (about 20 small operations per column). ``offset``: the zero points (symmetric) or
    the stored fp16 offsets ``z * s`` (asymmetric), per group."""
    w, u, sc, off = w1.numpy(), u1.numpy(), scale.numpy(), offset.numpy()
    codes, err = codes1.numpy(), err1.numpy()
    maxq = np.float32(spec.maxq)
    for i in range(a, b):
        g = col_g[i]
        col, sg, og = w[:, i], sc[:, g], off[:, g]
        if spec.sym:
            q = np.clip(np.round(col / sg) + og, 0, maxq)
            dq = (q - og) * sg
        else:
            q = np.clip(np.round((col + og) / sg), 0, maxq)
            dq = q * sg - og
        e = (col - dq) / u[i, i]
        w[:, i:] -= e[:, None] * u[i : i + 1, i:]
        codes[:, i] = q
        err[:, i] = e


def _columns_torch(w1, u1, scale, zero, col_g, codes1, err1, a, b, spec):
    """The reference column loop (columns ``a .. b-1`` of the lazy block ``w1``)."""
    for i in range(a, b):
        g = col_g[i]
        col = w1[:, i : i + 1]
        sg, zg = scale[:, g : g + 1], zero[:, g : g + 1]
        q = quantize_codes(col, sg, zg, spec)
        dq = dequantize_codes(q, sg, zg, spec)
        e = (col - dq) / u1[i, i]
        w1[:, i:] -= e * u1[i : i + 1, i:]
        codes1[:, i : i + 1] = q
        err1[:, i : i + 1] = e


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = False,
    block_size: int = 128, kernel: str | None = None, shrink: float = 0.0, grid_steps: int = 0,
) -> tuple[QuantizedWeight, torch.Tensor, GPTQInfo]:
    """Quantize ``weight`` [N, K] given ``hessian`` [K, K]; returns (qweight, dequantized W, info).

    Runs on the device of ``weight`` in fp32; the inputs are not modified. ``kernel`` picks the
    column loop: ``"torch"`` (one column at a time), ``"numpy"`` (the same on the CPU, without
    torch's per-operation overhead), ``"triton"`` (:mod:`.gptq_kernel`, a run of columns per
    launch), or None: Triton on CUDA when it is installed, numpy on the CPU; all bit-identical. ``grid_steps`` > 0 fits each
    group's grid with :func:`search_grid` (clip factors weighted by ``diag H``) instead of min-max.
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().to(w.device).clone()
    gs = spec.groups_for(k)
    n_groups = -(-k // gs)
    dead = h.diagonal() == 0
    n_dead = int(dead.sum())
    if n_dead:
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    energy = h.diagonal().clone()  # each input's energy: the grid search's column weights
    if shrink:
        h.diagonal().mul_(1.0 + shrink)
    scale = torch.zeros(n, n_groups, device=w.device)
    zero = torch.zeros(n, n_groups, device=w.device)
    col_group = torch.arange(k, device=w.device) // gs
    perm = None
    if act_order:  # static groups: every grid fitted before any column moves or changes
        scale, zero = search_grid(w, spec, energy, grid_steps)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h, col_group = w[:, perm], h[perm][:, perm], col_group[perm]
    u, used = hinv_upper(h, damp)
    if u is None:
        warnings.warn(f"GPTQ: Hessian not factorizable even with damping {used:.3g}; using RTN", stacklevel=2)
        w0 = weight.detach().float()
        s, z = fit_grid(w0, spec)
        codes = quantize_codes(w0, s, z, spec)
        return to_qweight(codes, s, z, spec), dequantize_codes(codes, s, z, spec), GPTQInfo(used, 0.0, n_dead, True)
    loop = _column_kernel(kernel, w.device)
    if loop == "triton":
        u = u.contiguous()  # the kernel reads rows of U
    codes = torch.zeros(n, k, device=w.device)
    err = torch.zeros(n, k, device=w.device)
    bs = block_size if act_order else lazy_block(block_size, gs, k)
    col_g = col_group.tolist()
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].contiguous()
        u1 = u[i1:i2, i1:i2]
        codes1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        # Runs of columns that share grids: with dynamic groups a grid is fitted when the loop
        # reaches its group's first column, on the group's current (error-updated) columns.
        cuts = [i1] + ([c for c in range(i1 + 1, i2) if c % gs == 0] if perm is None else []) + [i2]
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            if perm is None and a % gs == 0:
                g, g_end = col_g[a], min(a + gs, k)
                cols = w1[:, a - i1 : g_end - i1] if g_end <= i2 else torch.cat([w1[:, a - i1 :], w[:, i2:g_end]], 1)
                s, z = search_grid(cols, spec, energy[a:g_end], grid_steps)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            # zero points (symmetric) or the stored fp16 offsets z * s, per group
            zterm = zero if spec.sym else (zero * scale).half().float()
            if loop == "triton":
                from klaq.toolchain.algorithms.gptq_kernel import gptq_columns

                gcols = col_group[i1:i2].to(torch.int32).contiguous()
                gptq_columns(w1, u1, scale.contiguous(), zterm.contiguous(), gcols, codes1, err1, a - i1, b - i1,
                             spec.maxq, spec.sym)
            elif loop == "numpy":
                _columns_numpy(w1, u1.contiguous(), scale, zterm, col_g[i1:i2], codes1, err1, a - i1, b - i1, spec)
            else:
                _columns_torch(w1, u1, scale, zero, col_g[i1:i2], codes1, err1, a - i1, b - i1, spec)
        codes[:, i1:i2], err[:, i1:i2] = codes1, err1
        if i2 < k:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    loss = float((err.double() ** 2).sum() / 2)
    gi = col_group
    if spec.sym:
        deq = (codes - zero[:, gi]) * scale[:, gi]
    else:
        deq = codes * scale[:, gi] - (zero * scale).half().float()[:, gi]
    if perm is not None:
        inv = torch.argsort(perm)
        codes, deq = codes[:, inv], deq[:, inv]
    return to_qweight(codes, scale, zero, spec), deq, GPTQInfo(used, loss, n_dead)
