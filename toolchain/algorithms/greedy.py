"""``--rounding greedy``: a rounding-flip pass after any method (the seed's "heuristic AWQ" idea).

For each output row the pass flips single codes to the other neighbouring grid point when that
lowers the row's expected output error under a diagonal-plus-mean model of the inputs:

    J_r = (m · δ_r)² + Σ_k v_k δ_rk²,      δ_r = Q_r - W_r

``m`` is the mean input and ``v`` the per-channel input variance, both over calibration tokens with
outlier tokens masked (token norm above 5x the median: attention-sink-like tokens would otherwise
set the mean). The first term is the seed's ``|E[x]·(W − Q)|``; the second keeps flips from buying
bias with noise. Each iteration applies, in every row at once, the single flip with the largest
decrease of ``J_r``; it stops when no row improves (or after ``max_iters``). Scales and zeros are
unchanged, so the result has the same layout and maps onto the same package blocks.
"""

from __future__ import annotations

import torch

from klaq.formats.qweight import QuantizedWeight
from klaq.toolchain.algorithms.grid import QuantSpec, dequantize_codes, to_qweight


def greedy_refine(w: torch.Tensor, qw: QuantizedWeight, stats, spec: QuantSpec, max_iters: int | None = None):
    """Returns (refined QuantizedWeight, its dequantized weight, {"flips": n})."""
    dev = w.device
    w = w.float()
    n, k = w.shape
    codes = torch.from_numpy(qw.codes.astype("float32")).to(dev)
    scale = torch.from_numpy(qw.scales.astype("float32")).to(dev)
    zero = torch.from_numpy(qw.zero_points().astype("float32")).to(dev)
    gi = torch.arange(k, device=dev) // qw.group_size
    s_full = scale[:, gi]
    deq = dequantize_codes(codes, scale, zero, spec)
    cnt = max(stats.m_n, 1)
    m = (stats.m_sum / cnt).float()
    v = (stats.m_sq / cnt).float() - m * m
    v = v.clamp_min(0)
    delta = deq - w
    e = delta @ m
    flips = 0
    rows = torch.arange(n, device=dev)
    for _ in range(max_iters or k):
        direction = torch.sign(w - deq) * torch.sign(s_full)  # code step toward (and past) w
        step = direction * s_full  # change of the dequantized value
        new_code = codes + direction
        ok = (direction != 0) & (new_code >= 0) & (new_code <= spec.maxq)
        gain = 2 * e[:, None] * m * step + (m * step) ** 2 + v * (2 * delta * step + step * step)
        gain = torch.where(ok, gain, torch.full_like(gain, float("inf")))
        best, col = gain.min(dim=1)
        improve = best < -1e-12 * (e * e + 1e-30)
        if not bool(improve.any()):
            break
        r, c = rows[improve], col[improve]
        codes[r, c] = new_code[r, c]
        old = deq[r, c]
        # the dequantized value of one element, with the package's arithmetic
        g = gi[c]
        if spec.sym:
            val = (codes[r, c] - zero[r, g]) * scale[r, g]
        else:
            val = codes[r, c] * scale[r, g] - (zero[r, g] * scale[r, g]).half().float()
        deq[r, c] = val
        delta[r, c] = val - w[r, c]
        e[r] += m[c] * (val - old)
        flips += int(improve.sum())
    return to_qweight(codes, scale, zero, spec), deq, {"flips": flips}
