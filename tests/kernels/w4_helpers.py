"""Shared helpers for the kernel tests (a plain module: conftest names clash across folders)."""

from types import SimpleNamespace

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


def falls_back_once(monkeypatch, slot: str, kernel: str, ok: str, qw: QuantizedWeight, x: torch.Tensor,
                    match: str) -> None:
    """An optional Gluon kernel that fails to build or launch (another Triton's Gluon API):
    ``triton_w4a16.<slot>`` holds a module whose ``kernel`` raises, and ``triton_w4a16.<ok>`` admits
    it while the slot holds it. The call must warn (``match``), give the fallback's exact-enough
    result, and a second call must not try the kernel again."""
    import pytest

    from klaq.kernels import triton_w4a16
    from klaq.kernels.numpy_ref import reference_matmul

    calls = []

    def fail(*args, **kwargs):
        calls.append(kernel)
        raise RuntimeError("no such Gluon op")

    monkeypatch.setattr(triton_w4a16, slot, [SimpleNamespace(**{kernel: fail})])
    monkeypatch.setattr(triton_w4a16, ok, lambda *args: getattr(triton_w4a16, slot)[0] is not None)
    device = "cuda" if HAS_CUDA else "cpu"
    w = triton_w4a16.repack(qw, device)
    with pytest.warns(RuntimeWarning, match=match):
        y = triton_w4a16.w4a16_matmul(x.to(device), w)
    assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw)) < 2e-3
    triton_w4a16.w4a16_matmul(x.to(device), w)
    assert len(calls) == 1 and getattr(triton_w4a16, slot) == [None]
