"""W4A16 matmul: numpy reference + fallback, Triton GEMV/GEMM, torch fallback, and dispatch.

Importing this package needs numpy only; torch and Triton load when their backend is asked for.
"""

from .dispatch import BACKENDS, pick_backend, prepare, triton_available, w4a16_matmul
from .numpy_ref import NumpyW4, reference_matmul

__all__ = ["BACKENDS", "NumpyW4", "pick_backend", "prepare", "reference_matmul", "triton_available",
           "w4a16_matmul"]
