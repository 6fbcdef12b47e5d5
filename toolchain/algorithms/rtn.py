"""Round-to-nearest: the baseline every other method must beat. Needs no calibration data."""

from __future__ import annotations

import torch

from klaq.formats.qweight import QuantizedWeight
from klaq.toolchain.algorithms.grid import QuantSpec, fit_grid, quantize_codes, to_qweight


def rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    scale, zero = fit_grid(weight, spec)
    return to_qweight(quantize_codes(weight, scale, zero, spec), scale, zero, spec)
