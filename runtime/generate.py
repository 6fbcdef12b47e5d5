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
    achieved_gbs: float  # weight bytes streamed per decode step / step time
    text: str

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        return (
            f"load {self.load_s:.2f} s | prompt {self.prompt_tokens} tok | TTFT {self.ttft_s * 1e3:.0f} ms | "
            f"prefill {self.prefill_tok_s:.1f} tok/s | decode {self.decode_tok_s:.2f} tok/s "
            f"({self.new_tokens} tok) | {self.achieved_gbs:.2f} GB/s of weights | "
            f"peak RSS {self.peak_rss_mb:.0f} MB | weights {self.weight_bytes / 2**20:.1f} MiB"
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
) -> RunReport:
    tok, model = pkg.tokenizer, pkg.model
    ids = tok.encode(prompt)
    if not ids:
        ids = [tok.facts.bos_id if tok.facts.bos_id is not None else 0]
    rng = np.random.default_rng(seed)
    cache = model.new_cache(len(ids) + max_new_tokens)
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
    wbytes = pkg.file.weight_bytes
    return RunReport(
        prompt_tokens=len(ids), new_tokens=len(out), load_s=pkg.load_s, ttft_s=ttft,
        prefill_tok_s=len(ids) / ttft if ttft > 0 else 0.0, decode_tok_s=decode_tps,
        peak_rss_mb=peak_rss_mb(), weight_bytes=wbytes, achieved_gbs=wbytes * decode_tps / 1e9,
        text=final,
    )
