"""The torch backend against the numpy decoder: same logits, same greedy tokens.

On CPU the torch path runs eagerly (fp32) and the fused Triton ops run in Triton's interpreter;
with a CUDA device the same checks run on it, plus the CUDA-graph decode path.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of a @triton.jit module
    os.environ.setdefault("TRITON_INTERPRET", "1")

from klaq.formats.gguf_package import read_package  # noqa: E402
from klaq.runtime.model import NumpyDecoder  # noqa: E402
from klaq.runtime.torch_model import TorchDecoder  # noqa: E402
from klaq.runtime.weights import load_weight, merge_groups  # noqa: E402

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
ARCHS = ["llama", "qwen2", "gemma3_text"]
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12]


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def packages(tiny_model_dir, tmp_path_factory):
    from klaq.toolchain.export import ExportConfig, export_model

    made = {}

    def make(model_type: str, group_size: int = 32, sym: bool = True):
        key = (model_type, group_size, sym)
        if key not in made:
            path = tmp_path_factory.mktemp("torchpkg") / f"{model_type}-g{group_size}-{sym}.gguf"
            export_model(ExportConfig(model=str(tiny_model_dir(model_type)), output=str(path), method="rtn", bits=4,
                                      group_size=group_size, sym=sym), progress=False)
            made[key] = read_package(path)
        return made[key]

    return make


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_both(pf, model, steps: int = 8):
    """Prefill PROMPT then ``steps`` greedy steps on both decoders, each on its own tokens."""
    ref = NumpyDecoder(pf)
    cr, ct = ref.new_cache(64), model.new_cache(64)
    lr, lt = ref.forward(PROMPT, cr), model.forward(PROMPT, ct)
    errs = [rel(lt, lr)]
    tr, tt = [int(np.argmax(lr[-1]))], [int(np.argmax(lt[-1]))]
    for _ in range(steps):
        lr, lt = ref.forward([tr[-1]], cr)[-1], model.forward([tt[-1]], ct)[-1]
        errs.append(rel(lt, lr))
        tr.append(int(np.argmax(lr)))
        tt.append(int(np.argmax(lt)))
    return max(errs), tr, tt


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_torch_matches_numpy(packages, arch):
    pf = packages(arch)
    err, tr, tt = run_both(pf, TorchDecoder(pf, "cpu"))
    assert err < 1e-4, err
    assert tt == tr


@pytest.mark.parametrize("group_size,sym", [(64, True), (32, False), (64, False)])
def test_cpu_torch_group_sizes_and_zero_points(packages, group_size, sym):
    pf = packages("llama", group_size, sym)
    qw = load_weight(pf, "blk.0.ffn_down.weight")  # K = 160: ragged last group at 64
    assert qw.group_size == group_size and qw.symmetric == sym
    err, tr, tt = run_both(pf, TorchDecoder(pf, "cpu"), steps=4)
    assert err < 1e-4, err
    assert tt == tr


def test_merge_groups_only_when_exact(packages):
    pf = packages("qwen2", 64)
    from gguf import GGMLQuantizationType as T

    from klaq.formats.ggml_blocks import from_ggml

    t = pf.tensors["blk.0.attn_q.weight"]
    q32 = from_ggml(t.data, t.type, t.shape)
    assert t.type == T.Q4_0 and q32.group_size == 32
    q64 = merge_groups(q32, 64)
    assert q64.group_size == 64 and np.array_equal(q64.dequantize(), q32.dequantize())
    q32.scales[0, 1] += 1  # blocks of one group disagree: keep 32
    assert merge_groups(q32, 64).group_size == 32


@pytest.mark.skipif(not has_triton(), reason="needs triton")
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_triton_ops_match_numpy(packages, arch):
    """The fused non-matmul kernels (interpreter on CPU) inside the whole model, fp32 activations."""
    pf = packages(arch)
    dev = "cuda" if HAS_CUDA else "cpu"
    model = TorchDecoder(pf, dev, backend="torch", dtype=torch.float32, fused_ops=True, cuda_graphs=False)
    err, tr, tt = run_both(pf, model, steps=4)
    assert err < 1e-4, err
    assert tt == tr


@pytest.mark.skipif(not has_triton(), reason="needs triton")
def test_decode_attention_kernel_sliding_window():
    from klaq.runtime import triton_ops
    from klaq.runtime.torch_model import attention_torch

    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(0)
    h, n_kv, d, max_len = 6, 2, 24, 150
    kc = torch.randn(n_kv, max_len, d, generator=g).to(dev)
    vc = torch.randn(n_kv, max_len, d, generator=g).to(dev)
    q = torch.randn(2, h, d, generator=g).to(dev)
    pos = torch.tensor([70, 131], device=dev)
    for window in (0, 5, 64):
        got = triton_ops.decode_attention(q, kc, vc, pos, window, 0.2)
        want = attention_torch(q, kc, vc, pos, max_len, window, 0.2)
        assert rel(got.cpu().numpy(), want.cpu().numpy()) < 1e-5


@pytest.mark.skipif(not has_triton() or HAS_CUDA, reason="interpreter run (CPU only)")
def test_triton_matmuls_in_interpreter(packages):
    """The whole triton backend (W4A16 kernels + fused ops) in fp16, under the interpreter."""
    pf = packages("qwen2", 64)
    model = TorchDecoder(pf, "cpu", backend="triton", dtype=torch.float16, cuda_graphs=False)
    err, tr, tt = run_both(pf, model, steps=3)
    assert err < 2e-2, err


def test_weight_bytes_count_int4(packages):
    pf = packages("llama")
    model = TorchDecoder(pf, "cpu")
    hp = pf.hparams
    linear_params = hp.n_layers * (hp.hidden * (hp.n_heads + 2 * hp.n_kv_heads) * hp.head_dim
                                   + hp.n_heads * hp.head_dim * hp.hidden + 3 * hp.hidden * hp.ffn)
    head = hp.vocab_size * hp.hidden * 4  # fp32 on CPU
    got = model.weight_bytes_per_step() - head
    assert linear_params * 0.5 < got < linear_params * 0.6  # 4 bits + one fp16 scale per 32


# -- CUDA ------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_greedy_tokens_equal_numpy(packages, arch, backend):
    if backend == "triton" and not has_triton():
        pytest.skip("needs triton")
    pf = packages(arch)
    ref, model = NumpyDecoder(pf), TorchDecoder(pf, "cuda", backend=backend)
    cr, ct = ref.new_cache(64), model.new_cache(64)
    lr, lt = ref.forward(PROMPT, cr), model.forward(PROMPT, ct)
    assert rel(lt, lr) < 2e-2
    first = int(np.argmax(lr[-1]))
    assert int(np.argmax(lt[-1])) == first
    want, margins = [], []
    tok = first
    for _ in range(32):
        lg = ref.forward([tok], cr)[-1]
        top = np.sort(lg)[-2:]
        margins.append((top[1] - top[0]) / lg.std())
        tok = int(np.argmax(lg))
        want.append(tok)
    got = model.greedy_decode(first, 32, ct)
    assert ct.length == cr.length
    # fp16 activations vs numpy fp32: a near-tie (top-2 gap < 1% of the logits' spread) may flip;
    # every step before the first such tie must agree.
    ties = [i for i, m in enumerate(margins) if m < 1e-2] + [32]
    assert got[: ties[0]] == want[: ties[0]]


@gpu
def test_cuda_graph_step_equals_eager(packages):
    pf = packages("gemma3_text")
    model = TorchDecoder(pf, "cuda")
    eager = TorchDecoder(pf, "cuda", cuda_graphs=False)
    ca, cb = model.new_cache(40), eager.new_cache(40)
    model.forward(PROMPT, ca), eager.forward(PROMPT, cb)
    for tok in (3, 9, 27, 81):
        a, b = model.decode_step(tok, ca), eager.forward([tok], cb)[-1]
        assert rel(a, b) < 5e-3
    split = model.decode_split(ca, iters=5)
    assert 0 < split.matmul_s < split.step_s


@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_cuda_graph_with_pdl_equals_without(packages, arch, monkeypatch):
    """Programmatic dependent launch changes when kernels start, never what they compute: the
    graph's logits are bit-identical with it on and off (KLAQ_PDL), over several decode steps (every
    layer takes the same kernel both ways, kernels/pdl.py)."""
    if not has_triton():
        pytest.skip("needs triton")
    pf = packages(arch)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("KLAQ_PDL", flag)
        model = TorchDecoder(pf, "cuda")
        cache = model.new_cache(48)
        model.forward(PROMPT, cache)
        runs[flag] = (model.uses_pdl, [model.decode_step(tok, cache) for tok in (3, 9, 27, 81, 5)])
    assert runs["0"][0] is False
    for a, b in zip(runs["1"][1], runs["0"][1], strict=True):
        assert np.array_equal(a, b)


def test_uses_pdl_only_on_cuda(packages):
    assert TorchDecoder(packages("llama"), "cpu").uses_pdl is False
