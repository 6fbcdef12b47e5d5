"""klaq-verify: perplexity, KL divergence and top-1 agreement of a package vs its FP16 reference.

One protocol for every system: the evaluation part of the text source (never seen by
calibration), tokenized once with the *package's* tokenizer, cut into non-overlapping windows of
``ctx`` tokens; each window is scored from scratch. The same token ids go to the reference
(transformers, fp16 weights computed in fp32, loaded block by block where the weights are local
safetensors) and to the package (klaq runtime).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from klaq.errors import KlaqError
from klaq.runtime.package import load_package
from klaq.toolchain.data import eval_windows, token_split


@dataclass
class VerifyReport:
    package: str
    reference: str
    dataset: str
    ctx: int
    windows: int
    tokens: int
    ppl_reference: float
    ppl_package: float
    ppl_increase: float  # relative
    kl_mean: float  # mean token KL(reference || package), nats
    top1_agreement: float
    max_ppl_increase: float
    passed: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: perplexity {self.ppl_package:.4f} vs reference {self.ppl_reference:.4f} "
                f"({self.ppl_increase * 100:+.2f}%, limit {self.max_ppl_increase * 100:.2f}%) | "
                f"KL {self.kl_mean:.4f} nats | top-1 agreement {self.top1_agreement * 100:.2f}% | "
                f"{self.dataset}, {self.windows} x {self.ctx} tokens")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 (max-shifted, so exact enough for perplexity); sums accumulate in float64."""
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


class Scores:
    """Running NLL / KL / top-1 over windows."""

    def __init__(self):
        self.nll_ref = self.nll_pkg = self.kl = 0.0
        self.agree = self.n = 0

    def add(self, ref_logits: np.ndarray, pkg_logits: np.ndarray, ids: np.ndarray) -> None:
        lr, lp = log_softmax(ref_logits[:-1]), log_softmax(pkg_logits[:-1])
        tgt = ids[1:]
        rows = np.arange(len(tgt))
        self.nll_ref -= lr[rows, tgt].sum(dtype=np.float64)
        self.nll_pkg -= lp[rows, tgt].sum(dtype=np.float64)
        self.kl += (np.exp(lr) * (lr - lp)).sum(dtype=np.float64)
        self.agree += int((lr.argmax(-1) == lp.argmax(-1)).sum())
        self.n += len(tgt)


def reference_logits(reference: str, windows: list[np.ndarray], batch: int = 8):
    """The FP reference's fp32 logits ``[ctx, vocab]`` of each window, in order (a generator).

    The reference loads lazily where its weights are local safetensors (toolchain/lazy.py): host
    RAM holds the embeddings, the head and one decoder block, not the whole model in fp32 (32 GB
    for an 8B). ``batch`` windows at a time run through the decoder together, so each block is
    read from disk once per batch; the head then runs per window, so one window's logits are the
    only tensor of vocabulary size.
    """
    import torch

    from klaq.toolchain.lazy import streamed
    from klaq.toolchain.models import load_model

    model = load_model(reference, dtype="float32", lazy=True).model
    for i in range(0, len(windows), batch):
        with torch.no_grad(), streamed(model):
            hidden = _decoder_states(model, windows[i:i + batch])
        for h in hidden:
            yield _head_logits(model, h).float().numpy()


def _decoder_states(model, windows: list[np.ndarray]):
    """The decoder's final hidden states ``[len(windows), ctx, hidden]``, all windows as one batch."""
    import torch

    return model.base_model(input_ids=torch.from_numpy(np.stack(windows))).last_hidden_state


def _head_logits(model, hidden):
    """The head on one window's hidden states, with the final soft-capping the CausalLM forward
    applies where the config has one (Gemma-2 style)."""
    import torch

    cap = getattr(model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        logits = model.get_output_embeddings()(hidden)
        return torch.tanh(logits / cap) * cap if cap else logits


def reference_perplexity(model, encode, dataset: str = "pydoc", ctx: int = 512, max_windows: int | None = 8) -> float:
    """FP perplexity of ``model`` (a transformers causal LM) by the verify protocol, computed in
    fp32; recorded in packages as ``klaq.reference_ppl`` so a device can compare without the model.

    All windows go through the decoder as one batch and only the head runs per window: a lazy
    model (toolchain/lazy.py, inside ``streamed``) then reads each block from disk once, not once
    per window, while the per-window logits ([ctx, vocab] in fp64) stay the only large tensor.
    """
    import torch

    windows = eval_windows(token_split(dataset, encode, "eval"), ctx, max_windows)
    params = list(model.parameters())
    dtypes = [p.dtype for p in params]
    for p in params:  # parameters only: buffers (RoPE inv_freq) keep their fp32; fp16->fp32->fp16 is lossless
        p.data = p.data.float()
    nll, n = 0.0, 0
    try:
        with torch.no_grad():
            hidden = _decoder_states(model, windows)
            for w, h in zip(windows, hidden, strict=True):
                logits = _head_logits(model, h[:-1]).double()
                nll -= torch.log_softmax(logits, -1)[torch.arange(ctx - 1), torch.from_numpy(w[1:])].sum().item()
                n += ctx - 1
    finally:
        for p, dt in zip(params, dtypes, strict=True):
            p.data = p.data.to(dt)
    return float(np.exp(nll / n))


def verify_package(
    package: str, reference: str, dataset: str = "pydoc", ctx: int = 512, max_ppl_increase: float = 0.05,
    max_windows: int | None = None, progress: bool = True,
) -> VerifyReport:
    if ctx < 2:
        raise KlaqError("--ctx must be at least 2")
    t0 = time.perf_counter()
    pkg = load_package(package)
    ids = token_split(dataset, pkg.tokenizer.encode, "eval")
    windows = eval_windows(ids, ctx, max_windows)
    scores = Scores()
    refs = reference_logits(reference, windows)
    pairs = zip(windows, refs, strict=True)
    for w, ref in tqdm(pairs, total=len(windows), desc="verify", unit="window", disable=not progress):
        scores.add(ref, pkg.model.forward(w, pkg.model.new_cache(ctx)), w)
    ppl_ref = float(np.exp(scores.nll_ref / scores.n))
    ppl_pkg = float(np.exp(scores.nll_pkg / scores.n))
    inc = ppl_pkg / ppl_ref - 1.0
    return VerifyReport(
        package=package, reference=reference, dataset=dataset, ctx=ctx, windows=len(windows), tokens=scores.n,
        ppl_reference=ppl_ref, ppl_package=ppl_pkg, ppl_increase=inc, kl_mean=scores.kl / scores.n,
        top1_agreement=scores.agree / scores.n, max_ppl_increase=max_ppl_increase,
        passed=inc <= max_ppl_increase, seconds=time.perf_counter() - t0,
    )
