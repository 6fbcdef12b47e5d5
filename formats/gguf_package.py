"""A klaq package as one GGUF file that llama.cpp also loads: write it, read it back.

One module owns the mapping between model hyper-parameters and llama.cpp's metadata keys in both
directions, so the writer and the runtime's reader cannot drift apart. Writing goes through
``gguf.GGUFWriter`` into a temporary file that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from klaq.errors import KlaqError
from klaq.formats.arch import get_package_arch, permute_rows
from klaq.formats.ggml_blocks import ggml_type_for, to_ggml
from klaq.formats.qweight import QuantizedWeight, pack_codes
from klaq.formats.tokenizer import TokenizerFacts

KLAQ_PREFIX = "klaq."
RUNTIME_ARCHS = ("llama", "qwen2", "gemma3")  # general.architecture values the runtime decodes
FILE_TYPE = {T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7}  # llama_ftype, informational


@dataclass
class HParams:
    """The decoder shape facts a runtime needs, named as in llama.cpp's metadata."""

    arch: str  # general.architecture
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    context_length: int
    vocab_size: int
    sliding_window: int = 0  # Gemma 3 local layers (every 6th layer is global); 0 = none


_HPARAM_KEYS = {  # field -> (key suffix, value type)
    "n_layers": ("block_count", GGUFValueType.UINT32),
    "hidden": ("embedding_length", GGUFValueType.UINT32),
    "ffn": ("feed_forward_length", GGUFValueType.UINT32),
    "n_heads": ("attention.head_count", GGUFValueType.UINT32),
    "n_kv_heads": ("attention.head_count_kv", GGUFValueType.UINT32),
    "head_dim": ("attention.key_length", GGUFValueType.UINT32),
    "rope_theta": ("rope.freq_base", GGUFValueType.FLOAT32),
    "rms_eps": ("attention.layer_norm_rms_epsilon", GGUFValueType.FLOAT32),
    "context_length": ("context_length", GGUFValueType.UINT32),
    "vocab_size": ("vocab_size", GGUFValueType.UINT32),
}


@dataclass
class Package:
    """Everything in a package, independent of the file: what export writes and runtime reads."""

    model_type: str  # HF config.model_type
    hparams: HParams
    tensors: dict[str, np.ndarray | QuantizedWeight]  # HF names, HF row order
    tokenizer: TokenizerFacts
    meta: dict[str, object] = field(default_factory=dict)  # klaq.* keys (without the prefix)
    name: str = "model"


def _gguf_tensors(pkg: Package):
    """Yield (gguf name, array, raw ggml type or None) in llama.cpp's layout."""
    arch = get_package_arch(pkg.model_type)
    hp = pkg.hparams
    for hf_name, value in pkg.tensors.items():
        name = arch.gguf_name(hf_name)
        if name is None:
            raise KlaqError(f"tensor {hf_name!r} has no GGUF name for architecture {pkg.model_type!r}")
        if arch.permute_qk and (".attn_q." in name or ".attn_k." in name):
            heads = hp.n_heads if ".attn_q." in name else hp.n_kv_heads
            value = _permute(value, heads)
        if isinstance(value, QuantizedWeight):
            typ = ggml_type_for(value)
            if typ is not None:
                data, typ = to_ggml(value)
                yield name, data, typ
            else:  # klaq's own layout: llama.cpp cannot load this package
                base = name.removesuffix(".weight")
                yield f"{base}.qweight", pack_codes(value.codes, value.bits).view(np.int8), T.I8
                yield f"{base}.scales", value.scales, None
                if value.zeros is not None:
                    yield f"{base}.zeros", value.zeros.view(np.int8), T.I8
        elif value.ndim == 1:
            offset = arch.norm_offset if name.endswith("norm.weight") else 0.0
            yield name, np.asarray(value, dtype=np.float32) + np.float32(offset), None
        else:
            yield name, np.asarray(value, dtype=np.float16), None


def _permute(value, heads: int):
    if isinstance(value, QuantizedWeight):
        z = None if value.zeros is None else permute_rows(value.zeros, heads)
        return QuantizedWeight(permute_rows(value.codes, heads), permute_rows(value.scales, heads), z,
                               value.bits, value.group_size)
    return permute_rows(np.asarray(value), heads)


def _own_layout_meta(pkg: Package) -> dict[str, object]:
    """Per-tensor facts of klaq-layout tensors (bits, group size, K) that a reader needs."""
    meta = {}
    arch = get_package_arch(pkg.model_type)
    for hf_name, value in pkg.tensors.items():
        if isinstance(value, QuantizedWeight) and ggml_type_for(value) is None:
            base = arch.gguf_name(hf_name).removesuffix(".weight")
            meta[f"layout.{base}"] = f"bits={value.bits},group={value.group_size},k={value.in_features}"
    return meta


def write_package(pkg: Package, path: str | os.PathLike) -> int:
    """Write ``pkg`` to ``path`` atomically; returns the file size in bytes."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".klaq-", suffix=".gguf.part", dir=directory)
    os.close(fd)
    try:
        tensors = list(_gguf_tensors(pkg))
        own = _own_layout_meta(pkg)
        hp = pkg.hparams
        w = GGUFWriter(tmp, hp.arch)
        w.add_name(pkg.name)
        for fname, (suffix, vtype) in _HPARAM_KEYS.items():
            w.add_key_value(f"{hp.arch}.{suffix}", getattr(hp, fname), vtype)
        w.add_uint32(f"{hp.arch}.attention.value_length", hp.head_dim)
        w.add_uint32(f"{hp.arch}.rope.dimension_count", hp.head_dim)
        if hp.sliding_window:
            w.add_uint32(f"{hp.arch}.attention.sliding_window", hp.sliding_window)
        qtypes = [t for _, _, t in tensors if t in FILE_TYPE]
        if qtypes:
            w.add_file_type(FILE_TYPE[max(set(qtypes), key=qtypes.count)])
            w.add_quantization_version(2)
        else:
            w.add_file_type(1)
        pkg.tokenizer.write(w)
        meta = {**pkg.meta, "llama_cpp_compatible": not own, **own}
        for key, value in meta.items():
            _add_meta(w, KLAQ_PREFIX + key, value)
        for name, data, typ in tensors:
            w.add_tensor(name, data, raw_dtype=typ) if typ is not None else w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return os.path.getsize(path)


def _add_meta(w: GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float64(key, value)
    else:
        w.add_string(key, str(value))


# -- reading ---------------------------------------------------------------------------------


@dataclass
class GGUFTensor:
    name: str
    type: T
    shape: tuple[int, ...]  # numpy order: [out, in] for matrices
    data: np.ndarray  # memory-mapped; bytes for quantized types
    nbytes: int


@dataclass
class PackageFile:
    """A GGUF read back: hyper-parameters, tokenizer, klaq metadata and memory-mapped tensors."""

    path: str
    hparams: HParams
    tokenizer: TokenizerFacts
    meta: dict[str, object]
    tensors: dict[str, GGUFTensor]
    fields: dict[str, object]

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_dict(self) -> dict:
        return {"path": self.path, "hparams": asdict(self.hparams), "meta": self.meta}


def read_package(path: str | os.PathLike) -> PackageFile:
    """Open a GGUF file (memory-mapped), with clear errors for what is not a usable package."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise KlaqError(f"no such file: {path}")
    if os.path.isdir(path):
        raise KlaqError(f"{path} is a directory, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise KlaqError(f"{path} is not a GGUF file (magic {magic!r})")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError / IndexError / struct errors on bad bytes
        raise KlaqError(f"{path} is truncated or corrupt: {exc}") from None
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = fields.get("general.architecture")
    if arch not in RUNTIME_ARCHS:
        raise KlaqError(f"unsupported architecture {arch!r} in {path}; the klaq runtime supports: "
                        f"{', '.join(RUNTIME_ARCHS)}")
    try:
        hp = _read_hparams(fields, arch)
    except KeyError as exc:
        raise KlaqError(f"{path} lacks required metadata key {exc.args[0]}") from None
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        tensors[t.name] = GGUFTensor(t.name, T(t.tensor_type), shape, t.data, int(t.n_bytes))
    meta = {k[len(KLAQ_PREFIX):]: v for k, v in fields.items() if k.startswith(KLAQ_PREFIX)}
    tok_fields = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    return PackageFile(path, hp, TokenizerFacts.from_gguf_fields(tok_fields), meta, tensors, fields)


def _read_hparams(fields: dict, arch: str) -> HParams:
    get = lambda suffix: fields[f"{arch}.{suffix}"]  # noqa: E731
    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(fields.get(f"{arch}.attention.key_length", hidden // n_heads))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    return HParams(
        arch=arch, n_layers=int(get("block_count")), hidden=hidden, ffn=int(get("feed_forward_length")),
        n_heads=n_heads, n_kv_heads=int(fields.get(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=head_dim, rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")), context_length=int(get("context_length")),
        vocab_size=int(vocab), sliding_window=int(fields.get(f"{arch}.attention.sliding_window", 0)),
    )
