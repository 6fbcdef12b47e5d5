"""Kernel tests: run Triton in its CPU interpreter when there is no GPU.

Triton's interpreter must be chosen before Triton is first imported, so it is set here, at
collection time, whenever no CUDA device is present: the same Triton tests then run on CPU.
"""

import os

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
