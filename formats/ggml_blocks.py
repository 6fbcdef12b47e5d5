"""Explicit converters between :class:`QuantizedWeight` and llama.cpp block types.

Which canonical quantizations have an exact llama.cpp block (formats.md §1.6):

=========================  =====  ================================
canonical                  ggml   block bytes (32 elements)
=========================  =====  ================================
4-bit symmetric            Q4_0   d:f16, 16 bytes split-half nibbles
4-bit asymmetric           Q4_1   d:f16 = s, m:f16 = -fp16(z*s), nibbles
8-bit symmetric            Q8_0   d:f16, 32 x int8 (code - 128)
=========================  =====  ================================

A group size that is a multiple of 32 maps exactly by repeating its scale per 32-block; so does a
ragged last group as long as K is a multiple of 32. Everything else (2/3 bits, asymmetric 8-bit,
K not a multiple of 32, groups smaller than 32) uses klaq's own layout: ``<name>.qweight`` (packed
codes, :func:`pack_codes`), ``<name>.scales`` and ``<name>.zeros`` tensors, which llama.cpp
cannot load.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from klaq.formats.qweight import QuantizedWeight, group_index

BLOCK = 32
GGML_TYPE_SIZE = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34}


def ggml_type_for(qw: QuantizedWeight) -> T | None:
    """The llama.cpp block type that carries ``qw`` exactly, or None."""
    k = qw.in_features
    if k % BLOCK or (qw.group_size % BLOCK and qw.group_size < k):
        return None
    if qw.bits == 4:
        return T.Q4_0 if qw.symmetric else T.Q4_1
    if qw.bits == 8 and qw.symmetric:
        return T.Q8_0
    return None


def _per_block(a: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    """Per-group values ``[N, G]`` -> one per 32-block ``[N, K/32]``."""
    gi = group_index(qw.in_features, qw.group_size)[::BLOCK]
    return np.ascontiguousarray(a[:, gi])


def _split_half_nibbles(codes: np.ndarray) -> np.ndarray:
    """[N, K] codes -> [N, K/32, 16] bytes: byte j = q[j] | q[j+16] << 4 within each block."""
    n, k = codes.shape
    c = codes.reshape(n, k // BLOCK, BLOCK)
    return (c[:, :, :16] | (c[:, :, 16:] << 4)).astype(np.uint8)


def to_ggml(qw: QuantizedWeight) -> tuple[np.ndarray, T]:
    """Encode as llama.cpp blocks: uint8 ``[N, K/32 * type_size]`` plus its type."""
    typ = ggml_type_for(qw)
    if typ is None:
        raise ValueError(f"no llama.cpp block type for bits={qw.bits} sym={qw.symmetric} "
                         f"group={qw.group_size} K={qw.in_features}")
    n, k = qw.codes.shape
    nb = k // BLOCK
    d = _per_block(qw.scales, qw).view(np.uint8).reshape(n, nb, 2)
    if typ == T.Q4_0:
        parts = [d, _split_half_nibbles(qw.codes)]
    elif typ == T.Q4_1:
        m = (-_per_block(qw.offsets(), qw)).view(np.uint8).reshape(n, nb, 2)
        parts = [d, m, _split_half_nibbles(qw.codes)]
    else:  # Q8_0
        q = (qw.codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8).reshape(n, nb, BLOCK)
        parts = [d, q]
    blocks = np.concatenate(parts, axis=2)
    return blocks.reshape(n, nb * GGML_TYPE_SIZE[typ]), typ


def from_ggml(data: np.ndarray, typ: T, shape: tuple[int, int]) -> QuantizedWeight:
    """Decode Q4_0 / Q4_1 / Q8_0 blocks into the canonical layout with group size 32."""
    n, k = shape
    nb = k // BLOCK
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, nb, GGML_TYPE_SIZE[typ])
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16).reshape(n, nb)
    if typ == T.Q8_0:
        q = blocks[:, :, 2:].view(np.int8).astype(np.int16) + 128
        return QuantizedWeight(q.reshape(n, k).astype(np.uint8), d, None, 8, BLOCK)
    qs = blocks[:, :, 2:] if typ == T.Q4_0 else blocks[:, :, 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k)
    if typ == T.Q4_0:
        return QuantizedWeight(codes, d, None, 4, BLOCK)
    # Q4_1: m = -fp16(z*s). Files written by other tools have an arbitrary m, which a zero point
    # cannot always express; we recover the nearest integer z and the caller can check exactness.
    m = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16).reshape(n, nb).astype(np.float32)
    s = d.astype(np.float32)
    z = np.clip(np.rint(-m / np.where(s == 0, 1, s)), 0, 255).astype(np.uint8)
    return QuantizedWeight(codes, d, z, 4, BLOCK)
