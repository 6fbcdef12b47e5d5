"""The ONNX package directory: files, manifest, genai config, bit-exact weights, clear errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_synth import random_qweight, synthetic_package

from klaq.errors import KlaqError
from klaq.formats.matmulnbits import MatMulNBitsWeight, concat_rows, from_matmulnbits
from klaq.formats.onnx_package import (
    DATA_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    is_onnx_package,
    read_onnx_package,
    write_onnx_package,
)
from klaq.formats.tokenizer import PackageTokenizer
from klaq.runtime.onnx_model import load_onnx_package


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    pkg = synthetic_package("qwen2", 4, 64, False, seed=5)
    out = tmp_path_factory.mktemp("onnx") / "pkg"
    return pkg, out, write_onnx_package(pkg, out)


def test_directory_files_and_manifest(written):
    pkg, out, man = written
    names = {p.name for p in out.iterdir()}
    assert {MODEL_FILE, DATA_FILE, TOKENIZER_FILE, "tokenizer_config.json", "klaq_tokenizer.json",
            "genai_config.json", MANIFEST_FILE} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".klaq-")]  # no temporary left over
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk == man
    assert set(man["files"]) == names - {MANIFEST_FILE}
    for fname, facts in man["files"].items():
        data = (out / fname).read_bytes()
        assert facts["bytes"] == len(data) and facts["sha256"] == hashlib.sha256(data).hexdigest()
    assert man["model_type"] == "qwen2" and man["hparams"]["n_layers"] == 2
    assert man["meta"]["method"] == "synthetic" and man["meta"]["group_size"] == 64
    assert man["onnx"]["matmulnbits"] == 2 * 4  # per layer: fused qkv, o, fused gate/up, down
    assert is_onnx_package(out)


def test_genai_config_and_tokenizer(written):
    pkg, out, _ = written
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert dec["filename"] == MODEL_FILE and dec["num_hidden_layers"] == 2 and dec["head_size"] == 16
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert cfg["model"]["type"] == "qwen2" and cfg["search"]["past_present_share_buffer"] is True
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    text = "Hello, world: ünïcode"
    assert tok.encode(text, add_special_tokens=False).ids == PackageTokenizer(pkg.tokenizer).encode(text, add_bos=False)
    pf = read_onnx_package(out)
    assert pf.tokenizer == pkg.tokenizer and pf.hparams == pkg.hparams


def test_graph_io_names_and_matmulnbits_unpack_bit_exactly(written):
    pkg, out, _ = written
    model = onnx.load(str(out / MODEL_FILE))  # external data loaded from model.onnx.data
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins[3:7] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                        "past_key_values.1.value"]
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all(n.domain == "com.microsoft" for n in nodes)
    seen = 0
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        m = MatMulNBitsWeight(inits[node.input[1]], inits[node.input[2]], zp, attrs["K"], attrs["N"], attrs["bits"],
                              attrs["block_size"])
        back = from_matmulnbits(m)
        base = node.input[1].removesuffix(".qweight")
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        leaf = base.rsplit(".", 1)[1]
        names = [f"{base.rsplit('.', 1)[0]}.{p}.weight" for p in parts.get(leaf, [leaf])]
        want = concat_rows([pkg.tensors[n] for n in names])
        assert np.array_equal(back.codes, want.codes), base
        assert np.array_equal(back.scales, want.scales) and np.array_equal(back.zeros, want.zeros), base
        seen += len(names)
    assert seen == sum(1 for v in pkg.tensors.values() if hasattr(v, "codes"))


def test_rewrite_replaces_a_package_but_not_other_directories(tmp_path):
    pkg = synthetic_package("llama", 4, 32, True)
    write_onnx_package(pkg, tmp_path / "p")
    man = write_onnx_package(pkg, tmp_path / "p", quantize_head=8)
    assert read_onnx_package(tmp_path / "p").manifest == man
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(KlaqError, match="not a klaq ONNX package"):
        write_onnx_package(pkg, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_read_errors_are_clear(tmp_path):
    with pytest.raises(KlaqError, match="no such package"):
        read_onnx_package(tmp_path / "missing")
    (tmp_path / "file.onnx").write_bytes(b"x")
    with pytest.raises(KlaqError, match="not a directory"):
        read_onnx_package(tmp_path / "file.onnx")
    with pytest.raises(KlaqError, match="has no klaq.json"):
        read_onnx_package(tmp_path)
    pkg = synthetic_package("llama", 4, 32, True)
    out = tmp_path / "p"
    write_onnx_package(pkg, out)
    data = out / DATA_FILE
    original = data.read_bytes()
    blob = bytearray(original)
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))  # same size, different bytes: only the hash notices
    read_onnx_package(out)
    with pytest.raises(KlaqError, match="does not match its sha256"):
        read_onnx_package(out, check_hashes=True)
    data.write_bytes(bytes(blob[:-10]))
    with pytest.raises(KlaqError, match="truncated or modified"):
        load_onnx_package(out)
    data.write_bytes(original)
    (out / TOKENIZER_FILE).unlink()
    with pytest.raises(KlaqError, match="tokenizer.json is missing"):
        read_onnx_package(out)


def test_unsupported_architecture_and_options(tmp_path):
    pkg = synthetic_package("llama", 4, 32, True)
    pkg.hparams.arch = "phi3"
    with pytest.raises(KlaqError, match="support architectures llama, qwen2, gemma3"):
        write_onnx_package(pkg, tmp_path / "p")
    pkg = synthetic_package("llama", 4, 32, True)
    with pytest.raises(KlaqError, match="quantize_head must be"):
        write_onnx_package(pkg, tmp_path / "p", quantize_head=3)
    with pytest.raises(KlaqError, match="accuracy_level"):
        write_onnx_package(pkg, tmp_path / "p", accuracy_level=7)
    w = pkg.tensors["model.layers.1.mlp.up_proj.weight"]
    pkg.tensors["model.layers.1.mlp.up_proj.weight"] = random_qweight(np.random.default_rng(0), w.out_features,
                                                                      w.in_features, 4, 48, True)
    with pytest.raises(KlaqError, match=r"model.layers.1.mlp.up_proj.*group sizes 16, 32, 64, 128, 256"):
        write_onnx_package(pkg, tmp_path / "p")
    assert not (tmp_path / "p").exists()
