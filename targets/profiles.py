"""Device profiles as data: what a package must fit into and how fast it can possibly decode.

Figures come from ``shared/reference/formats.md`` §4.1 (datasheet bandwidths; Orin Nano uses the
original 68 GB/s, not the Super mode). ``usable_fraction`` is the share of memory a process can
realistically take after the OS (Orin Nano 8 GB: ~5.2 GB usable).
"""

from __future__ import annotations

from dataclasses import dataclass

from klaq.errors import KlaqError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    memory_gb: float
    usable_fraction: float
    bandwidth_gbs: float
    cpu_arch: str
    gpu_arch: str | None  # e.g. "sm_87"; None = no usable GPU
    has_triton: bool
    default_format: str
    default_backend: str
    default_bits: int
    default_group_size: int
    default_sym: bool

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_gb * self.usable_fraction * 1e9)

    def decode_ceiling(self, bytes_per_token: float) -> float:
        """Roofline: decode tokens/s if every step streams ``bytes_per_token`` at full bandwidth."""
        return self.bandwidth_gbs * 1e9 / bytes_per_token


# name: description, mem GB, usable, GB/s, cpu, gpu, triton, format, backend, bits, group, sym
_ROWS = [
    ("x86-cpu", "generic x86-64 laptop/desktop CPU (AVX2)", 16, 0.6, 50.0, "x86_64", None, False,
     "gguf", "numpy", 4, 32, True),
    ("rpi5", "Raspberry Pi 5, 8 GB, 4x Cortex-A76", 8, 0.75, 17.0, "aarch64", None, False,
     "gguf", "numpy", 4, 32, True),
    ("jetson-orin-nano", "Jetson Orin Nano 8 GB (68 GB/s; 102 GB/s in Super mode)", 8, 0.65, 68.0,
     "aarch64", "sm_87", False, "gguf", "torch", 4, 64, False),
    ("jetson-agx-orin", "Jetson AGX Orin 64 GB", 64, 0.85, 204.8, "aarch64", "sm_87", False,
     "gguf", "torch", 4, 128, False),
    ("cuda", "discrete NVIDIA GPU (H100-class; Triton available)", 80, 0.9, 3350.0, "x86_64",
     "sm_90", True, "gguf", "triton", 4, 128, False),
]

TARGETS: dict[str, Target] = {row[0]: Target(*row) for row in _ROWS}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise KlaqError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None
