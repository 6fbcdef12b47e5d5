"""Quantize every linear layer of the decoder blocks (not embeddings, norms or the head)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from klaq.errors import KlaqError
from klaq.formats.qweight import QuantizedWeight
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.algorithms.rtn import rtn

METHODS = ("rtn", "fp16")
GROUP_SIZES = (32, 64, 128, 256, -1)  # -1 = per-channel


def check_spec(spec: QuantSpec) -> None:
    if spec.bits not in (2, 3, 4, 8):
        raise KlaqError(f"--bits must be 2, 3, 4 or 8, got {spec.bits}")
    if spec.group_size not in GROUP_SIZES:
        raise KlaqError(f"--group-size must be one of 32, 64, 128, 256 or -1 (per-channel), got {spec.group_size}")


def decoder_linears(model) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(full parameter-name prefix, module) of every Linear inside the decoder blocks."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            yield name, module


def quantize_model(model, method: str, spec: QuantSpec, progress: bool = True) -> dict[str, QuantizedWeight]:
    """``{weight name: QuantizedWeight}`` for every decoder linear (``{}`` for fp16)."""
    if method not in METHODS:
        raise KlaqError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if method == "fp16":
        return {}
    check_spec(spec)
    linears = list(decoder_linears(model))
    if not linears:
        raise KlaqError("model has no linear layers inside decoder blocks")
    out = {}
    with torch.no_grad():
        for name, lin in tqdm(linears, desc=f"{method} W{spec.bits}", disable=not progress, unit="linear"):
            out[f"{name}.weight"] = rtn(lin.weight.detach(), spec)
    return out
