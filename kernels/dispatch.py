"""Pick a W4A16 backend once per weight, at load: ``prepare(qweight, device)`` then ``w4a16_matmul``.

Rules (DESIGN.md: the CPU runtime never imports torch):

* no device, or ``"numpy"``: :class:`NumpyW4` (numpy arrays in and out);
* a CUDA device with Triton importable: :class:`TritonW4` (GEMV for small M, GEMM above);
* a CUDA device without Triton (Jetson images), or a torch CPU device: :class:`TorchW4`.

The choice between GEMV and GEMM by M happens per call inside the Triton backend, since one
prepared weight serves both prefill and decode.
"""

from __future__ import annotations

import importlib.util

from klaq.formats.qweight import QuantizedWeight

from .numpy_ref import NumpyW4

BACKENDS = ("numpy", "torch", "triton")


def triton_available() -> bool:
    """Triton importable *and* a CUDA device to run it on (the interpreter is for tests only)."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pick_backend(device=None) -> str:
    if device is None or str(device) == "numpy":
        return "numpy"
    if str(device).startswith("cuda") and triton_available():
        return "triton"
    return "torch"


def prepare(qweight: QuantizedWeight, device=None, backend: str | None = None):
    """Convert a canonical weight into the layout of the chosen backend (once, at load)."""
    backend = backend or pick_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "numpy":
        return NumpyW4(qweight)
    if backend == "torch":
        from .torch_w4a16 import TorchW4

        return TorchW4(qweight, device or "cpu")
    from .triton_w4a16 import repack

    return repack(qweight, device or "cuda")


def w4a16_matmul(x, prepared):
    """``x @ W.T`` with a weight from :func:`prepare`; ``x`` is ``[..., K]`` (numpy or torch)."""
    return prepared(x)
