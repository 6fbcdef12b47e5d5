import json

import numpy as np
import pytest

from klaq.errors import KlaqError
from klaq.toolchain.data import (
    CALIB_FRACTION,
    calibration_windows,
    eval_windows,
    read_text,
    shuffled_windows,
    token_split,
)


def encode(text):  # a stand-in tokenizer: one id per byte
    return list(text.encode("utf-8"))


def test_pydoc_split_is_80_20_and_disjoint():
    calib = token_split("pydoc", encode, "calib")
    ev = token_split("pydoc", encode, "eval")
    total = len(calib) + len(ev)
    assert total > 400_000  # pydoc_data.topics is about 0.45 MB
    assert len(calib) == int(total * CALIB_FRACTION)
    full = np.asarray(encode(read_text("pydoc")))
    np.testing.assert_array_equal(np.concatenate([calib, ev]), full)


def test_local_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    assert read_text(str(tmp_path / "a.txt")).startswith("hello world")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n")
    assert read_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(KlaqError, match="bad.jsonl:1"):
        read_text(str(tmp_path / "bad.jsonl"))


def test_unknown_and_missing_sources(tmp_path):
    with pytest.raises(KlaqError, match="unknown text source"):
        read_text("shakespeare")
    with pytest.raises(KlaqError, match="no such file"):
        read_text(str(tmp_path / "missing.txt"))


def test_calibration_windows_seeded():
    ids = np.arange(10_000)
    a = calibration_windows(ids, 8, 64, seed=0)
    b = calibration_windows(ids, 8, 64, seed=0)
    c = calibration_windows(ids, 8, 64, seed=1)
    assert a.shape == (8, 64) and (a == b).all() and not (a == c).all()
    assert (np.diff(a, axis=1) == 1).all()  # contiguous windows
    with pytest.raises(KlaqError):
        calibration_windows(np.arange(10), 1, 64, 0)


def test_eval_windows_non_overlapping():
    w = eval_windows(np.arange(1000), 100, max_windows=3)
    assert w.shape == (3, 100) and w[1, 0] == 100
    assert eval_windows(np.arange(1050), 100).shape == (10, 100)


def test_hf_dataset_names_fail_clearly_offline():
    """wikitext2/c4/pileval need `datasets` and a hub: here they must fail with a clear message."""
    for name in ("wikitext2", "c4", "pileval"):
        with pytest.raises(KlaqError, match=name):
            token_split(name, encode, "eval")


def test_shuffled_windows():
    """The originals first, untouched; each extra window a permutation of one of them; seeded."""
    w = np.arange(40 * 16).reshape(40, 16)
    out = shuffled_windows(w, 0.25, seed=3)
    assert out.shape == (50, 16)
    np.testing.assert_array_equal(out[:40], w)
    for row in out[40:]:
        src = row.min() // 16  # windows hold disjoint token ranges here
        np.testing.assert_array_equal(np.sort(row), w[src])
        assert not np.array_equal(row, w[src])
    np.testing.assert_array_equal(out, shuffled_windows(w, 0.25, seed=3))
    assert not np.array_equal(out, shuffled_windows(w, 0.25, seed=4))
    assert shuffled_windows(w, 0.0, seed=3) is w
