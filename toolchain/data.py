"""Text for calibration and evaluation, with one fixed split rule.

Every source is read as one text, tokenized once, and split by tokens: the first 80% is the
calibration part, the last 20% the evaluation part (never seen by calibration). Built in:
``pydoc`` = CPython's ``pydoc_data.topics`` (all topics, sorted by key, joined by blank lines).
Also accepted: a local ``.txt`` file, a ``.jsonl`` file with a ``text`` field per line, and the
Hugging Face datasets ``wikitext2``, ``c4`` and ``pileval`` when ``datasets`` and the data are
available (their own train/validation splits are used for calibration/evaluation instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from klaq.errors import KlaqError

CALIB_FRACTION = 0.8

HF_DATASETS = {  # name -> (path, config, calibration split, evaluation split, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "validation", "text"),
}


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _hf_text(name: str, part: str) -> str:
    path, config, calib_split, eval_split, field = HF_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise KlaqError(f"dataset {name!r} needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(path, config, split=calib_split if part == "calib" else eval_split)
    except Exception as exc:
        raise KlaqError(f"dataset {name!r} is not available here ({type(exc).__name__}); "
                        "use --calib/--dataset pydoc or a local .txt/.jsonl file") from None
    return "\n\n".join(t for t in ds[field] if t.strip())


def read_text(source: str) -> str:
    if source == "pydoc":
        return pydoc_text()
    p = Path(source)
    if p.suffix == ".txt" and p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl" and p.is_file():
        texts = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise KlaqError(f"{source}:{n}: expected a JSON object with a 'text' field") from None
        return "\n\n".join(texts)
    if p.suffix in (".txt", ".jsonl"):
        raise KlaqError(f"no such file: {source}")
    raise KlaqError(f"unknown text source {source!r}; use pydoc, a .txt / .jsonl file, or one of "
                    f"{', '.join(HF_DATASETS)}")


def token_split(source: str, encode, part: str) -> np.ndarray:
    """Token ids of the ``calib`` or ``eval`` part of ``source`` under ``encode(text) -> ids``."""
    if part not in ("calib", "eval"):
        raise ValueError(part)
    if source in HF_DATASETS:
        return np.asarray(encode(_hf_text(source, part)), dtype=np.int64)
    ids = np.asarray(encode(read_text(source)), dtype=np.int64)
    cut = int(len(ids) * CALIB_FRACTION)
    return ids[:cut] if part == "calib" else ids[cut:]


def calibration_windows(ids: np.ndarray, n: int, seqlen: int, seed: int) -> np.ndarray:
    """``n`` windows of ``seqlen`` tokens at random offsets (seeded) in the calibration part."""
    if len(ids) < seqlen + 1:
        raise KlaqError(f"calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=n)
    return np.stack([ids[s : s + seqlen] for s in starts])


def shuffled_windows(windows: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """``windows`` plus ``round(frac * n)`` more, each a random permutation of the tokens of a
    randomly chosen window (seeded).

    Why: a narrow calibration text teaches GPTQ correlations between inputs that other text does
    not have. A shuffled window keeps the text's vocabulary (so activations stay in the model's
    range) but breaks its syntax, so the statistics also see the same tokens in contexts the text
    never gives them: a cheap augmentation made from the calibration text alone.
    """
    extra = int(round(frac * len(windows)))
    if extra <= 0:
        return windows
    rng = np.random.default_rng([seed, 0x5F1E])
    picks = rng.integers(0, len(windows), size=extra)
    return np.concatenate([windows, np.stack([rng.permutation(windows[i]) for i in picks])])


def eval_windows(ids: np.ndarray, ctx: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``ctx`` tokens (the tail shorter than ``ctx`` is dropped)."""
    n = len(ids) // ctx
    if n == 0:
        raise KlaqError(f"evaluation text has {len(ids)} tokens, fewer than --ctx {ctx}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * ctx].reshape(n, ctx)
