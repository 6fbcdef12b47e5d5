"""The sequential, memory-bounded calibration engine (DESIGN.md, "Sequential engine").

One decoder block at a time is moved to the compute device (``cfg.device``) in fp32; the rest of
the model stays where it is (CPU). Flow:

1. **Capture.** Every decoder block's ``forward`` is temporarily replaced by a recorder that keeps
   the keyword arguments the block receives (attention mask, position embeddings, ... bound by
   name, so GPT-2's positional arguments work too) and passes the hidden states through; block 0
   also keeps its input hidden states, and the last block raises a sentinel so nothing after the
   decoder (final norm, LM head) ever runs. Arguments are recorded per block because some
   architectures give blocks different ones (Gemma 3: sliding-window vs. global masks and RoPE).
2. **Micro-batches.** Calibration activations are fp32 micro-batches ``[b, T, hidden]`` in RAM,
   or in files when a block's inputs and outputs would not fit (``activations``: auto / cpu /
   disk, :mod:`klaq.toolchain.activations`); each pass moves one micro-batch at a time to the
   device.
3. **Per block.** Optional AWQ (:func:`awq_block`), then the true-sequential stages of the
   architecture table (``toolchain/archs.py``): for each stage the block runs on every micro-batch
   with forward pre-hooks on the stage's linears that accumulate, in fp32 chunks, the input
   statistics (token count, Σ|x|, Σx², the Hessian Σ x xᵀ, and KLAWQ's weighted Σ k_t x xᵀ) and
   stop the forward (sentinel) as soon as every linear of the stage has seen its input. Linears
   of a stage that receive the same tensor share one set of statistics. The stage's linears are
   then quantized and their weights replaced by the fake-quantized ones (exactly the package's
   dequantized numbers), so later stages see the quantized earlier ones.
4. **Propagation.** The block's outputs on all micro-batches become the next block's inputs: with
   quantized weights (``propagate=True``, default) or computed with the FP block before any
   change (``propagate=False``, AutoAWQ's choice). With ``fp_target`` the FP block also runs on
   its own FP stream (captured once at block 0), each stage's forward pass first takes the FP
   block's inputs to the stage's linears for the same micro-batch, and the cross moments Σ x_fp x_qᵀ
   let GPTQ fit the FP outputs from the quantized inputs (:mod:`~klaq.toolchain.algorithms.fp_target`).

Peak memory is one block in fp32 + its Hessians on the device, plus the activations on the CPU.
On the host, a processed block goes back in the model's own dtype (its quantized linear weights;
norms and biases, which AWQ may have rescaled, stay fp32 and are small), or without its quantized
weights at all (``keep_weights=False``): the host holds the input model once, not an fp32 copy
next to it (38 GB for an 8B fp16 model before; bench/engine_scale.py). A lazily loaded model
(:mod:`klaq.toolchain.lazy`, what klaq-export uses where the weights are safetensors) keeps its
blocks on disk: block ``i`` is read right before it moves to the device, so with
``keep_weights=False`` the host holds one block, the kept norms and biases, the codes and the
activations, and never the input model.
Deterministic under ``cfg.seed`` (CPU; on CUDA up to the usual atomics in some kernels).

AWQ hook contract (``toolchain/algorithms/awq.py``)::

    awq_block(block, inputs, block_kwargs, arch_entry, spec, cfg) -> dict | None

``block``: the decoder block on ``cfg.device``, fp32, FP weights (nothing quantized yet).
``inputs``: list of fp32 CPU tensors ``[b, T, hidden]`` (the micro-batches; move each to the
device). ``block_kwargs``: list of dicts, one per micro-batch, already on the device:
``block_output(block(x, **block_kwargs[j]))`` is the block's output for micro-batch ``j``.
``arch_entry``: the :class:`~klaq.toolchain.archs.QuantArch`. ``spec``: the
:class:`QuantSpec`. ``cfg``: this module's :class:`EngineConfig` (``salience``, ``device``,
``seed``, ...). It searches and folds the scales and clips the weights in place; the engine then
quantizes the block's linears (RTN for ``awq``, GPTQ/KLAWQ for ``awq+gptq`` / ``awq+klawq``).
"""

from __future__ import annotations

import copy
import inspect
import resource
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from klaq.errors import KlaqError
from klaq.formats.qweight import QuantizedWeight
from klaq.toolchain.activations import Activations, choose_where
from klaq.toolchain.algorithms.fp_target import fp_target_weight
from klaq.toolchain.algorithms.gptq import gptq_quantize
from klaq.toolchain.algorithms.grid import QuantSpec, dequantize_codes, fit_grid, quantize_codes, to_qweight
from klaq.toolchain.algorithms.klawq import (
    KL_SOURCES,
    add_weighted_outer,
    klawq_hessian,
    layer_token_weights,
    model_fisher_weights,
    norm_token_weights,
)
from klaq.toolchain.archs import QuantArch, get_quant_arch, gptq_defaults
from klaq.toolchain.data import shuffled_windows
from klaq.toolchain.lazy import lazy_weights

CALIBRATED_METHODS = ("awq", "gptq", "klawq", "awq+gptq", "awq+klawq")
ENGINE_METHODS = ("rtn",) + CALIBRATED_METHODS
ROUNDINGS = ("nearest", "greedy")
CHUNK_ROWS = 8192


@dataclass
class EngineConfig:
    method: str = "gptq"
    spec: QuantSpec = field(default_factory=QuantSpec)
    damp: float = 0.01  # GPTQ dampening, fraction of mean(diag H)
    # GPTQ: H + shrink * diag(H), correlations shrunk toward the diagonal; 0 = plain GPTQ. None: the
    # architecture's default (archs.GPTQ_DEFAULTS: 0.5, or 0 for `gptq` on Gemma 3), see resolve_defaults.
    shrink: float | None = None
    # GPTQ columns by descending diag(H), grids fitted on the original weights (static groups): on
    # SmolLM2 W4 g64 held-out KL 0.1057 -> 0.0837 in-domain, 0.190 -> 0.161 out of domain; on
    # Gemma-3-270M W4 g128 0.324 -> 0.236 / 0.459 -> 0.373 (BENCHMARKS.md). llm-compressor's default too.
    act_order: bool = True
    block_size: int = 128  # GPTQ lazy-batch width
    # GPTQ group grids: 0 = min-max; n > 0 = the best of n clip factors in [0.75, 1] per group,
    # errors weighted by diag(H) (grid.search_grid)
    grid_steps: int = 0
    # Calibration augmentation: this fraction of extra windows, each a token permutation of a
    # calibration window (data.shuffled_windows); 0 = the calibration windows only
    augment: float = 0.0
    beta: float = 0.0  # KLAWQ: H + beta * A
    tau: float = 1.0  # KLAWQ: softmax temperature (kl_source=layer)
    kl_source: str = "layer"  # layer | model
    # GPTQ's Hessian from tokens weighted by 1 / ms of the linear's FP output where an RMSNorm
    # normalizes that output (the arch table's ``normed``; other linears keep the plain Hessian).
    # None: the architecture's default (archs.GPTQ_DEFAULTS: on for `gptq` on Gemma 3).
    norm_tokens: bool | None = None
    # GPTQ/KLAWQ fit each linear to the FP model's output from the quantized model's inputs
    # (toolchain/algorithms/fp_target.py) when > 0, with this ridge (a fraction of mean diag H) on
    # that fit; 0 = off. The FP block runs beside the quantized one on its own FP activation stream
    # (one more forward per stage, twice the activations).
    # None: the architecture's default (archs.GPTQ_DEFAULTS: 1 for `gptq` on Gemma 3, else 0).
    fp_target: float | None = None
    rounding: str = "nearest"  # nearest | greedy (a refinement pass after the method)
    salience: str = "l1"  # AWQ: mean |x| (l1) or mean x^2 (l2)
    propagate: bool = True  # quantized block outputs feed the next block
    true_sequential: bool = True
    device: str = "cpu"
    micro_batch: int = 8
    seed: int = 0
    # Calibration activations between blocks: cpu (RAM), disk (files, one micro-batch in RAM at a
    # time) or auto (disk when a block's inputs + outputs exceed half the available RAM).
    activations: str = "auto"
    activations_dir: str | None = None  # where disk activations go [default: the system temp dir]
    threads: int | None = None  # torch.set_num_threads on CPU
    progress: bool = True
    # Processed blocks keep their fake-quantized linear weights (in the model's own dtype). False
    # drops them once quantized (the returned QuantizedWeights hold them): the host then never
    # holds more than the input model, which is what an export needs.
    keep_weights: bool = True


@dataclass
class EngineResult:
    quantized: dict[str, QuantizedWeight]
    seconds: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    layers: dict[str, dict] = field(default_factory=dict)  # per linear: damp, rel_err (on calibration)


class _Stop(Exception):
    """Raised inside a forward to stop it once the wanted inputs are recorded."""


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj, device, dtype=torch.float32):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device, dtype) for v in obj)
    return obj


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class InputStats:
    """Running input statistics of one linear (or of several linears fed by the same tensor)."""

    def __init__(self, k: int, device, hessian: bool = True, masked: bool = False, cross: bool = False):
        self.k = k
        self.n = 0
        self.c = torch.zeros(k, k, device=device) if cross else None  # Σ x_fp x_qᵀ (fp_target)
        self.abs_sum = torch.zeros(k, device=device, dtype=torch.float64)
        self.sq_sum = torch.zeros(k, device=device, dtype=torch.float64)
        self.h = torch.zeros(k, k, device=device) if hessian else None
        self.masked = masked  # greedy rounding: moments over non-outlier tokens
        self.m_n = 0
        self.m_sum = torch.zeros(k, device=device, dtype=torch.float64) if masked else None
        self.m_sq = torch.zeros(k, device=device, dtype=torch.float64) if masked else None

    def add(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.k).float()
        self.n += x.shape[0]
        self.abs_sum += x.abs().sum(0).double()
        self.sq_sum += x.pow(2).sum(0).double()
        if self.h is not None:
            for xc in x.split(CHUNK_ROWS):
                self.h.addmm_(xc.T, xc)
        if self.masked:
            norms = x.norm(dim=1)
            keep = norms <= 5.0 * norms.median()  # outlier (attention-sink-like) tokens out
            xk = x[keep]
            self.m_n += xk.shape[0]
            self.m_sum += xk.sum(0).double()
            self.m_sq += xk.pow(2).sum(0).double()
        return x

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    @property
    def mean_sq(self) -> torch.Tensor:
        return (self.sq_sum / max(self.n, 1)).float()

    def hessian(self) -> torch.Tensor:
        return self.h / max(self.n, 1)

    def add_cross(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        """Σ x_fp x_qᵀ over tokens; ``x_q`` as returned by :meth:`add` (same tokens, same order)."""
        x_fp = x_fp.reshape(-1, self.k).float()
        for xf, xq in zip(x_fp.split(CHUNK_ROWS), x_q.split(CHUNK_ROWS), strict=True):
            self.c.addmm_(xf.T, xq)

    def cross(self) -> torch.Tensor:
        return self.c / max(self.n, 1)


def _linear_weight(mod, conv1d: bool) -> torch.Tensor:
    """[out, in] view of a linear's weight (GPT-2's Conv1D stores [in, out])."""
    return mod.weight.data.T if conv1d else mod.weight.data


def _set_linear_weight(mod, w: torch.Tensor, conv1d: bool) -> None:
    mod.weight.data.copy_(w.T if conv1d else w)


def _bind_kwargs(sig: inspect.Signature, args, kwargs) -> tuple[torch.Tensor, dict]:
    bound = sig.bind_partial(*args, **kwargs)
    hidden, out = None, {}
    for i, (name, val) in enumerate(bound.arguments.items()):
        kind = sig.parameters[name].kind
        if i == 0:
            hidden = val
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(val)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise KlaqError("decoder block takes *args beyond the hidden states; cannot capture its inputs")
        else:
            out[name] = val
    for key in ("past_key_values", "past_key_value", "layer_past"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return hidden, out


def capture_inputs(model, layers, calib_ids: torch.Tensor, micro_batch: int, store=list):
    """(block-0 inputs as fp32 CPU micro-batches, per block: list of per-micro-batch kwargs).

    ``store``: makes the container of the micro-batches (a list, or an :class:`Activations`)."""
    n_layers = len(layers)
    first_inputs = store()
    kwargs: list[list[dict]] = [[] for _ in range(n_layers)]

    def make(i, layer):
        sig = inspect.signature(layer.forward)

        def record(*args, **kw):
            hidden, rest = _bind_kwargs(sig, args, kw)
            kwargs[i].append(rest)
            if i == 0:
                first_inputs.append(hidden.detach().float().cpu())
            if i == n_layers - 1:
                raise _Stop
            return hidden

        return record

    for i, layer in enumerate(layers):
        layer.forward = make(i, layer)
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for lo in range(0, calib_ids.shape[0], micro_batch):
                try:
                    model(input_ids=calib_ids[lo : lo + micro_batch].to(dev), use_cache=False)
                except _Stop:
                    pass
    finally:
        for layer in layers:
            del layer.forward
    return first_inputs, kwargs


class Replay:
    """Replays, per micro-batch, the outputs of sub-modules whose linears are all quantized.

    Within one block the inputs do not change between passes, so once every linear of a sub-module
    (the attention, say) is final its output on micro-batch ``j`` is too: later passes (the next
    stages, the output pass) take it from here instead of recomputing it.
    """

    def __init__(self, block):
        self.block = block
        self.outputs: dict[str, dict[int, object]] = {}
        self.batch = 0

    def install(self, prefixes) -> list:
        mods = []
        for p in prefixes:
            mod = self.block.get_submodule(p)
            store = self.outputs.setdefault(p, {})
            fwd = type(mod).forward

            def replay(*args, __mod=mod, __store=store, __fwd=fwd, **kw):
                if self.batch not in __store:
                    __store[self.batch] = __fwd(__mod, *args, **kw)
                return __store[self.batch]

            mod.forward = replay
            mods.append(mod)
        return mods

    @staticmethod
    def remove(mods) -> None:
        for mod in mods:
            del mod.forward


def run_block(block, inputs, kws: list[dict], device, replay: Replay | None = None, prefixes=(), store=list):
    outs = store()
    mods = replay.install(prefixes) if replay is not None else []
    try:
        with torch.no_grad():
            for j, (x, kw) in enumerate(zip(inputs, kws, strict=True)):
                if replay is not None:
                    replay.batch = j
                outs.append(block_output(block(x.to(device), **kw)).float().cpu())
    finally:
        Replay.remove(mods)
    return outs


def _awq_fn():
    try:
        from klaq.toolchain.algorithms.awq import awq_block
    except ImportError as exc:
        raise KlaqError(f"AWQ methods need toolchain/algorithms/awq.py (awq_block), which is not available: {exc}") \
            from None
    return awq_block


# With one capture per block, o_proj / down_proj would be fitted on inputs computed by the
# unquantized q/k/v / gate/up, which their own fits then move back toward the FP stream: likely the drift
# is corrected twice (not isolated). Measured: Gemma-3-270M W4 g128 (gptq:shrink=0:true_sequential=0:norm_tokens=1)
# pydoc 31.61 -> 38.18 ppl with --fp-target 1; with stages, W3 40.29 -> 34.80 (BENCHMARKS.md).
FP_TARGET_NEEDS_STAGES = ("--fp-target needs true-sequential stages (each linear captured after the linears "
                          "before it are quantized); it cannot be combined with true_sequential=False")


def _fp_linear_inputs(fp_block, names, x, kw) -> dict[str, torch.Tensor]:
    """The inputs of ``names`` when the FP block runs on ``x`` (stops once all have been seen)."""
    seen: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(module, args):
            seen[name] = args[0]
            if len(seen) == len(names):
                raise _Stop

        return hook

    handles = [fp_block.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    try:
        with torch.no_grad():
            fp_block(x, **kw)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _collect(block, names, inputs, kws, cfg: EngineConfig, arch: QuantArch, need_h: bool, fisher, block_idx: int,
             early_exit: bool, replay: Replay | None = None, prefixes=(), fp_block=None, fp_inputs=None):
    """Run the block over all micro-batches, accumulating input statistics of ``names`` (and, with
    ``fp_block``, their cross moments with the FP block's inputs on ``fp_inputs``)."""
    dev = torch.device(cfg.device)
    mods = {n: block.get_submodule(n) for n in names}
    stats: dict[str, InputStats] = {}
    kl: dict[str, torch.Tensor] = {}
    want_kl = cfg.method.endswith("klawq") and cfg.beta != 0
    # linear -> the width its output norm normalizes (a head or the whole row)
    norm_width = {lin: block.get_submodule(norm).weight.shape[0] for lin, norm in arch.normed
                  if lin in mods} if cfg.norm_tokens else {}
    state = {"batch": 0, "fired": set(), "last": None, "fp": None}

    def make(name):
        mod = mods[name]

        def hook(module, args):
            x = args[0]
            last = state["last"]
            if last is not None and last[0] is x:
                st, x2 = last[1], last[2]
            else:
                st = stats.get(name)
                if st is None:
                    st = InputStats(x.shape[-1], dev, hessian=need_h, masked=cfg.rounding == "greedy",
                                    cross=state["fp"] is not None)
                x2 = st.add(x)
                if state["fp"] is not None:
                    st.add_cross(state["fp"][name], x2)
                state["last"] = (x, st, x2)
            stats[name] = st
            k = None  # per-token weights of a second, re-weighted Hessian
            if want_kl and cfg.kl_source == "model":
                b = state["batch"]
                k = fisher[f"{block_idx}.{name}"][b * cfg.micro_batch : b * cfg.micro_batch + x.shape[0]]
                k = k.reshape(-1).to(dev)
            elif want_kl:
                k = layer_token_weights(x2, mod.weight.data, cfg.tau, conv1d=arch.conv1d)
            elif name in norm_width:
                k = norm_token_weights(x2, mod.weight.data, norm_width[name])
            if k is not None:
                if name not in kl:
                    kl[name] = torch.zeros(x2.shape[1], x2.shape[1], device=dev)
                add_weighted_outer(kl[name], x2, k)
            state["fired"].add(name)
            if early_exit and len(state["fired"]) == len(names):
                raise _Stop

        return hook

    handles = [mods[n].register_forward_pre_hook(make(n)) for n in names]
    replayed = replay.install(prefixes) if replay is not None else []
    try:
        with torch.no_grad():
            for j, (x, kw) in enumerate(zip(inputs, kws, strict=True)):
                fp = None if fp_block is None else _fp_linear_inputs(fp_block, names, fp_inputs[j].to(dev), kw)
                state.update(batch=j, fired=set(), last=None, fp=fp)
                if replay is not None:
                    replay.batch = j
                try:
                    block(x.to(dev), **kw)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        Replay.remove(replayed)
    missing = [n for n in names if n not in stats]
    if missing:
        raise KlaqError(f"linears {missing} never ran during calibration; check the architecture table")
    return stats, kl


def _quantize_linear(w: torch.Tensor, st: InputStats | None, a: torch.Tensor | None, cfg: EngineConfig):
    spec = cfg.spec
    info: dict = {}
    if cfg.method.endswith(("gptq", "klawq")):
        h = st.hessian()
        # fp_target: GPTQ rounds the best unquantized weight for the quantized inputs instead
        target = w if st.c is None else fp_target_weight(w, h, st.cross(), cfg.fp_target)
        if a is not None:
            a = a / max(st.n, 1)
        if cfg.norm_tokens and a is not None:  # norm-weighted tokens replace the plain Hessian
            htot = a
        else:
            htot = klawq_hessian(h, a, cfg.beta if cfg.method.endswith("klawq") else 0.0)
        qw, deq, ginfo = gptq_quantize(target, htot, spec, damp=cfg.damp, act_order=cfg.act_order,
                                       block_size=cfg.block_size, shrink=cfg.shrink, grid_steps=cfg.grid_steps)
        info.update(damp=ginfo.damp, dead=ginfo.dead, fallback=ginfo.fallback)
    else:
        scale, zero = fit_grid(w, spec)
        codes = quantize_codes(w, scale, zero, spec)
        qw, deq = to_qweight(codes, scale, zero, spec), dequantize_codes(codes, scale, zero, spec)
    if cfg.rounding == "greedy":
        from klaq.toolchain.algorithms.greedy import greedy_refine

        qw, deq, ginfo = greedy_refine(w, qw, st, spec)
        info.update(greedy_flips=ginfo["flips"])
    if st is not None and st.h is not None:
        d = (w.float() - deq)
        h = st.hessian()
        num = float((d @ h * d).sum())
        den = float((w.float() @ h * w.float()).sum())
        info["rel_err"] = num / den if den > 0 else 0.0
    return qw, deq, info


def _offload(block, dtypes: dict, quantized: set, keep: bool) -> None:
    """A processed block back to the CPU: quantized linear weights in their original dtype, or
    dropped (``keep=False``); everything else (norms, biases: small) stays fp32 for AWQ's folds."""
    for name, p in block.named_parameters():
        if name in quantized:
            p.data = p.data.to("cpu", dtypes[name]) if keep else torch.empty(0, dtype=dtypes[name])
    block.to("cpu")


def needs_full_model(cfg: EngineConfig) -> bool:
    """KLAWQ with model-level Fisher weights runs the whole model forward and backward before the
    block loop, so it cannot work block by block from disk."""
    return cfg.method.endswith("klawq") and cfg.beta != 0 and cfg.kl_source == "model"


def check_engine_config(cfg: EngineConfig) -> None:
    """Refuse option combinations the engine cannot honour, with the flag to change.

    Called by :func:`quantize_blocks` and, before the model loads, by ``export_model``: the one
    place these rules live.
    """
    if cfg.method not in ENGINE_METHODS:
        raise KlaqError(f"unknown method {cfg.method!r}; available: {', '.join(ENGINE_METHODS)}")
    if cfg.rounding not in ROUNDINGS:
        raise KlaqError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {cfg.rounding!r}")
    if cfg.kl_source not in KL_SOURCES:
        raise KlaqError(f"--kl-source must be one of {', '.join(KL_SOURCES)}, got {cfg.kl_source!r}")
    if cfg.beta < 0 or cfg.tau <= 0 or cfg.damp < 0 or (cfg.shrink or 0) < 0 or cfg.augment < 0 or (cfg.fp_target or 0) < 0:
        raise KlaqError("need --beta >= 0, --tau > 0, --damp >= 0, --hessian-shrink >= 0, --fp-target >= 0 "
                        "and augment >= 0")
    if cfg.fp_target and not cfg.method.endswith(("gptq", "klawq")):
        raise KlaqError(f"--fp-target changes what GPTQ/KLAWQ fit; method {cfg.method!r} has no such fit")
    if cfg.fp_target and not cfg.true_sequential:
        raise KlaqError(FP_TARGET_NEEDS_STAGES)
    if cfg.norm_tokens and cfg.method.endswith("klawq") and cfg.beta != 0:
        raise KlaqError("norm-weighted tokens (--norm-tokens) replace the Hessian KLAWQ adds to; use one or the other")


def resolve_defaults(cfg: EngineConfig, model_type: str) -> EngineConfig:
    """``cfg`` with the options left at None set to ``model_type``'s defaults (archs.gptq_defaults).

    The FP-output fit needs true-sequential stages, so without them its default is off (an explicit
    ``fp_target`` there is refused by check_engine_config)."""
    defaults = gptq_defaults(cfg.method, model_type)
    if not cfg.true_sequential:
        defaults["fp_target"] = 0.0
    return replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def quantize_blocks(model, calib_ids: torch.Tensor, cfg: EngineConfig) -> EngineResult:
    """Quantize every decoder linear of ``model`` with ``cfg.method`` on ``calib_ids`` [n, T].

    Returns ``{state-dict weight name: QuantizedWeight}`` plus time and peak memory. The model is
    changed in place: processed blocks end up on the CPU with fake-quantized linear weights in the
    model's dtype (exact when that is fp32; dropped with ``keep_weights=False``) and fp32 norms and
    biases (with AWQ's folded scales): with the QuantizedWeights, the quantized model.
    """
    check_engine_config(cfg)
    arch = get_quant_arch(model.config.model_type)
    cfg = resolve_defaults(cfg, model.config.model_type)
    if cfg.augment:
        calib_ids = shuffled_windows(np.asarray(calib_ids), cfg.augment, cfg.seed)
    calib_ids = torch.as_tensor(calib_ids, dtype=torch.long)
    where = choose_where(cfg.activations, calib_ids.numel(), model.config.get_text_config().hidden_size,
                         streams=2 if cfg.fp_target else 1)
    awq_block = _awq_fn() if cfg.method.startswith("awq") else None
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise KlaqError(f"--device {cfg.device} requested but no CUDA device is available")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    layers = model.get_submodule(arch.layers)
    lazy = lazy_weights(model)
    fisher = None
    if needs_full_model(cfg):
        if lazy is not None:
            raise KlaqError("--kl-source model runs the whole model forward and backward; it needs the model "
                            "fully loaded, not lazily (klaq-export --no-lazy)")
        names = {i: [n for st in arch.stages for n in st] for i in range(len(layers))}
        fisher = model_fisher_weights(model, layers, names, calib_ids, cfg.micro_batch, cfg.seed, arch.conv1d,
                                      progress=cfg.progress)

    def store():
        return Activations(where, cfg.activations_dir)

    inputs, kwargs = capture_inputs(model, layers, calib_ids, cfg.micro_batch, store)
    need_stats = cfg.method.endswith(("gptq", "klawq")) or cfg.rounding == "greedy"
    need_h = need_stats
    fp_inputs = inputs if cfg.fp_target else None  # the FP model's activations (one stream until block 0 ends)
    quantized: dict[str, QuantizedWeight] = {}
    per_linear: dict[str, dict] = {}
    bar = tqdm(range(len(layers)), desc=f"{cfg.method} W{cfg.spec.bits}", unit="block", disable=not cfg.progress)
    for bi in bar:
        block = layers[bi]
        if lazy is not None:  # its weights come from disk only now
            bar.set_postfix_str("load")
            lazy.load_module(block, f"{arch.layers}.{bi}.")
        dtypes = {n: p.dtype for n, p in block.named_parameters()}
        block.to(device=dev, dtype=torch.float32)
        kws = [_to(kw, dev) for kw in kwargs[bi]]
        fp_out = None if cfg.propagate else run_block(block, inputs, kws, dev, store=store)
        if awq_block is not None:
            bar.set_postfix_str("awq")
            awq_block(block, inputs, kws, arch, cfg.spec, cfg)
        fp_block = copy.deepcopy(block) if fp_inputs is not None else None  # after AWQ's function-keeping folds
        all_names = [n for st in arch.stages for n in st]
        if not need_stats:
            stages = [all_names]
        elif cfg.true_sequential:
            stages = [list(s) for s in arch.stages]
        else:
            stages = [all_names]
        # sub-modules (attention, MLP) whose linears are all final replay their outputs
        final_after: dict[str, int] = {}
        for si, stage in enumerate(stages):
            for name in stage:
                if "." in name:
                    final_after[name.rsplit(".", 1)[0]] = si
        replay = Replay(block)
        for si, stage in enumerate(stages):
            stats, kl = {}, {}
            if need_stats:
                bar.set_postfix_str(f"stage {si + 1}/{len(stages)}")
                done = [p for p, last in final_after.items() if last < si]
                stats, kl = _collect(block, stage, inputs, kws, cfg, arch, need_h, fisher, bi,
                                     early_exit=cfg.true_sequential, replay=replay, prefixes=done,
                                     fp_block=fp_block, fp_inputs=fp_inputs)
            for name in stage:
                mod = block.get_submodule(name)
                w = _linear_weight(mod, arch.conv1d).float()
                qw, deq, info = _quantize_linear(w, stats.get(name), kl.get(name), cfg)
                _set_linear_weight(mod, deq.to(mod.weight.dtype), arch.conv1d)
                key = f"{arch.layers}.{bi}.{name}"
                quantized[f"{key}.weight"] = qw
                per_linear[key] = info
            stats = kl = None
        bar.set_postfix_str("outputs")
        outputs = fp_out if fp_out is not None else run_block(block, inputs, kws, dev, replay, list(final_after),
                                                              store=store)
        if fp_block is not None:
            fp_outputs = outputs if fp_out is not None else run_block(fp_block, fp_inputs, kws, dev, store=store)
            if fp_inputs is not inputs:
                fp_inputs.close()
            fp_inputs = fp_outputs
            del fp_block
        inputs.close()
        inputs = outputs
        _offload(block, dtypes, {f"{n}.weight" for n in all_names}, cfg.keep_weights)
        del kws, replay
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    if fp_inputs is not None and fp_inputs is not inputs:
        fp_inputs.close()
    inputs.close()
    peak_gpu = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return EngineResult(quantized, time.perf_counter() - t0, peak_rss_mb(), peak_gpu, per_linear)
