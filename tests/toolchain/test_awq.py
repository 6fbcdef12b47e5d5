"""AWQ on tiny random transformers blocks: exact folding, search quality, clipping, degenerate input."""

from __future__ import annotations

import copy
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch

from klaq.toolchain.algorithms.awq import (
    AwqConfig,
    _group_shapes,
    awq_block,
    candidate_scales,
    clip_search,
    fold_scales,
    resolve_config,
)
from klaq.toolchain.algorithms.grid import QuantSpec, fake_quantize, fit_grid
from klaq.toolchain.archs import QUANT_ARCHS

transformers = pytest.importorskip("transformers")

H, FF, VOCAB = 64, 128, 128


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids OpenMP contention on a busy shared CPU (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(model_type: str, hidden: int = H, ff: int = FF):
    common = dict(vocab_size=VOCAB, num_hidden_layers=1, max_position_embeddings=128)
    if model_type == "llama":
        return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ff, num_attention_heads=4,
                                        num_key_value_heads=2, **common)
    if model_type == "qwen2":
        return transformers.Qwen2Config(hidden_size=hidden, intermediate_size=ff, num_attention_heads=4,
                                        num_key_value_heads=2, **common)
    if model_type == "gemma3_text":
        return transformers.Gemma3TextConfig(hidden_size=hidden, intermediate_size=ff, num_attention_heads=4,
                                             num_key_value_heads=1, head_dim=16, sliding_window=16, **common)
    if model_type == "opt":
        return transformers.OPTConfig(hidden_size=hidden, ffn_dim=ff, num_attention_heads=4,
                                      word_embed_proj_dim=hidden, **common)
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=1, n_head=4, n_positions=128)
    raise ValueError(model_type)


def _block_and_inputs(model_type: str, n_batches: int = 2, batch: int = 2, seq: int = 24, seed: int = 0,
                      randomize: bool = True, **kw):
    """Decoder block 0 of a tiny random model, its input micro-batches and its keyword arguments."""
    torch.manual_seed(seed)
    cfg = _config(model_type, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    arch = QUANT_ARCHS[model_type]
    block = model.get_submodule(arch.layers)[0]
    if randomize:  # norms of ones / zeros and zero biases would hide folding mistakes
        with torch.no_grad():
            for name, p in block.named_parameters():
                if p.dim() == 1:
                    if "norm" in name or "ln_" in name:
                        base = 0.0 if model_type == "gemma3_text" and name.endswith("weight") else 1.0
                        p.copy_((base if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
                    else:
                        p.copy_(0.05 * torch.randn_like(p))
    sig = inspect.signature(block.forward)
    xs, kws = [], []

    def grab(_mod, args, kwargs):
        bound = sig.bind(*args, **kwargs).arguments
        extra = {}
        for pname, param in sig.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and pname in bound:
                extra = bound.pop(pname)
        hidden = bound.pop(next(iter(sig.parameters)))
        xs.append(hidden.detach().clone())
        kws.append({**bound, **extra})

    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for _ in range(n_batches):
            model(input_ids=torch.randint(0, VOCAB, (batch, seq)), use_cache=False)
    h.remove()
    return block, arch, xs, kws


def _out(block, xs, kws):
    with torch.no_grad():
        return [block(x, **kw) for x, kw in zip(xs, kws, strict=True)]


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _rel(a, b):
    a = torch.cat([_first(t).flatten() for t in a])
    b = torch.cat([_first(t).flatten() for t in b])
    return float((a - b).norm() / b.norm())


def _rtn_all(block, arch, spec):
    """Fake-quantize every linear of the block in place (what the engine's `awq` method does next)."""
    with torch.no_grad():
        for st in arch.stages:
            for name in st:
                mod = block.get_submodule(name)
                conv = arch.conv1d and not isinstance(mod, torch.nn.Linear)
                w = mod.weight.data.t() if conv else mod.weight.data
                sc, z = fit_grid(w.float(), spec)
                w.copy_(fake_quantize(w.float(), sc, z, spec))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "opt", "gpt2"])
def test_folding_is_exact(model_type):
    block, arch, xs, kws = _block_and_inputs(model_type)
    ref = _out(block, xs, kws)
    gen = torch.Generator().manual_seed(1)
    folded = 0
    for group in arch.groups:
        shapes, why = _group_shapes(block, group, arch)
        assert shapes is not None, why  # every table group, v -> o under GQA included, folds here
        n_prev, k, index = shapes
        s = torch.exp(0.7 * torch.randn(n_prev, generator=gen))
        fold_scales(block, group, arch, s, index)
        folded += 1
    assert folded == len(arch.groups)
    assert _rel(_out(block, xs, kws), ref) < 2e-5


def test_gqa_v_to_o_uses_one_scale_per_v_channel():
    block, arch, _, _ = _block_and_inputs("gemma3_text")  # 4 query heads share 1 kv head
    vo = next(g for g in arch.groups if g.prev_kind == "linear")
    (n_prev, k, index), _ = _group_shapes(block, vo, arch)
    assert (n_prev, k) == (16, 64)
    assert torch.equal(index, torch.arange(16).repeat(4))


def test_alpha_zero_without_duo_is_identity():
    x = torch.rand(48) * 10
    w = torch.rand(48)
    assert torch.equal(candidate_scales(x, w, 0.0, duo=False), torch.ones(48))
    s = candidate_scales(x, w, 0.5, duo=True)  # normalized: geometric centre at 1
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0), rtol=1e-5)
    assert not torch.equal(candidate_scales(x, w, 1.0, duo=False), torch.ones(48))


def test_awq_beats_rtn_with_outlier_channels():
    block, arch, xs, kws = _block_and_inputs("llama", n_batches=2, batch=4, seq=32, hidden=128, ff=256,
                                             randomize=False)
    with torch.no_grad():  # a few activation-outlier input channels for every norm-fed group
        for norm in ("input_layernorm", "post_attention_layernorm"):
            block.get_submodule(norm).weight[[3, 17, 50, 101]] = 25.0
    spec = QuantSpec(bits=3, group_size=32, sym=False)
    ref = _out(block, xs, kws)

    rtn_block = copy.deepcopy(block)
    _rtn_all(rtn_block, arch, spec)
    err_rtn = _rel(_out(rtn_block, xs, kws), ref)

    diag = awq_block(block, xs, kws, arch, spec, AwqConfig(clip=False))
    assert diag["fold_rel_err"] < 1e-5 and not diag["fallbacks"]
    assert _rel(_out(block, xs, kws), ref) < 1e-5  # scales alone do not change the FP block
    chosen = diag["groups"]["input_layernorm->q_proj,k_proj,v_proj"]
    assert chosen["alpha"] > 0 and chosen["loss"] < 0.5 * chosen["loss_rtn"]
    _rtn_all(block, arch, spec)
    err_awq = _rel(_out(block, xs, kws), ref)
    assert err_awq < 0.75 * err_rtn, (err_awq, err_rtn)


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_never_increases_error_and_refits_exactly(sym):
    torch.manual_seed(0)
    spec = QuantSpec(bits=3, group_size=32, sym=sym)
    w = torch.randn(40, 72)  # ragged last group
    w[torch.rand_like(w) < 0.02] *= 8  # heavy-tailed weights: clipping pays off
    x = torch.randn(256, 72)
    w_new, before, after, frac = clip_search(w, x, spec, AwqConfig())
    assert after <= before and frac > 0
    assert after < 0.95 * before
    # the engine's later RTN of the clamped weights reproduces exactly the grid the search measured
    sc, z = fit_grid(w_new, spec)
    measured = (x @ (fake_quantize(w_new, sc, z, spec) - w).t()).pow(2).mean()
    assert torch.isclose(measured, torch.tensor(after), rtol=1e-5)


def test_clip_in_block_never_increases_error_and_skips_qk():
    block, arch, xs, kws = _block_and_inputs("qwen2")
    diag = awq_block(block, xs, kws, arch, QuantSpec(4, 32, False), AwqConfig(n_grid=5))
    assert set(diag["clip"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                 "mlp.down_proj"}
    for info in diag["clip"].values():
        assert info["err_after"] <= info["err_before"]


@pytest.mark.filterwarnings("ignore:AWQ.*carry no signal")  # OPT: dead ReLU channels feed fc2
@pytest.mark.parametrize("model_type", ["gemma3_text", "opt", "gpt2"])
def test_awq_block_runs_and_lowers_group_loss(model_type):
    block, arch, xs, kws = _block_and_inputs(model_type)
    spec = QuantSpec(4, 32, True)
    ref = _out(block, xs, kws)
    diag = awq_block(block, xs, kws, arch, spec, AwqConfig(n_grid=5, duo_scaling="both", clip=False))
    assert len(diag["groups"]) == len(arch.groups)
    assert diag["fold_rel_err"] < 1e-4 and not diag["fallbacks"]
    for info in diag["groups"].values():
        assert info["loss"] <= info["loss_rtn"]
    assert _rel(_out(block, xs, kws), ref) < 1e-4


def test_degenerate_groups_warn_and_stay_finite():
    block, arch, xs, kws = _block_and_inputs("llama")
    with torch.no_grad():
        block.input_layernorm.weight[5] = 0.0  # one input channel of q/k/v never carries signal
        block.post_attention_layernorm.weight.zero_()  # the MLP sees an all-zero input
    with pytest.warns(RuntimeWarning) as rec:
        diag = awq_block(block, xs, kws, arch, QuantSpec(4, 32, False), AwqConfig(n_grid=4))
    msgs = " | ".join(str(r.message) for r in rec)
    assert "carry no signal" in msgs and "all input channels are zero" in msgs
    assert any("post_attention_layernorm" in f for f in diag["fallbacks"])
    for p in block.parameters():
        assert torch.isfinite(p).all()
    assert torch.isfinite(_first(_out(block, xs, kws)[0])).all()


def test_nan_inputs_fall_back_without_failing():
    block, arch, xs, kws = _block_and_inputs("llama")
    before = {k: v.clone() for k, v in block.state_dict().items()}
    xs = [x.clone() for x in xs]
    xs[1][0, 3, 7] = float("nan")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        diag = awq_block(block, xs, kws, arch, QuantSpec(4, 32, False), AwqConfig(n_grid=4))
    assert rec and diag["fallbacks"]
    for k, v in block.state_dict().items():
        assert torch.isfinite(v).all()
        if "norm" in k:
            assert torch.equal(v, before[k])  # identity scales: the norms are untouched


def test_engine_style_call():
    """The engine passes a kwargs list per micro-batch and its own config (salience, seed, ...)."""
    block, arch, xs, kws = _block_and_inputs("llama")
    cfg = SimpleNamespace(salience="l2", seed=3, device="cpu", spec=QuantSpec(4, 32, False))
    assert resolve_config(cfg).salience == "l2" and resolve_config(cfg).n_grid == 20
    ref = _out(block, xs, kws)
    diag = awq_block(block, xs, list(kws), arch, cfg.spec, cfg)
    assert len(diag["groups"]) == 4 and diag["fold_rel_err"] < 1e-5
    assert _rel(_out(block, xs, kws), ref) < 0.2  # clipped FP weights stay close
