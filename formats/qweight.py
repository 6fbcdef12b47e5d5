"""The one canonical in-memory layout of a quantized linear weight.

Every algorithm produces a :class:`QuantizedWeight`; every file layout (GGUF blocks, ONNX
MatMulNBits, Triton tiles) is an explicit converter from it. Keeping one layout means one place
where "what number does this code stand for" is defined: :meth:`QuantizedWeight.dequantize`.

Layout facts (DESIGN.md, "Quantized weight"):

* ``codes``: unsigned integers in ``[0, 2**bits)``, shape ``[out_features, in_features]``, one
  ``uint8`` per element in memory; :func:`pack_codes` gives the canonical packed bytes.
* ``scales``: fp16 ``[out_features, n_groups]``; groups run along the input dimension, the
  last group may be shorter (576 = 4 x 128 + 64).
* ``zeros``: ``None`` for symmetric (implicit zero point ``2**(bits-1)``), else integer
  ``[out_features, n_groups]``.
* Dequantized value: ``(q - z) * s``. For asymmetric weights the product ``z * s`` is rounded to
  fp16 once (it is the ``m`` of a GGUF Q4_1 block) so that every consumer agrees bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def group_index(in_features: int, group_size: int) -> np.ndarray:
    """Group id of every input column; the ragged last group is simply shorter."""
    return np.arange(in_features) // group_size


@dataclass
class QuantizedWeight:
    codes: np.ndarray  # uint8 [out, in], values in [0, 2**bits)
    scales: np.ndarray  # float16 [out, n_groups]
    zeros: np.ndarray | None  # uint8 [out, n_groups] or None (symmetric)
    bits: int
    group_size: int  # == in_features for per-channel

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        self.codes = np.ascontiguousarray(self.codes, dtype=np.uint8)
        self.scales = np.ascontiguousarray(self.scales, dtype=np.float16)
        if self.zeros is not None:
            self.zeros = np.ascontiguousarray(self.zeros, dtype=np.uint8)
        n, k = self.codes.shape
        g = n_groups(k, self.group_size)
        if self.scales.shape != (n, g):
            raise ValueError(f"scales shape {self.scales.shape} != {(n, g)}")
        if self.zeros is not None and self.zeros.shape != (n, g):
            raise ValueError(f"zeros shape {self.zeros.shape} != {(n, g)}")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def zero_points(self) -> np.ndarray:
        """Integer zero points ``[out, n_groups]``, implicit ones filled in for symmetric."""
        if self.zeros is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)
        return self.zeros

    def offsets(self) -> np.ndarray:
        """fp16 ``z * s`` per group: the single rounding point of the asymmetric dequant."""
        return (self.zero_points().astype(np.float32) * self.scales.astype(np.float32)).astype(np.float16)

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """``(q - z) * s`` as ``[out, in]``; the definition every converter must reproduce."""
        gi = group_index(self.in_features, self.group_size)
        s = self.scales.astype(np.float32)[:, gi]
        if self.zeros is None:
            q = self.codes.astype(np.float32) - float(1 << (self.bits - 1))
            w = q * s
        else:
            w = self.codes.astype(np.float32) * s - self.offsets().astype(np.float32)[:, gi]
        return w.astype(dtype, copy=False)

    def nbytes_packed(self) -> int:
        """Bytes of packed codes + scales + zeros: what a device must read per matmul."""
        n, k = self.codes.shape
        zb = 0 if self.zeros is None else n * packed_row_bytes(self.n_groups, self.bits)
        return n * packed_row_bytes(k, self.bits) + self.scales.nbytes + zb

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes_packed() / self.codes.size


def packed_row_bytes(k: int, bits: int) -> int:
    return -(-(k * bits) // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Canonical packing along K, least significant bits first.

    For 4 bits this is "two codes per byte, element 2i in the low nibble"; for 8 bits one code per
    byte; 2 and 3 bits form the same little-endian bit stream, each row padded to whole bytes.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    n, k = codes.shape
    if bits == 8:
        return codes.copy()
    if bits == 4:
        c = codes if k % 2 == 0 else np.pad(codes, ((0, 0), (0, 1)))
        return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
    bitplanes = ((codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(n, k * bits)
    return np.packbits(bitplanes, axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    packed = np.asarray(packed, dtype=np.uint8)
    n = packed.shape[0]
    if bits == 8:
        return packed[:, :k].copy()
    if bits == 4:
        out = np.empty((n, packed.shape[1] * 2), dtype=np.uint8)
        out[:, 0::2] = packed & 0x0F
        out[:, 1::2] = packed >> 4
        return out[:, :k]
    bitstream = np.unpackbits(packed, axis=1, bitorder="little")[:, : k * bits].reshape(n, k, bits)
    return (bitstream << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
