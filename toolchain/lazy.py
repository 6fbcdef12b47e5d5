"""Lazy, block-by-block loading of a Hugging Face model from its safetensors files.

Why: ``from_pretrained`` puts the whole input model in host RAM, although the sequential engine
only ever works on one decoder block. A *lazy* model (:func:`load_lazy`) is built with its
decoder blocks' parameters on the ``meta`` device (no memory) and everything else (embeddings,
final norm, LM head, RoPE buffers) loaded; block tensors are read from the safetensors files
(``safe_open``: only the wanted tensors) by whoever needs them:

- the engine (:func:`klaq.toolchain.engine.quantize_blocks`) loads block ``i`` right before it
  moves it to the compute device (:meth:`LazyWeights.load_module`) and keeps afterwards only what
  is needed (quantized linears dropped with ``keep_weights=False``, norms and biases in fp32);
- RTN without calibration and the package builder read one tensor at a time (:func:`materialized`);
- a full forward (the FP16 reference perplexity of an export) runs under :func:`streamed`, which
  loads each block for its forward and drops it after.

Every tensor is cast to the dtype ``from_pretrained`` would have given it (the skeleton's), so a
lazy model's numbers are bit-identical to a fully loaded one's. All names and shapes are checked
against the file headers before any work starts: a missing tensor fails in seconds, not in block
17 of an hour-long GPTQ run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from klaq.errors import KlaqError
from klaq.toolchain.archs import QUANT_ARCHS

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ATTR = "_klaq_lazy"  # the LazyWeights of a lazy model, as an attribute of the model


def safetensors_files(model_dir: str | Path) -> dict[str, Path] | None:
    """``{tensor name: file}`` of an HF directory (one file or sharded with an index), or ``None``
    when it holds no safetensors (then only the full-load path applies)."""
    d = Path(model_dir)
    if (d / INDEX).is_file():
        try:
            weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise KlaqError(f"{d / INDEX} is not a safetensors index (no weight_map): {exc}") from None
        return {name: d / f for name, f in weight_map.items()}
    if (d / SINGLE).is_file():
        return {name: d / SINGLE for name in _header(d / SINGLE)}
    return None


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of one safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types, OSError for a missing file
        raise KlaqError(f"cannot read safetensors file {path}: {exc}") from None


class LazyWeights:
    """Where a lazy model's unloaded parameters are on disk, and the dtype each one loads in.

    ``layers``: dotted path of the decoder blocks (the unloaded part). ``keys``: parameter name
    (as ``named_parameters`` gives it) -> ``(file, name in the file)``; tied parameters are found
    under any of their names. ``dtypes``: the dtype the parameter is loaded in
    (``from_pretrained``'s), before any cast to the parameter's current dtype.
    """

    def __init__(self, source: str, layers: str, keys: dict[str, tuple[Path, str]], dtypes: dict[str, torch.dtype]):
        self.source = source
        self.layers = layers
        self.keys = keys
        self.dtypes = dtypes

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors from disk, in their load dtypes; each file opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.keys[name][0]].append(name)
        out = {}
        for path, group in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in group:
                        out[name] = f.get_tensor(self.keys[name][1]).to(self.dtypes[name])
            except Exception as exc:
                raise KlaqError(f"cannot read {', '.join(group[:3])} from {path}: {exc}") from None
        return out

    def load_module(self, module: torch.nn.Module, prefix: str, skip: str | None = None) -> list[tuple]:
        """Give every unloaded parameter of ``module`` (full names start with ``prefix``; those
        starting with ``skip`` left out) its numbers, in the parameter's current dtype (fp32 under
        ``reference_perplexity``). Returns ``(unloaded, loaded)`` parameter pairs, for :meth:`release`."""
        params = {f"{prefix}{n}": p for n, p in module.named_parameters()
                  if p.is_meta and not (skip and f"{prefix}{n}".startswith(skip))}
        tensors = self.read(list(params))
        pairs = [(p, torch.nn.Parameter(tensors[n].to(p.dtype), requires_grad=p.requires_grad))
                 for n, p in params.items()]
        _swap(module, pairs)
        return pairs

    @staticmethod
    def release(module: torch.nn.Module, pairs) -> None:
        """Undo :meth:`load_module`: the very ``meta`` parameters it replaced go back (so that
        whoever holds them, a dtype restore in ``reference_perplexity`` say, still holds the
        model's)."""
        _swap(module, [(new, old) for old, new in pairs])


def _swap(module: torch.nn.Module, pairs) -> None:
    """Put ``new`` wherever ``module`` holds ``old``, for each ``(old, new)``: a ``meta``
    parameter cannot take real numbers in place (``.data`` may not change between meta and real
    storage), and a tied parameter (embeddings and head) is held by several modules."""
    by_id = {id(old): new for old, new in pairs}
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and id(p) in by_id:
                m._parameters[k] = by_id[id(p)]


def lazy_weights(model) -> LazyWeights | None:
    """The :class:`LazyWeights` of a lazy model, ``None`` for a fully loaded one."""
    return getattr(model, _ATTR, None)


def materialized(model, name: str, p: torch.Tensor) -> torch.Tensor:
    """Parameter ``name`` of ``model`` with numbers: ``p`` itself when loaded, else read from disk
    (one tensor, not kept by the model)."""
    if not p.is_meta:
        return p
    lazy = lazy_weights(model)
    if lazy is None or name not in lazy.keys:
        raise KlaqError(f"parameter {name} of the model was never loaded")
    return lazy.read([name])[name].to(p.dtype)


@contextmanager
def streamed(model):
    """Let a full forward run on a lazy model: each decoder block is loaded right
    before its forward and dropped right after, so memory stays one block. A no-op for a fully
    loaded model. The numbers are the fully loaded model's (same dtypes, same ops)."""
    lazy = lazy_weights(model)
    if lazy is None:
        yield
        return
    handles, loaded = [], []  # loaded: (block, pairs) of the block in its forward

    def load(block, args, prefix):
        loaded.append((block, lazy.load_module(block, prefix)))

    def drop(block, args, out):
        while loaded:
            LazyWeights.release(*loaded.pop())

    for i, block in enumerate(model.get_submodule(lazy.layers)):
        prefix = f"{lazy.layers}.{i}."
        handles.append(block.register_forward_pre_hook(lambda mod, args, p=prefix: load(mod, args, p)))
        handles.append(block.register_forward_hook(drop))
    try:
        yield
    finally:
        drop(None, None, None)  # a forward that raised
        for h in handles:
            h.remove()


def _resolve_keys(model, files: dict[str, Path], source: str) -> dict[str, tuple[Path, str]]:
    """Each parameter's ``(file, name in file)``, checked against the headers (names and shapes)."""
    aliases: dict[int, list[str]] = defaultdict(list)  # tied parameters have several names
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise KlaqError(f"{source}: safetensors file {path.name} (named in {INDEX}) is missing")
        shapes.update(_header(path))
    keys, missing = {}, []
    for name, p in model.named_parameters():
        found = next((n for n in aliases[id(p)] if n in files and n in shapes), None)
        if found is None:
            missing.append(name)
        elif shapes[found] != tuple(p.shape):
            raise KlaqError(f"{source}: tensor {found} has shape {list(shapes[found])} in {files[found].name}, "
                            f"the model's config wants {list(p.shape)}")
        else:
            keys[name] = (files[found], found)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KlaqError(f"{source}: the safetensors files lack {len(missing)} tensor(s) of the model: "
                        f"{', '.join(missing[:5])}{more}")
    return keys


def lazy_applies(path: str) -> bool:
    """Whether :func:`load_lazy` can load ``path``: a local HF directory with safetensors, of an
    architecture whose decoder blocks the engine knows (``toolchain/archs.py``)."""
    from transformers import AutoConfig

    if not Path(path).is_dir() or safetensors_files(path) is None:
        return False
    return AutoConfig.from_pretrained(path).model_type in QUANT_ARCHS


def load_lazy(path: str, dtype: torch.dtype):
    """The model of HF directory ``path`` with its decoder blocks unloaded (``meta``).

    Built like ``from_pretrained(path, dtype=dtype)`` (same config, dtypes, RoPE buffers, tied
    embeddings, eval mode), but only the parameters outside the blocks are read now.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = safetensors_files(path)
    if files is None:
        raise KlaqError(f"{path} holds no safetensors ({SINGLE} or {INDEX}); lazy loading needs them")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in QUANT_ARCHS:
        raise KlaqError(f"lazy loading does not know where {config.model_type!r}'s decoder blocks are "
                        "(toolchain/archs.py); load it fully")
    layers = QUANT_ARCHS[config.model_type].layers
    config.name_or_path = path
    with init_empty_weights(include_buffers=False):  # buffers (RoPE inv_freq) computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does; from_config leaves meta parameters untied
    model.eval()
    keys = _resolve_keys(model, files, path)
    lazy = LazyWeights(path, layers, keys, {n: p.dtype for n, p in model.named_parameters()})
    setattr(model, _ATTR, lazy)
    lazy.load_module(model, "", skip=f"{layers}.")
    return model
