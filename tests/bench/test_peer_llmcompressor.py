"""bench/peer_llmcompressor.py's output: every parameter, quantized Linears fake-quantized."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

_spec = importlib.util.spec_from_file_location(
    "klaq_bench_peer", Path(__file__).resolve().parents[2] / "bench" / "peer_llmcompressor.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


class _Block(torch.nn.Module):
    """A norm whose weight AWQ would rescale, then a Linear as llm-compressor leaves it."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 4, bias=False)
        self.head = torch.nn.Linear(4, 3, bias=False)  # ignored by the recipe: no weight_scale
        self.proj.weight_scale = torch.nn.Parameter(torch.full((4, 1), 0.25), requires_grad=False)
        self.proj.quantization_scheme = SimpleNamespace(weights="args")


def test_collect_weights_keeps_every_parameter():
    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        block.norm.weight.mul_(0.5)  # what AWQ's folding does to the norm before its Linears
    calls = []

    def fake_quantize(w, scale, zp, args):
        calls.append(args)
        return torch.round(w / scale) * scale

    out = peer.collect_weights(block, fake_quantize)
    assert sorted(out) == ["head.weight", "norm.bias", "norm.weight", "proj.weight"]
    assert torch.equal(out["norm.weight"], torch.full((8,), 0.5))
    assert torch.equal(out["proj.weight"], torch.round(block.proj.weight / 0.25) * 0.25)
    assert torch.equal(out["head.weight"], block.head.weight)
    assert calls == ["args"] and all(t.dtype == torch.float32 for t in out.values())
