"""klaq-export: load a model, quantize its decoder linears, write a package, check it fits.

The model is loaded lazily where it can be (:mod:`klaq.toolchain.lazy`: safetensors on disk, the
decoder blocks read one at a time by the engine, the reference perplexity and the package
builder), so the host never holds the whole input model; ``ExportConfig.lazy=False`` (``--no-lazy``)
loads it whole first.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klaq import __version__
from klaq.errors import KlaqError
from klaq.formats.arch import get_package_arch
from klaq.formats.gguf_package import HParams, Package, write_package
from klaq.formats.tokenizer import TokenizerFacts
from klaq.targets.fit import check_fit, kv_cache_bytes
from klaq.targets.profiles import get_target
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.data import calibration_windows, token_split
from klaq.toolchain.engine import (
    EngineConfig,
    check_engine_config,
    needs_full_model,
    peak_rss_mb,
    resolve_defaults,
)
from klaq.toolchain.lazy import lazy_weights, materialized, streamed
from klaq.toolchain.models import LoadedModel, load_model
from klaq.toolchain.quantize import METHODS, check_spec, needs_calibration, quantize_model_ex

FORMATS = ("gguf", "onnx", "gguf,onnx")  # both: OUT/model.gguf and OUT/onnx/


@dataclass
class ExportConfig:
    model: str
    output: str
    target: str = "x86-cpu"
    method: str = "rtn"
    bits: int | None = None  # None: the target's default
    group_size: int | None = None
    sym: bool | None = None
    format: str = "gguf"
    calib: str = "pydoc"
    n_calib: int = 128
    seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    context: int = 2048  # for the fit check's KV cache
    quantize_head: int = 0  # ONNX: 0 (fp16 head), 4 or 8 bits
    accuracy_level: int = 4  # ONNX MatMulNBits: 4 = int8 activations (fast on CPU), 0 = fp32
    reference_windows: int = 8  # FP16 perplexity recorded in the package (0 = skip)
    # calibrated methods (see toolchain/engine.py)
    damp: float = 0.01
    shrink: float | None = None  # None: the architecture's default (archs.GPTQ_DEFAULTS)
    act_order: bool = True
    beta: float = 0.0
    tau: float = 1.0
    kl_source: str = "layer"
    norm_tokens: bool | None = None  # GPTQ Hessians of output-normalized linears weighted by 1 / ms; None: arch default
    fp_target: float | None = None  # > 0: GPTQ/KLAWQ fit the FP model's outputs from quantized inputs, this ridge; None: arch default
    rounding: str = "nearest"
    salience: str = "l1"
    propagate: bool = True
    true_sequential: bool = True
    micro_batch: int = 8
    activations: str = "auto"  # calibration activations: auto | cpu | disk
    threads: int | None = None
    # Read the decoder blocks from the model's safetensors one at a time (toolchain/lazy.py) where
    # that applies; False loads the whole model first (the only way for klawq --kl-source model).
    lazy: bool = True


@dataclass
class ExportResult:
    path: str
    bytes: int
    n_quantized: int
    seconds: float
    bits_per_weight: float
    meta: dict
    quant_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None
    lazy: bool = False  # whether the blocks were read from disk one at a time


def hparams_from_config(cfg, model_type: str) -> HParams:
    arch = get_package_arch(model_type).gguf_arch
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:  # Gemma 3: per layer type; global here
        rope = rope["full_attention"]
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return HParams(
        arch=arch, n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
        n_heads=cfg.num_attention_heads, n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim, rope_theta=float(theta or getattr(cfg, "rope_theta", 10000.0)),
        rms_eps=float(cfg.rms_norm_eps), context_length=int(cfg.max_position_embeddings),
        vocab_size=int(cfg.vocab_size),
        sliding_window=int(getattr(cfg, "sliding_window", None) or 0) if arch == "gemma3" else 0,
    )


def _tokenizer_facts(lm: LoadedModel) -> TokenizerFacts:
    if lm.tokenizer_fields:
        return TokenizerFacts.from_gguf_fields(lm.tokenizer_fields)
    return TokenizerFacts.from_hf(lm.tokenizer)


def build_package(lm: LoadedModel, quantized: dict, meta: dict) -> Package:
    model = lm.model
    cfg = model.config
    model_type = cfg.model_type
    get_package_arch(model_type)  # unsupported architectures fail before any work
    tensors: dict = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        if "rotary_emb" in name:
            continue
        tensors[name] = quantized.get(name)
        if tensors[name] is None:  # a lazy model's unquantized block tensors come from disk here
            tensors[name] = materialized(model, name, p).detach().float().cpu().numpy()
    return Package(model_type, hparams_from_config(cfg, model_type), tensors, _tokenizer_facts(lm), meta,
                   name=str(getattr(cfg, "_name_or_path", "") or lm.name))


def export_model(cfg: ExportConfig, progress: bool = True) -> ExportResult:
    if cfg.format not in FORMATS:
        raise KlaqError(f"unknown format {cfg.format!r}; available: {', '.join(FORMATS)}")
    if cfg.method not in METHODS:
        raise KlaqError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
    target = get_target(cfg.target)
    spec = QuantSpec(
        bits=cfg.bits if cfg.bits is not None else target.default_bits,
        group_size=cfg.group_size if cfg.group_size is not None else target.default_group_size,
        sym=cfg.sym if cfg.sym is not None else target.default_sym,
    )
    if cfg.method != "fp16":
        check_spec(spec)
    if cfg.device != "cpu":
        import torch

        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise KlaqError(f"--device {cfg.device} requested but no CUDA device is available")
    t0 = time.perf_counter()
    engine = EngineConfig(method=cfg.method, damp=cfg.damp, shrink=cfg.shrink, act_order=cfg.act_order, beta=cfg.beta, tau=cfg.tau, kl_source=cfg.kl_source,
                          norm_tokens=cfg.norm_tokens, fp_target=cfg.fp_target, rounding=cfg.rounding, salience=cfg.salience, propagate=cfg.propagate,
                          true_sequential=cfg.true_sequential, device=cfg.device, micro_batch=cfg.micro_batch,
                          seed=cfg.seed, threads=cfg.threads, keep_weights=False,
                          activations=cfg.activations)
    if cfg.method != "fp16":
        check_engine_config(engine)  # option errors before the model loads
    lm = load_model(cfg.model, lazy=cfg.lazy and not needs_full_model(engine))
    get_package_arch(lm.model.config.model_type)
    engine = resolve_defaults(engine, lm.model.config.model_type)
    ref_ppl = None
    if cfg.reference_windows > 0:  # before quantization: AWQ folds scales into the model in place
        from klaq.formats.tokenizer import PackageTokenizer
        from klaq.toolchain.verify import reference_perplexity

        tok = PackageTokenizer(_tokenizer_facts(lm))
        with streamed(lm.model):  # a lazy model: one block at a time, each read from disk once
            ref_ppl = reference_perplexity(lm.model, tok.encode, "pydoc", 512, cfg.reference_windows)
    calibrated = cfg.method != "fp16" and needs_calibration(cfg.method, cfg.rounding)
    calib_ids, calib_hash = None, "none"
    if calibrated:
        calib_ids = calibration_ids(lm, cfg)
        calib_hash = hashlib.sha256(np.ascontiguousarray(calib_ids).tobytes()).hexdigest()[:16]
    tq = time.perf_counter()
    quantized, eres = quantize_model_ex(lm.model, cfg.method, spec, progress=progress, calib_ids=calib_ids,
                                        engine=engine)
    quant_seconds = time.perf_counter() - tq
    meta = {
        "version": __version__, "method": cfg.method, "target": target.name, "source": cfg.model,
        "bits": 16 if cfg.method == "fp16" else spec.bits,
        "group_size": 0 if cfg.method == "fp16" else spec.group_size,
        "sym": bool(spec.sym),
        "calibration": f"{cfg.calib}:{cfg.n_calib}x{cfg.seqlen}:seed{cfg.seed}" if calibrated else "none",
        "calibration_hash": calib_hash,
    }
    if calibrated:
        meta["method_options"] = method_options(engine)
    if ref_ppl is not None:
        meta["reference_ppl"] = ref_ppl
        meta["reference_ppl_protocol"] = f"pydoc:eval:ctx512:windows{cfg.reference_windows}"
    pkg = build_package(lm, quantized, meta)
    hp = pkg.hparams
    weight_bytes = sum(v.nbytes_packed() if hasattr(v, "nbytes_packed") else np.asarray(v).size * 2
                       for v in pkg.tensors.values())
    check_fit(target, weight_bytes, kv_cache_bytes(hp.n_layers, hp.n_kv_heads, hp.head_dim, cfg.context))
    size = write_outputs(pkg, cfg)
    n_q = len(quantized)
    bpw = (sum(q.nbytes_packed() for q in quantized.values()) * 8 / sum(q.codes.size for q in quantized.values())
           if quantized else 16.0)
    return ExportResult(cfg.output, size, n_q, time.perf_counter() - t0, bpw, meta, quant_seconds=quant_seconds,
                        peak_rss_mb=peak_rss_mb(), peak_gpu_mb=eres.peak_gpu_mb if eres is not None else None,
                        lazy=lazy_weights(lm.model) is not None)


def calibration_ids(lm: LoadedModel, cfg: ExportConfig) -> np.ndarray:
    """``n_calib`` seeded windows of ``seqlen`` tokens from the calibration part of ``cfg.calib``."""

    def encode(text: str) -> list[int]:
        return lm.tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = token_split(cfg.calib, encode, "calib")
    return calibration_windows(ids, cfg.n_calib, cfg.seqlen, cfg.seed)


def method_options(engine: EngineConfig) -> str:
    """The options that change a calibrated method's result, as one short string for the manifest.
    ``engine`` is the engine's config after ``resolve_defaults``: one source, so the manifest records
    exactly what the engine ran with (the architecture's defaults included)."""
    parts = [f"rounding={engine.rounding}", f"propagate={int(engine.propagate)}",
             f"true_sequential={int(engine.true_sequential)}"]
    if "gptq" in engine.method or "klawq" in engine.method:
        parts += [f"damp={engine.damp:g}", f"act_order={int(engine.act_order)}", f"shrink={engine.shrink:g}"]
        if engine.norm_tokens:
            parts.append("norm_tokens=1")
        if engine.fp_target:
            parts.append(f"fp_target={engine.fp_target:g}")
    if "klawq" in engine.method:
        parts += [f"beta={engine.beta:g}", f"tau={engine.tau:g}", f"kl_source={engine.kl_source}"]
    if engine.method.startswith("awq"):
        parts.append(f"salience={engine.salience}")
    return ",".join(parts)


def write_outputs(pkg: Package, cfg: ExportConfig) -> int:
    """Write the package in the asked format(s); returns the bytes written."""
    if cfg.format == "gguf":
        return write_package(pkg, cfg.output)
    from klaq.formats.onnx_package import write_onnx_package

    out = Path(cfg.output)
    onnx_dir = out / "onnx" if cfg.format == "gguf,onnx" else out
    if cfg.format == "gguf,onnx" and out.exists() and not out.is_dir():
        raise KlaqError(f"{out} exists and is not a directory; --format gguf,onnx writes a directory")
    manifest = write_onnx_package(pkg, onnx_dir, quantize_head=cfg.quantize_head, accuracy_level=cfg.accuracy_level)
    size = sum(f["bytes"] for f in manifest["files"].values())
    if cfg.format == "gguf,onnx":
        size += write_package(pkg, out / "model.gguf")
    return size
