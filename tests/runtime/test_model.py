"""The numpy decoder: float32 all the way, and int4-resident weights give the f32 path's logits."""

import numpy as np
import pytest

from klaq.errors import KlaqError
from klaq.kernels import NumpyW4
from klaq.runtime.model import HalfHead, NumpyDecoder
from klaq.runtime.package import load_package

# (model type, bits, group, sym): Q4_0, Q4_1 merged to g64, ragged g64 over K=160 (klaq layout
# for the 3-bit row), per-channel; the 3-bit and 8-bit tensors stay dense under "int4".
CASES = [("llama", 4, 32, True), ("llama", 4, 64, False), ("qwen2", 4, 128, False), ("gemma3_text", 4, 64, False),
         ("llama", 3, 64, False), ("llama", 8, 32, True), ("qwen2", 4, -1, True)]


@pytest.fixture(scope="module")
def packages(tiny_model_dir, tmp_path_factory):
    from klaq.toolchain.export import ExportConfig, export_model

    made = {}

    def make(model_type, bits, group, sym):
        key = (model_type, bits, group, sym)
        if key not in made:
            path = tmp_path_factory.mktemp("pkg") / f"{model_type}-{bits}-{group}-{sym}.gguf"
            export_model(ExportConfig(model=str(tiny_model_dir(model_type)), output=str(path), method="rtn",
                                      bits=bits, group_size=group, sym=sym), progress=False)
            made[key] = path
        return made[key]

    return make


def _greedy(model, prompt, n):
    cache = model.new_cache(64)
    logits = [model.forward(prompt, cache)]
    toks = [int(logits[-1][-1].argmax())]
    for _ in range(n - 1):
        logits.append(model.forward([toks[-1]], cache))
        toks.append(int(logits[-1][-1].argmax()))
    return toks, logits


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_int4_resident_matches_f32(packages, case):
    path = packages(*case)
    f32 = load_package(str(path), resident="f32").model
    int4 = load_package(str(path), resident="int4").model
    prompt = [5, 17, 99, 3, 250, 7, 41, 300, 12]
    t_ref, l_ref = _greedy(f32, prompt, 8)
    t_new, l_new = _greedy(int4, prompt, 8)
    assert t_new == t_ref
    for a, b in zip(l_ref, l_new, strict=True):
        assert a.dtype == b.dtype == np.float32  # a float64 scalar once promoted the whole forward
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    packed = [f for L in int4.layers for lin in (L.qkv, L.wo, L.gate_up, L.down) for f in lin.fns]
    if case[1] == 4:
        assert all(isinstance(f, NumpyW4) for f in packed)
    else:  # no 4-bit tensors: nothing to keep packed
        assert not any(isinstance(f, NumpyW4) for f in packed)


def test_int4_keeps_fp16_embedding_in_fp16(packages):
    path = packages("gemma3_text", 4, 64, False)  # tied head: the embedding is the head
    model = load_package(str(path), resident="int4").model
    assert model.embed.dtype == np.float16 and isinstance(model.head, HalfHead)


def test_halfhead_matches_dense():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10_000, 24)).astype(np.float16)
    x = rng.standard_normal((3, 24)).astype(np.float32)
    np.testing.assert_allclose(HalfHead(w)(x), x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-5)


def test_unknown_residency_is_a_clear_error(packages):
    from klaq.formats.gguf_package import read_package

    with pytest.raises(KlaqError, match="f32, int4"):
        NumpyDecoder(read_package(str(packages("llama", 4, 32, True))), resident="int2")
