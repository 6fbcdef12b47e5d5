"""klaq: quantize a Hugging Face causal LM, package it for an edge device, and prove it runs.

The public API is imported lazily so that ``import klaq`` on a device (runtime extra only) never
pulls in torch or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "QuantizedWeight": "klaq.formats.qweight",
    "KlaqError": "klaq.errors",
    "TARGETS": "klaq.targets.profiles",
    "get_target": "klaq.targets.profiles",
    "load_package": "klaq.runtime.package",
    "export_model": "klaq.toolchain.export",
    "verify_package": "klaq.toolchain.verify",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'klaq' has no attribute {name!r}")
