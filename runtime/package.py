"""Open a package for running: read the GGUF, build the tokenizer and the decoder, time it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from klaq.errors import KlaqError
from klaq.formats.gguf_package import PackageFile, read_package
from klaq.formats.tokenizer import PackageTokenizer
from klaq.runtime.model import NumpyDecoder

BACKENDS = ("numpy",)


@dataclass
class LoadedPackage:
    file: PackageFile
    model: NumpyDecoder
    tokenizer: PackageTokenizer
    load_s: float


def load_package(path: str, backend: str = "numpy", device: str = "cpu") -> LoadedPackage:
    if backend not in BACKENDS:
        raise KlaqError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if device != "cpu":
        raise KlaqError(f"device {device!r} is not available to the {backend} backend (use --device cpu)")
    t0 = time.perf_counter()
    pf = read_package(path)
    tok = PackageTokenizer(pf.tokenizer)
    model = NumpyDecoder(pf)
    return LoadedPackage(pf, model, tok, time.perf_counter() - t0)
