"""The integer grid every method rounds onto: scales/zeros per group and codes for a weight.

Shared by all algorithms so that "what a group's scale is" has one definition. Scales are rounded
to fp16 *before* codes are computed, so codes are optimal for the scale the package stores.

Symmetric grids use llama.cpp's signed-max rule (``d = max / -2^(b-1)``, where ``max`` is the
element of largest magnitude, sign kept): that element lands exactly on the grid end that has
the extra level, so no group loses a level to the sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from klaq.formats.qweight import QuantizedWeight

TINY = 2.0**-24  # smallest fp16 subnormal: a scale of 0 would make every code meaningless


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64  # -1 or >= in_features: one group per row (per-channel)
    sym: bool = False

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups_for(self, k: int) -> int:
        return k if self.group_size <= 0 or self.group_size >= k else self.group_size


def _grouped(w: torch.Tensor, gs: int) -> torch.Tensor:
    """[N, K] -> [N, G, gs], the ragged last group padded by repeating its last column."""
    n, k = w.shape
    g = -(-k // gs)
    pad = g * gs - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, g, gs)


def fit_grid(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0):
    """Per-group ``(scale, zero)``: fp32 tensors [N, G] (scale already fp16-representable)."""
    gs = spec.groups_for(w.shape[1])
    wg = _grouped(w.float(), gs)
    if spec.sym:
        half = 1 << (spec.bits - 1)
        idx = wg.abs().argmax(dim=2, keepdim=True)
        signed_max = wg.gather(2, idx).squeeze(2) * clip
        scale = signed_max / -half
        scale = torch.where(scale.abs() < TINY, torch.full_like(scale, TINY), scale)
        zero = torch.full_like(scale, half)
    else:
        wmax = wg.amax(dim=2) * clip
        wmin = wg.amin(dim=2) * clip
        scale = ((wmax - wmin) / spec.maxq).clamp_min(TINY)
        scale = scale.half().float().clamp_min(TINY)
        zero = torch.round(-wmin / scale).clamp(0, spec.maxq)
    return scale.half().float(), zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes [N, K] for given per-group scale/zero [N, G]."""
    n, k = w.shape
    gs = spec.groups_for(k)
    gi = torch.arange(k, device=w.device) // gs
    if spec.sym:
        q = torch.round(w.float() / scale[:, gi]) + zero[:, gi]
    else:  # round against the offset the package stores, fp16(z*s), not the exact z*s
        q = torch.round((w.float() + (zero * scale).half().float()[:, gi]) / scale[:, gi])
    return q.clamp(0, spec.maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(q - z) * s`` for codes [N, K] and per-group scale/zero [N, G], with the package's arithmetic."""
    k = q.shape[1]
    gi = torch.arange(k, device=q.device) // spec.groups_for(k)
    if spec.sym:
        return (q - zero[:, gi]) * scale[:, gi]
    return q * scale[:, gi] - (zero * scale).half().float()[:, gi]


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize with exactly the package's arithmetic (fp16 ``z*s`` offsets)."""
    return dequantize_codes(quantize_codes(w, scale, zero, spec), scale, zero, spec)


def to_qweight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    k = codes.shape[1]
    return QuantizedWeight(
        codes=codes.to(torch.uint8).cpu().numpy(),
        scales=scale.half().cpu().numpy(),
        zeros=None if spec.sym else zero.to(torch.uint8).cpu().numpy(),
        bits=spec.bits,
        group_size=spec.groups_for(k),
    )


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
