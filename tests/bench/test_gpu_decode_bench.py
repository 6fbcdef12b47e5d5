"""bench/gpu_decode.py's report, from the recorded H100 run (the GPU run itself is the benchmark)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("klaq_bench_gpu_decode", ROOT / "bench" / "gpu_decode.py")
gpu_decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_decode)


@pytest.fixture
def res():
    """bench/results/gpu_decode_h100_pdl.json, recorded before the A/B key was renamed."""
    r = json.loads((ROOT / "bench" / "results" / "gpu_decode_h100_pdl.json").read_text())
    r["klaq_triton_ab"] = dict(r.pop("klaq_triton_pdl"), pdl=True)
    return r


def test_report_rows_and_the_ab_direction(res):
    md = gpu_decode.markdown(res)
    assert "**NVIDIA H100 80GB HBM3**" in md
    assert "| **1251** |" in md and "| **1348** |" in md  # default run, then the A/B
    assert "programmatic dependent launch on (`KLAQ_PDL=1`); different greedy tokens" in md
    res["klaq_triton"]["pdl"], res["klaq_triton_ab"]["pdl"] = True, False
    res["klaq_triton_ab"]["tokens_equal"] = True
    md = gpu_decode.markdown(res)
    assert "CUDA graph, programmatic dependent launch (M=1" in md
    assert "programmatic dependent launch off (`KLAQ_PDL=0`); same greedy tokens" in md
    assert md.count("- sweep: ") == len(res["sweep"]) == 7


def test_update_markdown_replaces_only_its_section(tmp_path, res):
    doc = tmp_path / "B.md"
    doc.write_text("# klaq benchmarks\n\n## GPU kernels\n\nkeep\n\n## GPU decode\n\nold\n\n## Later\n\nkeep too\n")
    gpu_decode.update_markdown(str(doc), gpu_decode.markdown(res))
    text = doc.read_text()
    assert "old" not in text and "keep\n" in text and "## Later\n\nkeep too" in text and "| **1348** |" in text


def test_update_markdown_keeps_the_earlier_runs(tmp_path, res):
    """The section's '### Earlier runs' part survives a new run's table, which goes above it."""
    doc = tmp_path / "B.md"
    doc.write_text("# b\n\n## GPU decode\n\nold table\n\n### Earlier runs\n\n- run 1\n\n## Later\n\nkeep\n")
    gpu_decode.update_markdown(str(doc), gpu_decode.markdown(res))
    gpu_decode.update_markdown(str(doc), gpu_decode.markdown(res))
    text = doc.read_text()
    assert "old table" not in text and text.count("### Earlier runs\n\n- run 1\n\n## Later\n\nkeep") == 1
    assert text.index("| **1348** |") < text.index("### Earlier runs") and text.count("## GPU decode") == 1


def test_first_difference():
    assert gpu_decode.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert gpu_decode.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert gpu_decode.first_difference([1, 2], [1, 2, 3]) == 2


def test_the_ab_row_says_where_the_tokens_part(res):
    res["klaq_triton_ab"]["first_diff"] = 117
    md = gpu_decode.markdown(res)
    assert (f"different (from token 117 of {res['new_tokens']}; each run prefills its own cache) greedy tokens"
            in md)
