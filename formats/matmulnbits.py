"""Canonical :class:`QuantizedWeight` <-> onnxruntime ``com.microsoft::MatMulNBits`` inputs.

MatMulNBits computes ``Y = A @ dequant(B).T`` with ``dequant = (q - zp) * scale`` per block of
``block_size`` input columns (reference/formats.md §3.1):

* ``B``: uint8 ``[N, k_blocks, blob]``, ``blob = block_size * bits / 8``; 4-bit codes run along K,
  byte ``i`` of a block holds element ``2i`` in the low nibble and ``2i + 1`` in the high one
  (klaq's canonical packing, cut into blocks). K is padded to ``k_blocks * block_size``.
* ``scales``: ``[N, k_blocks]`` in the activation type (fp32 here: klaq's fp16 scales, exactly).
* ``zero_points`` (optional, absent = ``2**(bits-1)``): uint8, packed like the codes along the
  block axis, each row starting a new byte: ``[N, ceil(k_blocks * bits / 8)]``.

A klaq group is exactly a MatMulNBits block when the group size is a power of two from 16 to 256;
a ragged last group (K = 576, g = 128) becomes a last block padded with codes equal to its zero
point, i.e. weights that dequantize to exactly 0, so the padding contributes nothing whatever the
kernel does with the (absent) activations past K. Asymmetric weights differ from klaq's dequant in
one rounding only: MatMulNBits forms ``(q - z) * s`` in fp32 where klaq rounds ``z * s`` to fp16
once (``q * s - fp16(z * s)``); the codes, scales and zero points themselves are carried exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klaq.errors import KlaqError
from klaq.formats.qweight import QuantizedWeight, n_groups, pack_codes, unpack_codes

ALLOWED_BITS = (4, 8)
ALLOWED_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass
class MatMulNBitsWeight:
    """The initializers and attributes of one MatMulNBits node."""

    B: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], None = symmetric
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def k_blocks(self) -> int:
        return self.B.shape[1]

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.B.nbytes + self.scales.nbytes + zp

    def attributes(self, accuracy_level: int = 0) -> dict:
        return dict(K=self.K, N=self.N, bits=self.bits, block_size=self.block_size,
                    accuracy_level=int(accuracy_level))


def check_matmulnbits(qw: QuantizedWeight, name: str = "weight") -> None:
    """Raise a :class:`KlaqError` naming the allowed groupings when ``qw`` has no MatMulNBits form."""
    if qw.bits not in ALLOWED_BITS or qw.group_size not in ALLOWED_BLOCK_SIZES:
        raise KlaqError(
            f"{name}: MatMulNBits cannot hold bits={qw.bits}, group_size={qw.group_size} (K={qw.in_features}); "
            f"ONNX packages support bits {' or '.join(map(str, ALLOWED_BITS))} with group sizes "
            f"{', '.join(map(str, ALLOWED_BLOCK_SIZES))} (a ragged last group is fine); "
            "export with --format gguf for other groupings"
        )


def to_matmulnbits(qw: QuantizedWeight, name: str = "weight") -> MatMulNBitsWeight:
    """Pack ``qw`` for MatMulNBits, exactly (see the module docstring)."""
    check_matmulnbits(qw, name)
    n, k = qw.codes.shape
    bs, bits = qw.group_size, qw.bits
    kb = n_groups(k, bs)
    assert kb == qw.n_groups
    codes = qw.codes
    pad = kb * bs - k
    if pad:  # the ragged last block: fill with its zero point -> weights of exactly 0
        zp_last = qw.zero_points()[:, -1:]
        codes = np.concatenate([codes, np.broadcast_to(zp_last, (n, pad))], axis=1)
    blob = bs * bits // 8
    B = pack_codes(codes, bits).reshape(n, kb, blob)
    zp = None if qw.zeros is None else pack_codes(qw.zeros, bits)
    return MatMulNBitsWeight(B=np.ascontiguousarray(B), scales=qw.scales.astype(np.float32), zero_points=zp,
                             K=k, N=n, bits=bits, block_size=bs)


def from_matmulnbits(m: MatMulNBitsWeight) -> QuantizedWeight:
    """Inverse of :func:`to_matmulnbits` (the padding past K is dropped)."""
    n, kb, _ = m.B.shape
    codes = unpack_codes(m.B.reshape(n, -1), m.bits, kb * m.block_size)[:, : m.K]
    zeros = None if m.zero_points is None else unpack_codes(m.zero_points, m.bits, kb)
    scales = m.scales.astype(np.float16)
    if not np.array_equal(scales.astype(np.float32), m.scales):
        raise ValueError("MatMulNBits scales are not fp16-representable: not a klaq weight")
    return QuantizedWeight(codes, scales, zeros, m.bits, m.block_size)


def padded_codes(m: MatMulNBitsWeight) -> np.ndarray:
    """All codes including the padding past K: ``[N, k_blocks * block_size]`` (for tests)."""
    n, kb, _ = m.B.shape
    return unpack_codes(m.B.reshape(n, -1), m.bits, kb * m.block_size)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Stack weights along N (fused QKV / gate-up), or None when their groupings differ."""
    first = weights[0]
    for w in weights[1:]:
        if (w.bits, w.group_size, w.in_features, w.symmetric) != (first.bits, first.group_size,
                                                                  first.in_features, first.symmetric):
            return None
    zeros = None if first.symmetric else np.concatenate([w.zeros for w in weights])
    return QuantizedWeight(np.concatenate([w.codes for w in weights]), np.concatenate([w.scales for w in weights]),
                           zeros, first.bits, first.group_size)


def quantize_symmetric(w: np.ndarray, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest symmetric grid with llama.cpp's signed-max rule (as klaq's RTN).

    Used for the optional quantized head (``quantize_head``), which klaq's algorithms leave in fp16.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    g = n_groups(k, group_size)
    pad = g * group_size - k
    wp = np.pad(w, ((0, 0), (0, pad)), mode="edge").reshape(n, g, group_size)
    half = 1 << (bits - 1)
    idx = np.abs(wp).argmax(axis=2)[..., None]
    signed_max = np.take_along_axis(wp, idx, axis=2)[..., 0]
    scale = (signed_max / -half).astype(np.float16)
    tiny = np.float16(2.0**-24)
    scale = np.where(np.abs(scale) < tiny, tiny, scale).astype(np.float16)
    q = np.rint(wp / scale.astype(np.float32)[..., None]) + half
    codes = np.clip(q, 0, (1 << bits) - 1).astype(np.uint8).reshape(n, g * group_size)[:, :k]
    return QuantizedWeight(codes, scale, None, bits, group_size)
