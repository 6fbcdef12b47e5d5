"""Does programmatic dependent launch change what the CUDA-graph decode step computes? (H100/H200)

    python bench/pdl_decode_check.py [--new-tokens 256]

Builds the random-weight SmolLM2-shaped package of bench/gpu_decode.py and decodes greedily with
PDL off (twice: is the step deterministic at all?), on for everything (``KLAQ_PDL=1``), on for the
GEMVs only, and on for the fused ops only. For each: whether the tokens equal the first run's and
where they first differ. Then, teacher-forced on the first run's tokens, one step at a time
(``decode_step``, the host reading the logits between replays): the first step whose logits differ,
and by how much, which separates a race inside a step from one between back-to-back replays.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_decode import build_random_package  # noqa: E402

MODES = {  # name: (KLAQ_PDL, M = 1 launch overrides of the GEMVs)
    "off": ("0", None), "off again": ("0", None), "all": ("1", None),
    "GEMVs only": ("0", dict(pdl=True)), "fused ops only": ("1", dict(pdl=False)),
    "all, early words": ("1", dict(pdl=True, early=True)),
}


def run(pf, prompt, new: int, env: str, cfg, teacher=None):
    from klaq.runtime.torch_model import TorchDecoder

    os.environ["KLAQ_PDL"] = env
    model = TorchDecoder(pf, "cuda", backend="triton")
    model.set_decode_config(cfg)
    cache = model.new_cache(len(prompt) + new + 1)
    first = int(np.argmax(model.forward(prompt, cache)[-1]))
    if teacher is None:
        return first, model.greedy_decode(first, new, cache)
    return [model.decode_step(t, cache) for t in [first] + teacher[:-1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    from klaq.formats.gguf_package import read_package

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    path = os.path.join(tempfile.mkdtemp(), "random-smollm2.gguf")
    build_random_package(path)
    pf = read_package(path)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, pf.hparams.vocab_size, 16)]
    ref_first, ref = run(pf, prompt, args.new_tokens, "0", None)
    ref_logits = run(pf, prompt, args.new_tokens, "0", None, teacher=ref)
    for name in args.modes.split(","):
        env, cfg = MODES[name]
        first, toks = run(pf, prompt, args.new_tokens, env, cfg)
        diff = next((i for i, (a, b) in enumerate(zip(toks, ref, strict=True)) if a != b), None)
        logits = run(pf, prompt, args.new_tokens, env, cfg, teacher=ref)
        bad = [i for i, (a, b) in enumerate(zip(logits, ref_logits, strict=True)) if not np.array_equal(a, b)]
        worst = max((float(np.abs(logits[i] - ref_logits[i]).max()) for i in bad), default=0.0)
        print(f"{name:18s} greedy: {'same' if diff is None else f'first differs at token {diff}'}"
              f" (first token {'same' if first == ref_first else 'different'}); teacher-forced steps: "
              f"{len(bad)}/{len(ref)} differ" + (f", first at step {bad[0]}, max |d logit| {worst:.3g}" if bad else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
