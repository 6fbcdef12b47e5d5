"""klaq-export: load a model, quantize its decoder linears, write a package, check it fits."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from klaq import __version__
from klaq.errors import KlaqError
from klaq.formats.arch import get_package_arch
from klaq.formats.gguf_package import HParams, Package, write_package
from klaq.formats.tokenizer import TokenizerFacts
from klaq.targets.fit import check_fit, kv_cache_bytes
from klaq.targets.profiles import get_target
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.models import LoadedModel, load_model
from klaq.toolchain.quantize import METHODS, check_spec, quantize_model

FORMATS = ("gguf",)


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


@dataclass
class ExportResult:
    path: str
    bytes: int
    n_quantized: int
    seconds: float
    bits_per_weight: float
    meta: dict


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
        if tensors[name] is None:
            tensors[name] = p.detach().float().cpu().numpy()
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
    lm = load_model(cfg.model)
    get_package_arch(lm.model.config.model_type)
    quantized = quantize_model(lm.model, cfg.method, spec, progress=progress)
    calib_hash = hashlib.sha256(f"{cfg.calib}:{cfg.n_calib}:{cfg.seqlen}:{cfg.seed}".encode()).hexdigest()[:16]
    meta = {
        "version": __version__, "method": cfg.method, "target": target.name, "source": cfg.model,
        "bits": 16 if cfg.method == "fp16" else spec.bits,
        "group_size": 0 if cfg.method == "fp16" else spec.group_size,
        "sym": bool(spec.sym),
        "calibration": "none" if cfg.method in ("rtn", "fp16") else f"{cfg.calib}:{cfg.n_calib}x{cfg.seqlen}:seed{cfg.seed}",
        "calibration_hash": "none" if cfg.method in ("rtn", "fp16") else calib_hash,
    }
    pkg = build_package(lm, quantized, meta)
    hp = pkg.hparams
    weight_bytes = sum(v.nbytes_packed() if hasattr(v, "nbytes_packed") else np.asarray(v).size * 2
                       for v in pkg.tensors.values())
    check_fit(target, weight_bytes, kv_cache_bytes(hp.n_layers, hp.n_kv_heads, hp.head_dim, cfg.context))
    size = write_package(pkg, cfg.output)
    n_q = len(quantized)
    bpw = (sum(q.nbytes_packed() for q in quantized.values()) * 8 / sum(q.codes.size for q in quantized.values())
           if quantized else 16.0)
    return ExportResult(cfg.output, size, n_q, time.perf_counter() - t0, bpw, meta)
