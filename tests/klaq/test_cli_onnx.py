"""--format onnx and gguf,onnx through the CLI; klaq-run and klaq-verify on the ONNX directory."""

import json

from test_cli import klaq


def test_export_both_formats_and_run_each(tiny_llama_dir, tmp_path):
    out = tmp_path / "pkg"
    res = klaq("export", str(tiny_llama_dir), "-o", str(out), "--bits", "4", "--group-size", "32", "--sym",
               "--format", "gguf,onnx", "--json")
    assert res.returncode == 0, res.stderr
    assert (out / "model.gguf").is_file() and (out / "onnx" / "model.onnx").is_file()
    assert (out / "onnx" / "genai_config.json").is_file() and (out / "onnx" / "klaq.json").is_file()
    texts = {}
    for pkg in (out / "model.gguf", out / "onnx"):
        res = klaq("run", str(pkg), "-p", "The pickle module", "-n", "6", "--json")
        assert res.returncode == 0, res.stderr
        rep = json.loads(res.stdout)
        texts[pkg.name] = rep["text"]
        assert rep["backend"] == ("onnxruntime" if pkg.name == "onnx" else "numpy")
    assert texts["model.gguf"] == texts["onnx"]  # same quantized weights, same greedy tokens


def test_verify_onnx_against_reference(tiny_llama_dir, tmp_path):
    out = tmp_path / "onnx-pkg"
    assert klaq("export", str(tiny_llama_dir), "-o", str(out), "--bits", "8", "--group-size", "32", "--sym",
                "--format", "onnx", "--accuracy-level", "0").returncode == 0
    res = klaq("verify", str(out), "--reference", str(tiny_llama_dir), "--ctx", "64", "--max-windows", "2",
               "--max-ppl-increase", "0.01", "--json")
    rep = json.loads(res.stdout)
    assert res.returncode == 0 and rep["passed"], rep
    assert abs(rep["ppl_increase"]) < 0.01 and rep["top1_agreement"] > 0.95  # 8-bit: near lossless


def test_run_onnx_with_wrong_backend(tiny_llama_dir, tmp_path):
    out = tmp_path / "o"
    assert klaq("export", str(tiny_llama_dir), "-o", str(out), "--bits", "4", "--group-size", "32",
                "--format", "onnx").returncode == 0
    res = klaq("run", str(out), "--backend", "numpy")
    assert res.returncode == 2 and "ONNX package" in res.stderr and "Traceback" not in res.stderr


def test_onnx_rejects_per_channel(tiny_llama_dir, tmp_path):
    res = klaq("export", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--group-size", "-1", "--format", "onnx")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
