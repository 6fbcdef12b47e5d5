"""bench/cta_trace.py: its traced kernel copies are made by literal source edits, which must each still find
their text once; the copies must build for sm_90a (on the CPU machine) with no more registers than the
kernels (a trace must run at the occupancy it measures); and its summary must count programs per SM and
the mix of whole tiles and shares on each SM exactly."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]
pytest.importorskip("triton.experimental.gluon")


def trace_namespace() -> dict:
    """The script's literal tables and pure functions, without importing it (that would put bench/kernels.py
    on sys.path as "kernels", shadowing the HF package of that name)."""
    tree = ast.parse((ROOT / "bench" / "cta_trace.py").read_text())
    names = {"FIELDS", "_HELPERS", "TRACE_EDITS"}
    keep = [n for n in tree.body if (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names
                                                                       for t in n.targets))
            or (isinstance(n, ast.FunctionDef) and n.name in {"traced_source", "summarize"})]
    namespace: dict = {"np": np}
    exec(compile(ast.Module(keep, []), "cta_trace.py", "exec"), namespace)  # noqa: S102 - our own file
    return namespace


@pytest.mark.parametrize("case,module", [("gemv", "gluon_gemv.py"), ("wgmma", "gluon_w4a16.py")])
def test_each_trace_edit_applies_once(case, module):
    ns = trace_namespace()
    source = (ROOT / "kernels" / module).read_text()
    traced = ns["traced_source"](case, source)
    assert "_trace_start(tr_ptr" in traced and "_trace_end(tr_ptr" in traced and "TRACE[0]" in traced
    compile(traced, module, "exec")
    with pytest.raises(ValueError, match="not in the module once"):
        ns["traced_source"](case, "no kernel here")


def test_the_traced_copies_take_no_more_registers_than_the_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "cta_trace.py"), "--ptxas"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(rep) == {"gemv", "wgmma"}
    for case, regs in rep.items():
        assert 0 < regs["traced"] <= regs["kernel"], (case, regs)


def test_the_summary_counts_programs_and_mixes_per_sm():
    ns = trace_namespace()
    # 4 programs: 0 and 2 on SM 7 (whole + share), 1 and 3 on SM 9 (both whole); times in ns and cycles
    tr = np.array([[7, 1000, 5000, 10, 4010],
                   [9, 1000, 9000, 10, 8010],
                   [7, 2000, 3000, 20, 1020],
                   [9, 1500, 8000, 15, 6515]], dtype=np.int64)
    roles = np.array(["whole", "whole", "share", "whole"])
    lines = ns["summarize"](tr, roles)
    assert lines[0].startswith("programs 4 on 2 SMs; span 8.00 us")
    assert "starts: last 1.00 us" in lines[0] and "last 8.00" in lines[0]
    assert lines[1] == "program duration (clock64 cycles): min 1000 p50 5250 p90 7550 max 8000"
    assert lines[2] == "programs per SM: 2: 2 SMs"
    assert lines[3] == "SM mixes: share+whole: 1, whole+whole: 1"
    assert lines[-2].startswith("  last to end: program 1 (whole) on SM 9, start 0.00 end 8.00; with 3 (whole) 0.50-7.00")
