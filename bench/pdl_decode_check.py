"""Does programmatic dependent launch change what the CUDA-graph decode step computes, and how fast
is it? (H100/H200)

    python bench/pdl_decode_check.py [--new-tokens 256] [--modes "off,all,fused ops only"]

Builds the random-weight SmolLM2-shaped package of bench/gpu_decode.py, prefills one prompt once,
and from copies of that KV cache decodes greedily with PDL off (twice: is the step deterministic
at all?), on for everything (``KLAQ_PDL=1``), on for the GEMVs only, for the fused ops only, and
for everything with the GEMVs' first words loaded before the wait. For each: tokens/s (best of
two timed runs), whether the tokens equal the first run's and where they first differ; then,
teacher-forced on the first run's tokens one step at a time (``decode_step``: the host reads the
logits between replays), how many steps' logits differ and by how much, which separates a race
inside a step from one between back-to-back replays.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_decode import build_random_package, first_difference  # noqa: E402

MODES = {  # name: (KLAQ_PDL, M = 1 launch overrides of the GEMVs)
    "off": ("0", None), "off again": ("0", None), "all": ("1", None),
    "GEMVs only": ("0", dict(pdl=True)), "fused ops only": ("1", dict(pdl=False)),
    "all + early words": ("1", dict(pdl=True, early=True)),
}


class Prefilled:
    """One model and one prefilled KV cache, copied for each run."""

    def __init__(self, pf, prompt: list[int], new: int):
        from klaq.runtime.torch_model import TorchDecoder

        self.model = TorchDecoder(pf, "cuda", backend="triton")
        self.max_len = len(prompt) + new + 1
        cache = self.model.new_cache(self.max_len)
        self.first = int(np.argmax(self.model.forward(prompt, cache)[-1]))
        self.k, self.v, self.length = cache.k.clone(), cache.v.clone(), cache.length

    def cache(self, env: str, cfg):
        os.environ["KLAQ_PDL"] = env  # read when the cache's graph is captured
        self.model.set_decode_config(cfg)
        c = self.model.new_cache(self.max_len)
        c.k.copy_(self.k)
        c.v.copy_(self.v)
        c.length = self.length
        self.model._graph(c)
        return c

    def greedy(self, env: str, cfg, new: int) -> tuple[list[int], float]:
        best, toks = 0.0, None
        for _ in range(2):
            c = self.cache(env, cfg)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            toks = self.model.greedy_decode(self.first, new, c)
            torch.cuda.synchronize()
            best = max(best, new / (time.perf_counter() - t0))
        return toks, best

    def teacher(self, env: str, cfg, tokens: list[int]) -> list[np.ndarray]:
        c = self.cache(env, cfg)
        return [self.model.decode_step(t, c) for t in [self.first] + tokens[:-1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    args = ap.parse_args()
    from klaq.formats.gguf_package import read_package

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    path = os.path.join(tempfile.mkdtemp(), "random-smollm2.gguf")
    build_random_package(path)
    pf = read_package(path)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, pf.hparams.vocab_size, 16)]
    run = Prefilled(pf, prompt, args.new_tokens)
    ref, _ = run.greedy("0", None, args.new_tokens)
    ref_logits = run.teacher("0", None, ref)
    for name in args.modes.split(","):
        env, cfg = MODES[name]
        toks, tok_s = run.greedy(env, cfg, args.new_tokens)
        diff = first_difference(toks, ref)
        logits = run.teacher(env, cfg, ref)
        bad = [i for i, (a, b) in enumerate(zip(logits, ref_logits, strict=True)) if not np.array_equal(a, b)]
        worst = max((float(np.abs(logits[i] - ref_logits[i]).max()) for i in bad), default=0.0)
        print(f"{name:18s} {tok_s:6.0f} tok/s; greedy tokens: {'same' if diff is None else f'first differ at {diff}'};"
              f" teacher-forced logits: {len(bad)}/{len(ref)} steps differ"
              + (f", first at step {bad[0]}, max |d logit| {worst:.3g}" if bad else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
