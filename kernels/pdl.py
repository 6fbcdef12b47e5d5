"""Programmatic dependent launch (PDL) for the decode step's Triton kernels (Hopper and later).

Why: at batch 1 a decode step is a chain of small kernels, and in a CUDA graph each one starts
only when the one before has drained: its launch, its first DRAM round trip and the previous
kernel's tail are dead time (about 2 us of a 6.7 us GEMV at 4096x4096 on an H100, whose plain
read of the same bytes takes 4.6 us). With PDL a kernel launched with ``launch_pdl=True`` may start
while its predecessor still runs: every kernel here first calls :func:`pdl_enter` (the GEMVs
:func:`pdl_enter_rows`), which

1. optionally issues an L2 prefetch of the program's weight rows (weights never depend on an
   earlier kernel, so they may be read before the wait),
2. lets the next kernel launch (``griddepcontrol.launch_dependents``; with the GEMVs' ``LATE`` this
   moves after the main loop, :func:`pdl_trigger`),
3. waits until the previous kernel has completed and its writes are visible (``griddepcontrol.wait``).

Everything else a kernel reads *or writes* comes after step 3, so the order of memory effects is
the same as without PDL (an output buffer the allocator reuses is written only after everything
before has finished). A kernel launched without PDL, or after a kernel that never triggers (cuBLAS,
torch's own ops), waits for its predecessor as usual: ``griddepcontrol`` is then a no-op.

PDL is on by default where it is supported (a CUDA GPU of compute capability 9.0 or later; never
under ``TRITON_INTERPRET=1``, which runs no ``griddepcontrol`` and no PTX); ``KLAQ_PDL=0`` turns it
off. On an H100 it took the SmolLM2-135M decode step from 1248 to 1345 tokens/s, 1376 with the
GEMVs' first words loaded before the wait (``gemv_wide``'s default there), with bit-identical logits
over 256 steps (bench/pdl_decode_check.py); alone, it pays only when both kernels of an edge use it
(GEMVs only: 1164, fused ops only: 1187). A chain of Llama-sized ``gemv_h2`` calls and nothing else
ran 5% slower with it on two of three shapes (bench/pdl_sweep.py); Hopper's M = 1 layers with
K < 8192 and symmetric weights take gluon_gemv.py's ``gemv_reg`` instead (with PDL or without),
whose words and scales are loaded before the wait (``gemv_tma``'s arrive by TMA before it; such a chain
ran 3.70x / 3.11x / 3.08x cuBLAS against gemv_h2's 2.39x / 2.56x / 2.95x). PDL never changes what a
kernel computes; with it, ``gemv_tma`` may launch 4-row x 2 programs instead of 8-row ones
(``config_for``): each row's sum is the same arithmetic in the same order either way
(tests/kernels/test_gluon_gemv.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ON: dict = {}

# Thread t < nrows of the program prefetches row t's segment into L2 (one bulk prefetch per row,
# sm_90's cp.async.bulk.prefetch.L2: 16-byte aligned address, size a multiple of 16, no data back).
_PREFETCH_L2 = tl.constexpr("""{
    .reg .pred p; .reg .u32 t; .reg .u64 a;
    mov.u32 t, %tid.x;
    setp.lt.u32 p, t, $2;
    mad.wide.u32 a, t, $3, $1;
    @p cp.async.bulk.prefetch.L2.global [a], $4;
    mov.u32 $0, 0;
}""")


def pdl_enabled(device=None) -> bool:
    """Whether kernels on ``device`` launch with PDL by default: :func:`pdl_supported`, unless
    ``KLAQ_PDL=0`` (read at each call, so benchmarks can switch)."""
    return os.environ.get("KLAQ_PDL", "1") != "0" and pdl_supported(device)


def pdl_for(device, asked: bool | None = None) -> bool:
    """Whether a launch on ``device`` uses PDL: as ``asked``, else :func:`pdl_enabled`; never where
    it is not supported."""
    return (asked if asked is not None else pdl_enabled(device)) and pdl_supported(device)


def pdl_supported(device=None) -> bool:
    """A CUDA GPU of compute capability 9.0 or later (``griddepcontrol`` is sm_90 PTX), not the
    interpreter."""
    if _INTERPRET:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _ON:
        _ON[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _ON[idx]


def launch_kwargs(pdl: bool) -> dict:
    """``launch_pdl`` for a Triton launch, only when on (older launchers need not know the name)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def prefetch_rows_l2(row_ptr, nrows, row_bytes, seg_bytes):
    """L2 prefetch of ``nrows`` segments of ``seg_bytes`` each, ``row_bytes`` apart from ``row_ptr``
    (threads 0..nrows-1 of the program, one instruction each)."""
    one = tl.zeros([1], dtype=tl.int32)
    tl.inline_asm_elementwise(_PREFETCH_L2, "=r,l,r,r,r", [row_ptr + one, nrows + one, row_bytes + one,
                                                            seg_bytes + one],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (no-ops unless ``PDL``)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def pdl_enter_rows(w_ptr, row0, N, Kw, w0, w1, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
                   PREFETCH: tl.constexpr, LATE: tl.constexpr = False):
    """:func:`pdl_enter` for a GEMV program over weight rows ``row0 .. row0 + BLOCK_N`` (int32
    words ``w0 .. w1`` of each row of a ``[N, Kw]`` matrix): with ``PREFETCH`` those words go to L2
    before the wait, so the program's reads overlap the previous kernel instead of following it.
    ``LATE``: the next kernel is let in later, by :func:`pdl_trigger` after the main loop."""
    if PDL:
        if PREFETCH:
            prefetch_rows_l2(w_ptr + row0.to(tl.int64) * Kw + w0, tl.minimum(N - row0, BLOCK_N), Kw * 4,
                             (w1 - w0) * 4)
        if not LATE:
            gdc_launch_dependents()
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr, LATE: tl.constexpr):
    """The late trigger of :func:`pdl_enter_rows` (``griddepcontrol.launch_dependents``)."""
    if PDL:
        if LATE:
            gdc_launch_dependents()
