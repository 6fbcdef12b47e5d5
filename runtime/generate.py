"""Prefill + incremental decode with greedy or top-p sampling, streaming, and a timing report."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from klaq.runtime.package import LoadedPackage


@dataclass
class RunReport:
    prompt_tokens: int
    new_tokens: int
    load_s: float
    ttft_s: float  # prompt in -> first new token out
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float
    weight_bytes: int
    achieved_gbs: float  # bytes streamed per decode step (weights + KV) / step time
    text: str
    device: str = "cpu"
    backend: str = "numpy"
    bytes_per_step: int = 0
    target: str | None = None
    bandwidth_fraction: float | None = None  # achieved_gbs / the target's memory bandwidth
    decode_matmul_s: float | None = None  # decode time in the quantized matmuls (CUDA graph path)
    decode_rest_s: float | None = None
    pdl: bool | None = None  # the GPU kernels launch with programmatic dependent launch (kernels/pdl.py)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        bw = f"{self.achieved_gbs:.2f} GB/s"
        if self.bandwidth_fraction is not None:
            bw += f" ({self.bandwidth_fraction * 100:.1f}% of {self.target})"
        split = ""
        if self.decode_matmul_s is not None:
            split = f" | decode time: matmul {self.decode_matmul_s:.3f} s, rest {self.decode_rest_s:.3f} s"
        if self.pdl is not None:
            split += f" | PDL {'on' if self.pdl else 'off'}"
        return (
            f"{self.backend}/{self.device} | load {self.load_s:.2f} s | prompt {self.prompt_tokens} tok | "
            f"TTFT {self.ttft_s * 1e3:.0f} ms | prefill {self.prefill_tok_s:.1f} tok/s | "
            f"decode {self.decode_tok_s:.2f} tok/s ({self.new_tokens} tok) | {bw} | "
            f"peak RSS {self.peak_rss_mb:.0f} MB | weights {self.weight_bytes / 2**20:.1f} MiB{split}"
        )


def peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024 if sys.platform != "darwin" else usage / 2**20


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> int:
    """Greedy when temperature is 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, top_p)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def generate(
    pkg: LoadedPackage,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 0.9,
    seed: int = 0,
    stream: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
    target: str | None = None,
) -> RunReport:
    tok, model = pkg.tokenizer, pkg.model
    ids = tok.encode(prompt)
    if not ids:
        ids = [tok.facts.bos_id if tok.facts.bos_id is not None else 0]
    rng = np.random.default_rng(seed)
    split = getattr(model, "decode_split", None)
    cache = model.new_cache(len(ids) + max_new_tokens + (32 if split else 0))
    t0 = time.perf_counter()
    logits = model.forward(ids, cache)
    out: list[int] = []
    nxt = sample(logits[-1], rng, temperature, top_p)
    ttft = time.perf_counter() - t0
    printed = ""
    t1 = time.perf_counter()
    while True:
        out.append(nxt)
        if stream is not None:
            text = tok.decode(out)
            if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                stream(text[len(printed):])
                printed = text
        if len(out) >= max_new_tokens or (stop_at_eos and nxt == tok.eos_id):
            break
        logits = model.forward([nxt], cache)
        nxt = sample(logits[-1], rng, temperature, top_p)
    decode_s = time.perf_counter() - t1
    final = tok.decode(out)
    if stream is not None and final != printed:  # flush an incomplete trailing character
        stream(final[len(printed):] if final.startswith(printed) else final)
    steps = max(len(out) - 1, 0)  # forward passes after the prefill
    decode_tps = steps / decode_s if steps and decode_s > 0 else 0.0
    bytes_per_step = _bytes_per_step(pkg, len(ids) + len(out) // 2)
    gbs = bytes_per_step * decode_tps / 1e9
    target = target or str(pkg.file.meta.get("target", "")) or None
    fraction = None
    if target:
        from klaq.targets.profiles import TARGETS

        fraction = gbs / TARGETS[target].bandwidth_gbs if target in TARGETS else None
    matmul_s = rest_s = None
    if split is not None and getattr(model, "cuda_graphs", False) and steps:
        s = split(cache, iters=50)
        matmul_s = decode_s * s.matmul_s / s.step_s
        rest_s = decode_s - matmul_s
    return RunReport(
        prompt_tokens=len(ids), new_tokens=len(out), load_s=pkg.load_s, ttft_s=ttft,
        prefill_tok_s=len(ids) / ttft if ttft > 0 else 0.0, decode_tok_s=decode_tps,
        peak_rss_mb=peak_rss_mb(), weight_bytes=pkg.file.weight_bytes, achieved_gbs=gbs, text=final,
        device=pkg.device, backend=pkg.backend, bytes_per_step=bytes_per_step, target=target,
        bandwidth_fraction=fraction, decode_matmul_s=matmul_s, decode_rest_s=rest_s,
        pdl=model.uses_pdl if str(pkg.device).startswith("cuda") and hasattr(model, "uses_pdl") else None,
    )


def _bytes_per_step(pkg: LoadedPackage, context: int) -> int:
    """What one decode step must read: the model's own count where it has one, else every weight
    tensor but the embedding table (one row is read) plus the KV cache at ``context``."""
    model = pkg.model
    if hasattr(model, "weight_bytes_per_step"):
        return model.weight_bytes_per_step() + model.kv_bytes_per_step(context)
    tensors = pkg.file.tensors
    emb = tensors["token_embd.weight"].nbytes if "output.weight" in tensors else 0
    hp = pkg.file.hparams
    kv = 2 * hp.n_layers * hp.n_kv_heads * hp.head_dim * context * 4  # float32 cache
    return pkg.file.weight_bytes - emb + kv
