"""Quantize every linear layer of the decoder blocks (not embeddings, norms or the head).

``rtn`` needs no data and runs linear by linear; every calibrated method (``awq``, ``gptq``,
``klawq``, ``awq+gptq``, ``awq+klawq``, and ``rtn`` with ``--rounding greedy``) goes through the
sequential engine (:mod:`klaq.toolchain.engine`) on calibration windows. Both work on a lazily
loaded model (:mod:`klaq.toolchain.lazy`), reading the weights from disk as they go.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from tqdm import tqdm

from klaq.errors import KlaqError
from klaq.formats.qweight import QuantizedWeight
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.algorithms.rtn import rtn
from klaq.toolchain.archs import QUANT_ARCHS
from klaq.toolchain.engine import CALIBRATED_METHODS, EngineConfig, EngineResult, quantize_blocks
from klaq.toolchain.lazy import materialized

METHODS = ("rtn", "fp16") + CALIBRATED_METHODS
GROUP_SIZES = (32, 64, 128, 256, -1)  # -1 = per-channel


def check_spec(spec: QuantSpec) -> None:
    if spec.bits not in (2, 3, 4, 8):
        raise KlaqError(f"--bits must be 2, 3, 4 or 8, got {spec.bits}")
    if spec.group_size not in GROUP_SIZES:
        raise KlaqError(f"--group-size must be one of 32, 64, 128, 256 or -1 (per-channel), got {spec.group_size}")


def needs_calibration(method: str, rounding: str = "nearest") -> bool:
    return method in CALIBRATED_METHODS or (method == "rtn" and rounding != "nearest")


def decoder_linears(model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(full parameter-name prefix, module) of every linear inside the decoder blocks.

    Uses the architecture table when the model type is in it (GPT-2's Conv1D linears included),
    else every ``nn.Linear`` under a ``.layers.`` path.
    """
    arch = QUANT_ARCHS.get(getattr(model.config, "model_type", ""))
    if arch is not None:
        layers = model.get_submodule(arch.layers)
        for i, block in enumerate(layers):
            for stage in arch.stages:
                for name in stage:
                    yield f"{arch.layers}.{i}.{name}", block.get_submodule(name)
        return
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            yield name, module


def quantize_model(model, method: str, spec: QuantSpec, progress: bool = True, calib_ids=None,
                   engine: EngineConfig | None = None) -> dict[str, QuantizedWeight]:
    """``{weight name: QuantizedWeight}`` for every decoder linear (``{}`` for fp16)."""
    return quantize_model_ex(model, method, spec, progress, calib_ids, engine)[0]


def quantize_model_ex(model, method: str, spec: QuantSpec, progress: bool = True, calib_ids=None,
                      engine: EngineConfig | None = None) -> tuple[dict[str, QuantizedWeight], EngineResult | None]:
    """Like :func:`quantize_model`, plus the engine's result (time, peak memory) when it ran."""
    if method not in METHODS:
        raise KlaqError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if method == "fp16":
        return {}, None
    check_spec(spec)
    engine = replace(engine or EngineConfig(), method=method, spec=spec, progress=progress)
    if needs_calibration(method, engine.rounding):
        if calib_ids is None:
            raise KlaqError(f"method {method!r} needs calibration data")
        res = quantize_blocks(model, calib_ids, engine)
        return res.quantized, res
    linears = list(decoder_linears(model))
    if not linears:
        raise KlaqError("model has no linear layers inside decoder blocks")
    conv1d = type(linears[0][1]).__name__ == "Conv1D"
    out = {}
    with torch.no_grad():
        for name, lin in tqdm(linears, desc=f"{method} W{spec.bits}", disable=not progress, unit="linear"):
            w = materialized(model, f"{name}.weight", lin.weight).detach()  # lazy: read now, one at a time
            out[f"{name}.weight"] = rtn(w.T if conv1d else w, spec)
    return out, None
