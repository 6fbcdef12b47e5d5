"""The FP16 reference perplexity that klaq-export records in packages (toolchain/verify.py)."""

import numpy as np
import pytest
import torch
from tiny_archs import _model

from klaq.toolchain.data import eval_windows, token_split
from klaq.toolchain.lazy import lazy_weights, streamed
from klaq.toolchain.models import load_model
from klaq.toolchain.verify import reference_perplexity


def _encode(text: str) -> list[int]:
    return [b % 128 for b in text.encode()]


def _per_window_ppl(model, encode, ctx: int, windows: int) -> float:
    """The protocol written plainly: one full CausalLM forward per window, fp32 weights."""
    nll, n = 0.0, 0
    model = model.float()
    with torch.no_grad():
        for w in eval_windows(token_split("pydoc", encode, "eval"), ctx, windows):
            logits = model(torch.from_numpy(w[None])).logits[0, :-1].double()
            nll -= torch.log_softmax(logits, -1)[torch.arange(ctx - 1), torch.from_numpy(w[1:])].sum().item()
            n += ctx - 1
    return float(np.exp(nll / n))


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_batched_reference_is_the_per_window_forward(model_type):
    """All windows share one decoder pass and the head runs per window: the same perplexity as a
    CausalLM forward per window (base model + output embeddings cover every supported family)."""
    model = _model(model_type)
    got = reference_perplexity(model, _encode, "pydoc", 32, 3)
    assert got == pytest.approx(_per_window_ppl(_model(model_type), _encode, 32, 3), rel=1e-6)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_lazy_reference_reads_each_block_once(tiny_model_dir, monkeypatch):
    """A lazy model streams its blocks from disk: with 4 windows, each block is read once (the
    per-window loop read it 4 times), and the perplexity is the fully loaded model's."""
    d = str(tiny_model_dir("llama"))
    model = load_model(d, lazy=True).model
    lazy = lazy_weights(model)
    reads = []
    load = type(lazy).load_module
    monkeypatch.setattr(type(lazy), "load_module", lambda self, block, prefix: reads.append(prefix) or
                        load(self, block, prefix))
    with streamed(model):
        got = reference_perplexity(model, _encode, "pydoc", 64, 4)
    n_blocks = len(model.model.layers)
    assert sorted(reads) == sorted(f"model.layers.{i}." for i in range(n_blocks))
    assert got == pytest.approx(reference_perplexity(load_model(d).model, _encode, "pydoc", 64, 4), rel=1e-6)


def test_verify_reference_streams_blocks_in_batches(tiny_model_dir, monkeypatch):
    """klaq-verify's reference loads lazily and runs `batch` windows per decoder pass: 5 windows in
    batches of 2 read each block 3 times, and the logits are the fully loaded model's per window."""
    from klaq.toolchain.lazy import LazyWeights
    from klaq.toolchain.verify import reference_logits

    d = str(tiny_model_dir("llama"))
    windows = eval_windows(token_split("pydoc", _encode, "eval"), 32, 5)
    reads = []
    load = LazyWeights.load_module
    monkeypatch.setattr(LazyWeights, "load_module", lambda self, block, prefix, skip=None: reads.append(prefix) or
                        load(self, block, prefix, skip))
    got = list(reference_logits(d, windows, batch=2))
    full = load_model(d, dtype="float32").model
    n_blocks = len(full.model.layers)
    reads = [r for r in reads if r.startswith("model.layers.")]  # not the embeddings / head at load
    assert len(reads) == 3 * n_blocks and len(set(reads)) == n_blocks
    with torch.no_grad():
        for w, logits in zip(windows, got, strict=True):
            want = full(torch.from_numpy(w[None])).logits[0].numpy()
            assert logits.shape == want.shape and logits.dtype == np.float32
            np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
