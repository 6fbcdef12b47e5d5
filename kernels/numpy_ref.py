"""W4A16 matmul in numpy: the exact reference, and the CPU runtime's "int4 resident" fallback.

``reference_matmul`` is the definition every other path is tested against: it dequantizes with
:meth:`QuantizedWeight.dequantize` (the one place that says what a code means) and multiplies in
float64.

``NumpyW4`` keeps the weight packed (two codes per byte, about 4.1 bits per weight resident) and
never materialises the whole float matrix. numpy has no int4 arithmetic, so the cost is the
unpack, not memory traffic (kernels-and-style.md §3.3). The cheapest unpack numpy offers is a
single ``np.take`` of a 256-entry table of 8-byte values: one gather turns each packed byte into
its two float32 codes, already in K order. Codes are unpacked a block of groups at a time (about
512 KB of float32, cache sized) and multiplied with BLAS; the per-group scale is applied to the
small ``[groups, N, M]`` partial products instead of to every weight, and the asymmetric offset
becomes one extra ``[N, groups] @ [groups, M]`` product with the per-group sums of ``x``.
"""

from __future__ import annotations

import numpy as np

from klaq.formats.qweight import QuantizedWeight, pack_codes


def reference_matmul(x: np.ndarray, qweight: QuantizedWeight) -> np.ndarray:
    """``x @ W.T`` in float64 with ``W = qweight.dequantize()``; ``x`` is ``[M, K]``."""
    x = np.asarray(x, dtype=np.float64)
    return x @ qweight.dequantize(np.float64).T


def _pair_table(bias: float) -> np.ndarray:
    """256 uint64 entries: byte ``b`` -> two float32 ``(b & 15) - bias, (b >> 4) - bias``."""
    b = np.arange(256)
    pairs = np.stack([b & 15, b >> 4], axis=-1).astype(np.float32) - np.float32(bias)
    return pairs.view(np.uint64).ravel()


class NumpyW4:
    """A 4-bit :class:`QuantizedWeight` kept packed in group-major blocks for numpy matmuls.

    Layout: ``packed[g, n, :]`` holds the ``group_size`` codes of group ``g`` of row ``n`` (two per
    byte, canonical nibble order); the ragged last group, if any, sits in ``tail``.
    """

    block_bytes = 1 << 19  # float32 bytes unpacked per BLAS call: stays in L2

    def __init__(self, qweight: QuantizedWeight):
        if qweight.bits != 4 or qweight.group_size % 2:
            raise ValueError("NumpyW4 needs bits=4 and an even group size")
        n, k = qweight.codes.shape
        gs = qweight.group_size
        self.out_features, self.in_features, self.group_size = n, k, gs
        self.n_full = k // gs
        self.symmetric = qweight.zeros is None
        # Symmetric: the table itself subtracts the zero point 8, so no offset term is needed.
        self.table = _pair_table(8.0 if self.symmetric else 0.0)
        self.scales = np.ascontiguousarray(qweight.scales.astype(np.float32).T)  # [G, N]
        self.offsets = None if self.symmetric else qweight.offsets().astype(np.float32)  # [N, G]
        full = qweight.codes[:, : self.n_full * gs]
        self.packed = np.ascontiguousarray(
            pack_codes(full, 4).reshape(n, self.n_full, gs // 2).transpose(1, 0, 2))
        self.tail_width = k - self.n_full * gs
        if self.tail_width:
            # An odd tail is padded by pack_codes; x is padded with zeros there, so it adds 0.
            self.tail = pack_codes(qweight.codes[:, self.n_full * gs:], 4)[None]  # [1, N, ceil(r/2)]

    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        tail = self.tail.nbytes if self.tail_width else 0
        return self.packed.nbytes + tail + self.scales.nbytes + extra

    def _partials(self, packed: np.ndarray, xg: np.ndarray) -> np.ndarray:
        """``[g, N, M]`` products of the raw codes of ``packed`` groups with ``xg [g, w, M]``."""
        g, n, half = packed.shape
        step = max(1, self.block_bytes // (n * half * 8))
        out = np.empty((g, n, xg.shape[2]), dtype=np.float32)
        buf = np.empty((min(step, g), n, half), dtype=np.uint64)
        for g0 in range(0, g, step):
            blk = packed[g0:g0 + step]
            codes = np.take(self.table, blk, out=buf[: len(blk)]).view(np.float32)
            np.matmul(codes.reshape(len(blk), n, 2 * half), xg[g0:g0 + step], out=out[g0:g0 + step])
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T`` for ``x`` of shape ``[M, K]`` (or ``[K]``); float32 result."""
        x = np.asarray(x, dtype=np.float32)
        vec = x.ndim == 1
        x2 = x.reshape(-1, self.in_features)
        m, gs, nf = x2.shape[0], self.group_size, self.n_full
        xg = np.ascontiguousarray(x2[:, : nf * gs].reshape(m, nf, gs).transpose(1, 2, 0))  # [G, gs, M]
        part = self._partials(self.packed, xg)  # [G, N, M]
        y = np.einsum("gn,gnm->mn", self.scales[:nf], part)
        if self.tail_width:
            xt = x2[:, nf * gs:]
            xt = np.pad(xt, ((0, 0), (0, 2 * self.tail.shape[2] - self.tail_width))).T[None]
            y += self.scales[nf] * self._partials(self.tail, np.ascontiguousarray(xt))[0].T
        if self.offsets is not None:
            pad = (-self.in_features) % gs
            xsum = np.pad(x2, ((0, 0), (0, pad))).reshape(m, -1, gs).sum(axis=2)  # [M, G]
            y -= xsum @ self.offsets.T
        return y[0] if vec else y.reshape(*x.shape[:-1], self.out_features)
