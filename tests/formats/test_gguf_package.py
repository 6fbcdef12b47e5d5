import numpy as np
import pytest

from klaq.errors import KlaqError
from klaq.formats.gguf_package import HParams, Package, read_package, write_package
from klaq.formats.tokenizer import TokenizerFacts


def _package(extra=None):
    hp = HParams("llama", 1, 64, 96, 4, 2, 16, 10000.0, 1e-5, 128, 4)
    t = {"model.embed_tokens.weight": np.ones((4, 64), np.float32), "model.norm.weight": np.ones(64, np.float32)}
    t.update(extra or {})
    tok = TokenizerFacts(model="gpt2", tokens=["a", "b", "ab", "<s>"], token_types=[1, 1, 1, 3], merges=["a b"],
                         bos_id=3, eos_id=3)
    return Package("llama", hp, t, tok, {"method": "fp16", "bits": 16})


def test_roundtrip_metadata_and_types(tmp_path):
    path = tmp_path / "p.gguf"
    write_package(_package(), path)
    pf = read_package(path)
    import dataclasses

    expected = _package().hparams
    assert dataclasses.replace(pf.hparams, rms_eps=expected.rms_eps) == expected
    assert pf.hparams.rms_eps == pytest.approx(1e-5, rel=1e-6)  # stored as FLOAT32, as llama.cpp requires
    assert pf.meta == {"method": "fp16", "bits": 16, "llama_cpp_compatible": True}
    assert pf.tokenizer.tokens == ["a", "b", "ab", "<s>"] and pf.tokenizer.merges == ["a b"]
    from gguf import GGUFReader, GGUFValueType

    f = GGUFReader(path).fields  # llama.cpp type-checks these exactly
    assert f["llama.block_count"].types == [GGUFValueType.UINT32]
    assert f["llama.attention.layer_norm_rms_epsilon"].types == [GGUFValueType.FLOAT32]
    assert f["tokenizer.ggml.token_type"].types[-1] == GGUFValueType.INT32


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "p.gguf"
    bad = _package({"model.some_adapter.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(KlaqError, match="no GGUF name"):
        write_package(bad, path)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "p.gguf"
    write_package(_package(), path)
    before = path.read_bytes()
    with pytest.raises(KlaqError):
        write_package(_package({"model.some_adapter.weight": np.ones((2, 2), np.float32)}), path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_read_errors(tmp_path):
    with pytest.raises(KlaqError, match="no such file"):
        read_package(tmp_path / "x.gguf")
    (tmp_path / "t.gguf").write_bytes(b"PK\x03\x04zip")
    with pytest.raises(KlaqError, match="not a GGUF"):
        read_package(tmp_path / "t.gguf")
    write_package(_package(), tmp_path / "ok.gguf")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "ok.gguf").read_bytes()[:100])
    with pytest.raises(KlaqError, match="truncated"):
        read_package(tmp_path / "cut.gguf")
