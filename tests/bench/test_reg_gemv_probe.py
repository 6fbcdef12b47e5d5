"""bench/reg_gemv_probe.py's timing-only variants edit kernels/gluon_gemv.py by text: each edit must still
find its text once, and each edited kernel must still build for sm_90a (on the CPU machine)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytest.importorskip("triton.experimental.gluon")


def probe_namespace() -> dict:
    """VARIANTS and variant_source from the probe's source, without importing it (that would put
    bench/kernels.py on sys.path as "kernels", shadowing the HF package of that name)."""
    tree = ast.parse((ROOT / "bench" / "reg_gemv_probe.py").read_text())
    keep = [n for n in tree.body if (isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "VARIANTS"
                                                                       for t in n.targets))
            or (isinstance(n, ast.FunctionDef) and n.name == "variant_source")]
    namespace: dict = {}
    exec(compile(ast.Module(keep, []), "reg_gemv_probe.py", "exec"), namespace)  # noqa: S102 - our own file
    return namespace


@pytest.mark.parametrize("name", ["cg", "l2pf", "nox", "nos"])
def test_each_variant_applies_and_builds(name, tmp_path):
    ns = probe_namespace()
    assert set(ns["VARIANTS"]) == {"cg", "l2pf", "nox", "nos"}
    source = (ROOT / "kernels" / "gluon_gemv.py").read_text()
    edited = ns["variant_source"](name, source)
    assert edited != source
    path = tmp_path / f"gluon_gemv_{name}.py"
    path.write_text(edited)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "wgmma_ptxas.py"), "--json", "--kernel", "gemv_reg",
                          "--module", str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["loads"] == {"cg": 16, "l2pf": 16, "nox": 8, "nos": 12}[name], rep


def test_a_variant_whose_text_is_gone_is_an_error():
    ns = probe_namespace()
    with pytest.raises(ValueError, match="not in the kernel once"):
        ns["variant_source"]("cg", "no kernel here")
