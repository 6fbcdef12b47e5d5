"""Bad input gets one line on stderr, a non-zero exit, and never a traceback."""

import os
import subprocess
import sys

import pytest


def klaq(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "KLAQ_DEBUG"}
    return subprocess.run([sys.executable, "-m", "klaq", *args], capture_output=True, text=True, cwd=cwd, env=env)


def assert_one_line_error(res, needle, code=2):
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0], lines[0]


def test_help_lists_commands():
    res = klaq("--help")
    assert res.returncode == 0
    for cmd in ("export", "run", "verify", "targets"):
        assert cmd in res.stdout
    for cmd in ("export", "run", "verify"):
        assert "Usage:" in klaq(cmd, "--help").stdout


def test_run_missing_file(tmp_path):
    assert_one_line_error(klaq("run", str(tmp_path / "nope.gguf")), "no such file")


def test_run_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("hello, I am not a model")
    assert_one_line_error(klaq("run", str(p)), "not a GGUF file")


def test_run_truncated_gguf(tiny_q4_package, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny_q4_package.read_bytes()[:5000])
    assert_one_line_error(klaq("run", str(p)), "truncated or corrupt")


def test_run_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter

    p = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(klaq("run", str(p)), "unsupported architecture 'gpt2'")


def test_export_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path / "g")
    res = klaq("export", str(tmp_path / "g"), "-o", str(tmp_path / "o.gguf"))
    assert_one_line_error(res, "unsupported architecture 'gpt2'")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("args,needle", [
    (["--group-size", "100"], "--group-size must be one of"),
    (["--group-size", "0"], "--group-size must be one of"),
    (["--bits", "5"], "--bits must be 2, 3, 4 or 8"),
    (["--target", "toaster"], "unknown target 'toaster'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--format", "tflite"], "unknown format 'tflite'"),
])
def test_export_bad_options(tiny_llama_dir, tmp_path, args, needle):
    out = tmp_path / "o.gguf"
    assert_one_line_error(klaq("export", str(tiny_llama_dir), "-o", str(out), *args), needle)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_export_unknown_model_lists_aliases(tmp_path):
    res = klaq("export", "no-such-model", "-o", str(tmp_path / "o.gguf"))
    assert_one_line_error(res, "smollm2-135m")


def test_export_run_json(tiny_llama_dir, tmp_path):
    import json

    out = tmp_path / "t.gguf"
    res = klaq("export", str(tiny_llama_dir), "-o", str(out), "--bits", "4", "--group-size", "32", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["method"] == "rtn" and info["bits"] == 4 and info["quantized_linears"] == 14
    res = klaq("run", str(out), "-p", "Hi", "-n", "3", "--json")
    rep = json.loads(res.stdout)
    assert rep["new_tokens"] == 3 and set(rep) >= {"load_s", "ttft_s", "prefill_tok_s", "decode_tok_s",
                                                   "peak_rss_mb", "weight_bytes"}
    res4 = klaq("run", str(out), "-p", "Hi", "-n", "3", "--json", "--resident", "int4")
    assert res4.returncode == 0, res4.stderr
    assert json.loads(res4.stdout)["text"] == rep["text"]  # same greedy tokens with packed weights
    bad = klaq("run", str(out), "--resident", "int2")  # click's usage error: exit 2, choices named
    assert bad.returncode == 2 and "'f32', 'int4'" in bad.stderr and "Traceback" not in bad.stderr


def test_standalone_entry_points_exist():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("klaq.cli")}
    assert {"klaq", "klaq-export", "klaq-run", "klaq-verify", "klaq-targets"} <= names


def test_export_gptq_through_cli(tiny_llama_dir, tmp_path):
    import json

    out = tmp_path / "g.gguf"
    res = klaq("export", str(tiny_llama_dir), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
               "--n-calib", "4", "--seqlen", "64", "--damp", "0.02", "--reference-windows", "0", "--json",
               "--activations", "disk", "--norm-tokens", "--fp-target", "0.1")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["method"] == "gptq" and info["calibration"] == "pydoc:4x64:seed0" and "damp=0.02" in info["method_options"]
    assert "norm_tokens=1" in info["method_options"] and "fp_target=0.1" in info["method_options"]
    assert info["quant_seconds"] > 0 and info["peak_rss_mb"] > 0
    bad = klaq("export", str(tiny_llama_dir), "-o", str(tmp_path / "b.gguf"), "--activations", "gpu")
    assert bad.returncode == 2 and "'auto', 'cpu', 'disk'" in bad.stderr and "Traceback" not in bad.stderr
    bad = klaq("export", str(tiny_llama_dir), "-o", str(tmp_path / "r.gguf"), "--method", "rtn", "--fp-target", "0.1")
    assert bad.returncode != 0 and "--fp-target" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "r.gguf").exists()


@pytest.mark.parametrize("flag,want", [("--no-pdl", "0"), ("--pdl", "1")])
def test_run_pdl_flag_sets_what_the_kernels_read(tiny_q4_package, monkeypatch, flag, want):
    """--pdl/--no-pdl is KLAQ_PDL for this run (the CUDA kernels read it at each launch); on CPU the
    report has no PDL line and generation is unchanged."""
    from click.testing import CliRunner

    from klaq.cli import run_cmd

    monkeypatch.delenv("KLAQ_PDL", raising=False)
    res = CliRunner().invoke(run_cmd, [str(tiny_q4_package), "-n", "2", "--json", flag])
    assert res.exit_code == 0, res.output
    assert os.environ["KLAQ_PDL"] == want
    assert '"pdl": null' in res.output
    assert "--pdl / --no-pdl" in CliRunner().invoke(run_cmd, ["--help"]).output
