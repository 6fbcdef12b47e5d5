"""bench/splitk_probe.py edits the wgmma kernel's source by text: each edit must still find its text."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]


def replacements() -> dict:
    """REPLACEMENTS from the probe's source (importing it would put bench/kernels.py on sys.path as
    "kernels", shadowing the HF package of that name)."""
    tree = ast.parse((ROOT / "bench" / "splitk_probe.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REPLACEMENTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("bench/splitk_probe.py has no REPLACEMENTS table")


def test_every_variant_edits_exactly_one_place_of_the_kernel():
    source = (ROOT / "kernels" / "gluon_w4a16.py").read_text()
    table = replacements()
    assert set(table) == {"direct", "nofix"}
    for name, (old, new) in table.items():
        assert source.count(old) == 1, (name, old)
        assert old != new
