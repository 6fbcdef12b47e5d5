"""W4A16 in plain torch: dequantize, then one dense matmul.

For CUDA devices without Triton (Jetson images often lack it) and for CPU torch. The weight stays
packed on the device (canonical bytes, two codes per byte); each call unpacks it with a few
elementwise ops and hands the dense weight to cuBLAS / the CPU BLAS. With ``cache=True`` the
dequantized weight is kept after the first call: fastest, but it costs the full fp16 weight in
memory, which is what int4 was meant to save, so it is off by default.
"""

from __future__ import annotations

import torch

from klaq.formats.qweight import QuantizedWeight, pack_codes


class TorchW4:
    """A 4-bit :class:`QuantizedWeight` on a torch device, applied as ``x @ W.T``."""

    def __init__(self, qweight: QuantizedWeight, device="cpu", cache: bool = False):
        if qweight.bits != 4:
            raise ValueError("TorchW4 needs bits=4")
        n, k = qweight.codes.shape
        gs, g = qweight.group_size, qweight.n_groups
        self.out_features, self.in_features, self.group_size = n, k, gs
        self.device = torch.device(device)
        self.packed = torch.from_numpy(pack_codes(qweight.codes, 4)).to(self.device)  # uint8 [N, ceil(K/2)]
        self.scales = torch.from_numpy(qweight.scales).to(self.device)  # fp16 [N, G]
        self.offsets = torch.from_numpy(qweight.offsets()).to(self.device)  # fp16 [N, G]: fp16(z * s)
        self.padded_k = g * gs
        self.cache = cache
        self._dense: torch.Tensor | None = None

    def dequantize(self, dtype=torch.float16) -> torch.Tensor:
        """Dense ``[N, K]`` weight: ``q * s - fp16(z * s)`` in fp32, rounded once to ``dtype``."""
        n, gs = self.out_features, self.group_size
        p = self.packed
        q = torch.stack((p & 15, p >> 4), dim=-1).reshape(n, -1)
        q = torch.nn.functional.pad(q, (0, self.padded_k - q.shape[1]))[:, : self.padded_k]
        q = q.view(n, -1, gs).float()
        w = q * self.scales.float()[:, :, None] - self.offsets.float()[:, :, None]
        return w.reshape(n, -1)[:, : self.in_features].to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None and self._dense.dtype == x.dtype:
            w = self._dense
        else:
            w = self.dequantize(x.dtype)
            if self.cache:
                self._dense = w
        return torch.nn.functional.linear(x, w)
