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


def search_grid(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, steps: int = 0,
                min_clip: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_grid` with each group's range clipped to whichever of ``steps`` + 1 factors in
    ``[min_clip, 1]`` minimizes its rounding error ``Σ_k importance_k (w - q)²``.

    Why: the min-max grid spends resolution on a group's single largest weight; shrinking the range
    a little usually lowers the error of all the others by more than it costs that one (IST GPTQ's
    ``mse`` option, AWQ's clip search, llama.cpp's ``make_qkx`` do the same). ``importance`` [K]
    (GPTQ: ``diag H``, each input's energy) weights the columns as the layer output does; None
    weighs them equally. ``steps = 0`` is :func:`fit_grid` itself. Ties keep the wider range.
    """
    scale, zero = fit_grid(w, spec)
    if steps <= 0:
        return scale, zero
    n, k = w.shape
    gs = spec.groups_for(k)
    wf = w.float()
    imp = torch.ones(k, device=w.device) if importance is None else importance.float().to(w.device)
    impg = _grouped(imp[None, :], gs)  # [1, G, gs]; padded columns repeat the last one's weight
    if k % gs:  # ... but count them zero times
        impg = impg.clone()
        impg[0, -1, k % gs :] = 0
    best = _group_error(wf, scale, zero, spec, impg)
    for c in torch.linspace(1.0, min_clip, steps + 1)[1:].tolist():
        s, z = fit_grid(wf, spec, clip=c)
        e = _group_error(wf, s, z, spec, impg)
        better = e < best
        best = torch.where(better, e, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _group_error(w, scale, zero, spec, impg) -> torch.Tensor:
    """``Σ importance (w - fake_quantize(w))²`` per group: [N, G]."""
    d = w - fake_quantize(w, scale, zero, spec)
    return (_grouped(d, spec.groups_for(w.shape[1])) ** 2 * impg).sum(2)


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
