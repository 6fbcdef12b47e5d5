"""Turn a package's GGUF tensors into arrays the numpy decoder multiplies with.

Every llama.cpp block type is dequantized by ``gguf.quants.dequantize`` (the reference that the
format tests pin klaq's own converters against); klaq-layout tensors (2/3-bit, ...) go through the
canonical :class:`QuantizedWeight`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from klaq.errors import KlaqError
from klaq.formats.gguf_package import PackageFile
from klaq.formats.qweight import QuantizedWeight, unpack_codes


def own_layout(pf: PackageFile, base: str) -> QuantizedWeight:
    """Rebuild a klaq-layout tensor from ``<base>.qweight/.scales/.zeros`` + its layout key."""
    facts = dict(kv.split("=") for kv in str(pf.meta[f"layout.{base}"]).split(","))
    bits, group, k = int(facts["bits"]), int(facts["group"]), int(facts["k"])
    packed = np.asarray(pf.tensors[f"{base}.qweight"].data).view(np.uint8)
    scales = np.asarray(pf.tensors[f"{base}.scales"].data, dtype=np.float16)
    zeros = pf.tensors.get(f"{base}.zeros")
    z = None if zeros is None else np.asarray(zeros.data).view(np.uint8)
    return QuantizedWeight(unpack_codes(packed, bits, k), scales, z, bits, group)


def dense(pf: PackageFile, name: str, dtype=np.float32) -> np.ndarray:
    """The tensor ``name`` (``...weight``) as a dense array in numpy order ([out, in])."""
    t = pf.tensors.get(name)
    if t is None:
        base = name.removesuffix(".weight")
        if f"{base}.qweight" in pf.tensors:
            return own_layout(pf, base).dequantize(dtype)
        raise KlaqError(f"{pf.path} lacks tensor {name}")
    if t.type in (T.F32, T.F16):
        return np.asarray(t.data).reshape(t.shape).astype(dtype)
    # BF16 and every block type (Q4_0 ... Q6_K, IQ*): gguf-py's reference decoder
    return dequantize(np.asarray(t.data), t.type).reshape(t.shape).astype(dtype, copy=False)
