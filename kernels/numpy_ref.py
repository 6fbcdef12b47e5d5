"""W4A16 matmul in numpy: the exact reference, and the CPU runtime's "int4 resident" fallback.

``reference_matmul`` is the definition every other path is tested against: it dequantizes with
:meth:`QuantizedWeight.dequantize` (the one place that says what a code means) and multiplies in
float64.

``NumpyW4`` keeps the weight packed (two codes per byte, about 4.1 bits per weight resident) and
never materialises the whole float matrix. numpy has no int4 arithmetic, so the cost is the
unpack, not memory traffic (kernels-and-style.md §3.3). The cheapest unpack numpy offers is a
single ``np.take`` of a 256-entry table of 8-byte values: one gather turns each packed byte into
its two float32 codes, already in K order. Rows are unpacked a block at a time (``[64, K]`` float32,
small enough to stay in L2) and multiplied with the activations group by group; the per-group scale
is applied to the small ``[N, groups]`` partial products instead of to every weight, and the
asymmetric offset becomes one ``[N, groups] @ [groups]`` product with the per-group sums of ``x``.
Decode (one token) contracts each block with one ``einsum``; prefill uses a batched matmul per block.
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
    """A 4-bit :class:`QuantizedWeight` kept packed row-major for numpy matmuls.

    Layout: ``packed[n]`` holds row ``n``'s codes in canonical nibble order, padded with zero codes
    to whole groups (and odd groups to an even width); ``x`` is padded with zeros the same way, so
    the padding adds nothing (symmetric: ``(0 - 8) * 0``; asymmetric: ``0 * s * 0``).
    """

    block_rows = 64  # rows unpacked per step: 64 x K float32 stays in L2

    def __init__(self, qweight: QuantizedWeight):
        if qweight.bits != 4:
            raise ValueError("NumpyW4 needs bits=4")
        n, k = qweight.codes.shape
        gs, g = qweight.group_size, qweight.n_groups
        self.out_features, self.in_features, self.n_groups = n, k, g
        self.tail = None
        if g > 1 and k % gs:  # ragged: the short last group is its own (per-channel) weight
            cut = (g - 1) * gs
            z = qweight.zeros
            self.tail = NumpyW4(QuantizedWeight(qweight.codes[:, cut:], qweight.scales[:, -1:],
                                                None if z is None else z[:, -1:], 4, k - cut))
            qweight = QuantizedWeight(qweight.codes[:, :cut], qweight.scales[:, :-1],
                                      None if z is None else z[:, :-1], 4, gs)
            self.n_groups = g = g - 1
        # Each group padded to an even width, so that no byte straddles two groups.
        self._raw_group = gs
        self.group_size = gs + gs % 2
        self.symmetric = qweight.zeros is None
        # Symmetric: the table itself subtracts the zero point 8, so no offset term is needed.
        self.table = _pair_table(8.0 if self.symmetric else 0.0)
        self.scales = qweight.scales  # fp16 [N, G]; widened per call (small next to the codes)
        self.offsets = None if self.symmetric else qweight.offsets()  # fp16 [N, G]
        self.packed = pack_codes(self._pad(qweight.codes), 4)  # [N, G * group_size / 2]

    def _pad(self, a: np.ndarray) -> np.ndarray:
        """``[rows, K]`` -> ``[rows, G * group_size]``: zeros after K and after each odd group."""
        rows, k = a.shape
        raw = np.zeros((rows, self.n_groups * self._raw_group), dtype=a.dtype)
        raw[:, :k] = a
        if self._raw_group == self.group_size:
            return raw
        full = np.zeros((rows, self.n_groups, self.group_size), dtype=a.dtype)
        full[:, :, : self._raw_group] = raw.reshape(rows, self.n_groups, self._raw_group)
        return full.reshape(rows, -1)

    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        tail = 0 if self.tail is None else self.tail.nbytes()
        return self.packed.nbytes + self.scales.nbytes + extra + tail

    def _blocks(self):
        """Yield ``(r0, r1, codes)``: float32 codes ``[rows, G, group_size]`` of each block of rows."""
        n, half = self.packed.shape
        buf = np.empty((min(self.block_rows, n), half), dtype=np.uint64)
        for r0 in range(0, n, self.block_rows):
            blk = self.packed[r0:r0 + self.block_rows]
            codes = np.take(self.table, blk, out=buf[: len(blk)]).view(np.float32)
            yield r0, r0 + len(blk), codes.reshape(len(blk), self.n_groups, self.group_size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x @ W.T`` for ``x`` of shape ``[M, K]`` (or ``[K]``); float32 result."""
        x = np.asarray(x, dtype=np.float32)
        x2 = x.reshape(-1, self.in_features)
        if self.tail is None:
            y = self._full_groups(x2)
        else:
            cut = self.n_groups * self._raw_group
            y = self._full_groups(x2[:, :cut]) + self.tail(x2[:, cut:])
        return y.reshape(*x.shape[:-1], self.out_features)

    def _full_groups(self, x2: np.ndarray) -> np.ndarray:
        m, n = x2.shape[0], self.out_features
        if x2.shape[1] != self.n_groups * self.group_size:
            x2 = self._pad(x2)
        xg = x2.reshape(m, self.n_groups, self.group_size)
        if m == 1:
            part = np.empty((n, self.n_groups), dtype=np.float32)
            for r0, r1, codes in self._blocks():
                np.einsum("rgk,gk->rg", codes, xg[0], out=part[r0:r1])
            y = (part * self.scales).sum(axis=1, dtype=np.float32)[None]
        else:
            y = np.empty((m, n), dtype=np.float32)
            xt = np.ascontiguousarray(xg.transpose(1, 2, 0))  # [G, group_size, M]
            for r0, r1, codes in self._blocks():
                part = np.matmul(codes.transpose(1, 0, 2), xt)  # [G, rows, M]
                y[:, r0:r1] = np.einsum("grm,rg->mr", part, self.scales[r0:r1].astype(np.float32))
        if self.offsets is not None:
            y -= xg.sum(axis=2) @ self.offsets.astype(np.float32).T
        return y
