"""bench/quality.py method specs: positional KLAWQ arguments, typed engine overrides, AWQ options."""

import importlib.util
from pathlib import Path

import pytest

# loaded by path: putting bench/ on sys.path would let bench/kernels.py shadow HF's ``kernels``
_spec = importlib.util.spec_from_file_location("klaq_bench_quality",
                                               Path(__file__).resolve().parents[2] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)
parse_method = quality.parse_method


def test_parse_method():
    assert parse_method("gptq") == ("gptq", {})
    assert parse_method("klawq:0.5:1:model") == ("klawq", {"beta": 0.5, "tau": 1.0, "kl_source": "model"})
    assert parse_method("gptq:shrink=0:act_order=0:augment=0.25:grid_steps=20") == (
        "gptq", {"shrink": 0.0, "act_order": False, "augment": 0.25, "grid_steps": 20})
    assert parse_method("awq+gptq:awq_clip=0:awq_n_grid=10") == ("awq+gptq", {"awq_clip": False, "awq_n_grid": 10})
    assert parse_method("rtn+greedy") == ("rtn", {"rounding": "greedy"})
    # options whose default is the architecture's (None) still parse to their types
    assert parse_method("gptq:shrink=0.5:norm_tokens=0") == ("gptq", {"shrink": 0.5, "norm_tokens": False})
    assert parse_method("gptq:norm_tokens=1") == ("gptq", {"norm_tokens": True})
    assert parse_method("gptq:fp_target=0") == ("gptq", {"fp_target": 0.0})
    with pytest.raises(AttributeError):
        parse_method("gptq:no_such_option=1")
