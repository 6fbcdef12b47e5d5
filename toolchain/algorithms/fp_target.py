"""FP-target calibration: fit a linear's weight to the *FP model's* output from the *quantized* inputs.

GPTQ minimizes ``‖X_q Wᵀ − X_q Qᵀ‖²`` with ``X_q`` the layer's inputs in the partly quantized
model (``propagate=True``): it reproduces ``W``'s output on inputs that are already off, so the
error of every earlier layer passes through untouched. Calibrating on FP inputs instead
(``propagate=False``) fits inputs the quantized model never sees. The asymmetric objective
(GPTAQ, Li et al. 2025) takes the target from the FP model and the inputs from the quantized one::

    min_Q ‖X_fp Wᵀ − X_q Qᵀ‖²  =  ‖X_q (W̃ − Q)ᵀ‖² + const,   W̃ = W C H⁻¹

with ``H = X_qᵀ X_q`` and ``C = X_fpᵀ X_q`` (both per token, as accumulated by the engine). So GPTQ
on ``W̃`` with the usual Hessian ``H`` solves it: ``W̃`` is the best unquantized weight for the
quantized inputs, a correction that undoes the upstream error as far as this layer can. Written
as ``W̃ = W + W (C − H)(H + λI)⁻¹`` so that where both streams agree (``C = H``: block 0's first
linears) ``W̃ = W`` exactly, whatever the ridge ``λ`` (``ridge · mean diag H``). The ridge is what
keeps the fit general: a k x k regression on one calibration text also learns that text's
incidental correlations (on Gemma-3-270M W4 with ridge 0.01 the held-out pydoc KL fell and the
out-of-domain KL rose, BENCHMARKS.md); a larger ridge keeps the correction to the input
directions the calibration excites strongly.
"""

from __future__ import annotations

import torch


def fp_target_weight(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, ridge: float = 0.01) -> torch.Tensor:
    """``W + W (C − H)(H + λI)⁻¹`` for ``w`` [N, K], ``h`` = E[x_q x_qᵀ], ``c`` = E[x_fp x_qᵀ] [K, K]."""
    w = w.float()
    h = h.float()
    diff = c.float() - h
    if not bool(diff.any()):
        return w.clone()
    hd = h.clone()
    dead = hd.diagonal() == 0
    hd.diagonal()[dead] = 1.0  # inputs that are always zero: no correction along them
    lam = max(ridge, 1e-6) * float(hd.diagonal().mean())
    for attempt in range(8):  # more ridge until the Cholesky factor exists (as GPTQ's damping does)
        try:
            chol = torch.linalg.cholesky(hd + (lam * 10.0**attempt) * torch.eye(len(hd), device=hd.device))
            break
        except torch.linalg.LinAlgError:
            if attempt == 7:
                return w.clone()
    # X (H + λI) = (C − H)  <=>  (H + λI) Xᵀ = (C − H)ᵀ  (H symmetric)
    x = torch.cholesky_solve(diff.T.contiguous(), chol).T
    x[:, dead] = 0.0
    return w + w @ x
