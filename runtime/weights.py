"""Read a package's GGUF tensors for the runtimes: dense arrays, or canonical 4-bit weights.

``dense``: every llama.cpp block type is dequantized by ``gguf.quants.dequantize`` (the reference
that the format tests pin klaq's own converters against); klaq-layout tensors (2/3-bit, ...) go
through the canonical :class:`QuantizedWeight`.

``load_weight``: 4-bit tensors (Q4_0, Q4_1, klaq layout) as a :class:`QuantizedWeight` for the
int4-resident paths (numpy ``NumpyW4``, Triton, torch), everything else dense. Both runtimes read
weights through here, so they see the same numbers.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from klaq.errors import KlaqError
from klaq.formats.ggml_blocks import BLOCK, GGML_TYPE_SIZE, from_ggml
from klaq.formats.gguf_package import PackageFile
from klaq.formats.qweight import QuantizedWeight, unpack_codes

MAX_KERNEL_GROUP = 256  # the Triton kernels take group sizes 32..256


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


def merge_groups(qw: QuantizedWeight, group_size) -> QuantizedWeight:
    """Per-32 scales (as GGUF blocks store them) back to the package's group size when exact."""
    k = qw.in_features
    gs = int(group_size or 0)
    if gs <= 0 or gs >= k:
        gs = k
    if gs <= qw.group_size or gs % BLOCK or gs > MAX_KERNEL_GROUP or qw.group_size != BLOCK or k % BLOCK:
        return qw
    blk_group = np.arange(k // BLOCK) * BLOCK // gs
    first = np.unique(blk_group, return_index=True)[1]
    s = qw.scales
    if not np.array_equal(s, s[:, first][:, blk_group]):
        return qw
    z = qw.zeros
    if z is not None and not np.array_equal(z, z[:, first][:, blk_group]):
        return qw
    return QuantizedWeight(qw.codes, s[:, first], None if z is None else z[:, first], qw.bits, gs)


def load_weight(pf: PackageFile, name: str) -> QuantizedWeight | np.ndarray:
    """A 4-bit weight as a canonical :class:`QuantizedWeight`, anything else as dense float32.

    Q4_1 blocks that a zero point cannot express exactly (files from other tools store an arbitrary
    ``m``) come back dense, so the result always equals the numpy runtime's weights.
    """
    t = pf.tensors.get(name)
    if t is None:
        base = name.removesuffix(".weight")
        if f"{base}.qweight" in pf.tensors:
            qw = own_layout(pf, base)
            return qw if qw.bits == 4 else qw.dequantize()
        return dense(pf, name)  # raises the usual "lacks tensor" error
    if t.type not in (T.Q4_0, T.Q4_1) or len(t.shape) != 2:
        return dense(pf, name)
    qw = from_ggml(t.data, t.type, t.shape)
    if t.type == T.Q4_1:
        n, k = t.shape
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(n, k // BLOCK, GGML_TYPE_SIZE[T.Q4_1])
        m = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).reshape(n, k // BLOCK)
        if not np.array_equal(m, -qw.offsets()):
            return dense(pf, name)
    return merge_groups(qw, pf.meta.get("group_size"))


def concat_rows(parts: list[QuantizedWeight | np.ndarray]) -> list[QuantizedWeight | np.ndarray]:
    """Stack weights along the output dimension into one when their layouts agree."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return [np.concatenate(parts, axis=0)]
    if all(isinstance(p, QuantizedWeight) for p in parts):
        a = parts[0]
        if all(p.bits == a.bits and p.group_size == a.group_size and p.symmetric == a.symmetric
               and p.in_features == a.in_features for p in parts):
            z = None if a.symmetric else np.concatenate([p.zeros for p in parts])
            return [QuantizedWeight(np.concatenate([p.codes for p in parts]),
                                    np.concatenate([p.scales for p in parts]), z, a.bits, a.group_size)]
    return parts
