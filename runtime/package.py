"""Open a package for running: read the GGUF, build the tokenizer and the decoder, time it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from klaq.errors import KlaqError
from klaq.formats.gguf_package import PackageFile, read_package
from klaq.formats.tokenizer import PackageTokenizer
from klaq.runtime.model import NumpyDecoder

BACKENDS = ("numpy", "torch", "triton", "onnxruntime")  # torch/triton need torch; onnxruntime an ONNX dir


@dataclass
class LoadedPackage:
    file: PackageFile
    model: NumpyDecoder
    tokenizer: PackageTokenizer
    load_s: float
    backend: str = "numpy"
    device: str = "cpu"


def load_package(path: str, backend: str | None = None, device: str = "cpu", resident: str = "f32") -> LoadedPackage:
    """Open ``path`` for ``device``; the backend defaults to numpy on CPU and, on CUDA, to Triton
    when it is installed, else plain torch (Jetson). ``resident`` ("f32" or "int4") is how the
    numpy backend keeps its weights (see :mod:`klaq.runtime.model`)."""
    from klaq.formats.onnx_package import is_onnx_package

    if is_onnx_package(path):
        return _onnx_package(path, backend, device)
    if backend is None:
        backend = "numpy"
        if device.startswith("cuda"):
            from klaq.kernels import triton_available

            backend = "triton" if triton_available() else "torch"
    if backend not in BACKENDS or backend == "onnxruntime":
        raise KlaqError(f"unknown backend {backend!r} for a GGUF package; available: numpy, torch, triton")
    if backend == "numpy" and device != "cpu":
        raise KlaqError(f"device {device!r} is not available to the {backend} backend (use --device cpu, "
                        "or --backend torch / triton)")
    t0 = time.perf_counter()
    pf = read_package(path)
    tok = PackageTokenizer(pf.tokenizer)
    model = NumpyDecoder(pf, resident) if backend == "numpy" else _torch_decoder(pf, backend, device)
    return LoadedPackage(pf, model, tok, time.perf_counter() - t0, backend, device)


def _torch_decoder(pf: PackageFile, backend: str, device: str):
    """The torch backend; imported only here, so the numpy path never loads torch."""
    try:
        import torch
    except ImportError:
        raise KlaqError(f"backend {backend!r} needs torch (pip install torch)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KlaqError(f"--device {device} requested but no CUDA device is available")
    if backend == "triton":
        from klaq.kernels import triton_available

        if not device.startswith("cuda") or not triton_available():
            raise KlaqError("backend 'triton' needs a CUDA device and the triton package (use --backend torch)")
    from klaq.runtime.torch_model import TorchDecoder

    return TorchDecoder(pf, device=device, backend=backend)


def _onnx_package(path: str, backend: str | None, device: str) -> LoadedPackage:
    """An ONNX package directory, run by onnxruntime (CPU provider; CUDA where present)."""
    if backend not in (None, "onnxruntime"):
        raise KlaqError(f"{path} is an ONNX package: it runs with --backend onnxruntime, not {backend!r}")
    try:
        from klaq.runtime.onnx_model import load_onnx_package
    except ImportError:
        raise KlaqError("ONNX packages need onnxruntime (pip install onnxruntime)") from None
    t0 = time.perf_counter()
    model, pf = load_onnx_package(path, device=device)
    return LoadedPackage(pf, model, PackageTokenizer(pf.tokenizer), time.perf_counter() - t0, "onnxruntime", device)
