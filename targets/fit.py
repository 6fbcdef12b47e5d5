"""The fit check: weights + KV cache at the chosen context + runtime overhead vs usable memory."""

from __future__ import annotations

from dataclasses import dataclass

from klaq.errors import KlaqError
from klaq.targets.profiles import Target

RUNTIME_OVERHEAD_BYTES = 300 * 2**20  # interpreter, libraries, activations, allocator slack


@dataclass(frozen=True)
class FitReport:
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    usable_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, context: int, bytes_per_elem: int = 2) -> int:
    return 2 * n_layers * n_kv_heads * head_dim * context * bytes_per_elem


def check_fit(target: Target, weight_bytes: int, kv_bytes: int) -> FitReport:
    report = FitReport(weight_bytes, kv_bytes, RUNTIME_OVERHEAD_BYTES, target.usable_bytes)
    if not report.fits:
        raise KlaqError(
            f"package needs {report.total_bytes / 1e9:.2f} GB (weights {weight_bytes / 1e9:.2f} GB + "
            f"KV cache {kv_bytes / 1e9:.2f} GB + overhead) but {target.name} has "
            f"{target.usable_bytes / 1e9:.2f} GB usable; use fewer bits or a shorter context",
            exit_code=3,
        )
    return report
