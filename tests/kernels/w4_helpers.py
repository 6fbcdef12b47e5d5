"""Shared helpers for the kernel tests (a plain module: conftest names clash across folders)."""

import numpy as np
import torch

from klaq.formats.qweight import QuantizedWeight

HAS_CUDA = torch.cuda.is_available()  # the root conftest picks Triton's interpreter otherwise


def random_qweight(n: int, k: int, group_size: int, asym: bool, seed: int = 0) -> QuantizedWeight:
    """Uniform codes, positive fp16 scales, and (asym) random integer zero points."""
    rng = np.random.default_rng(seed)
    g = -(-k // group_size)
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scales = (rng.random((n, g)) * 0.02 + 0.001).astype(np.float16)
    zeros = rng.integers(0, 16, (n, g), dtype=np.uint8) if asym else None
    return QuantizedWeight(codes, scales, zeros, 4, group_size)


def rel_err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64)
    assert np.isfinite(y).all()
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
