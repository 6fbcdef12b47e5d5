"""GPTQ's column loop as one Triton kernel per run of columns that share their groups' grids.

Why: the loop in :func:`klaq.toolchain.algorithms.gptq.gptq_quantize` quantizes one column at a
time, a dozen small torch ops per column; on a GPU those are launch-bound (an 8B-shaped block has
39k columns: ~17 s per block on an H100, most of it launch overhead). Rows are independent in that
loop (a row's updates only involve that row and the shared Cholesky factor ``U``), so each program
takes ``BLOCK_R`` rows of the current lazy block, keeps them in registers, and walks the columns
``a .. b-1`` itself: round against the column's group grid, error ``e = (w - dq) / U_ii``, update
``w -= e * U_i,:`` (``U`` is upper triangular, so columns left of ``i`` see a zero). One launch
replaces ``(b - a)`` x ~12 launches.

Arithmetic is the torch loop's: the same fp32 division and round-half-even, the grid's
fp16 offsets for asymmetric weights. Under ``TRITON_INTERPRET=1`` (CPU tests) the results equal
the torch loop bit for bit; on a GPU the compiler may fuse ``w - e * u`` into one FMA, so a code
can differ where a value sits on a rounding boundary (tests bound that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rint(x):
    """Round half to even, exactly, for ``|x| < 2**22``: adding 1.5 * 2**23 leaves no fraction bits."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _gptq_columns(w_ptr, u_ptr, s_ptr, z_ptr, g_ptr, q_ptr, e_ptr, N, B, G, stride_u, a, b, maxq,
                  SYM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_B)
    rmask = rows < N
    tile = rows[:, None] * B + cols[None, :]
    inside = rmask[:, None] & (cols < B)[None, :]
    w = tl.load(w_ptr + tile, mask=inside, other=0.0)
    qt = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    et = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    lim = maxq + 2.0  # clamping before rint changes nothing after the final clamp; keeps rint exact
    for i in range(a, b):
        sel = cols[None, :] == i
        col = tl.sum(tl.where(sel, w, 0.0), axis=1)  # one non-zero term: exact
        g = tl.load(g_ptr + i)
        s = tl.load(s_ptr + rows * G + g, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows * G + g, mask=rmask, other=0.0)  # zero (sym) or fp16(z*s) (asym)
        if SYM:
            r = _rint(tl.minimum(tl.maximum(col / s, -lim), lim))
            q = tl.minimum(tl.maximum(r + z, 0.0), maxq)
            dq = (q - z) * s
        else:
            r = _rint(tl.minimum(tl.maximum((col + z) / s, -lim), lim))
            q = tl.minimum(tl.maximum(r, 0.0), maxq)
            dq = q * s - z
        d = tl.load(u_ptr + i * stride_u + i)
        e = (col - dq) / d
        urow = tl.load(u_ptr + i * stride_u + cols, mask=cols < B, other=0.0)
        w = w - e[:, None] * urow[None, :]
        qt = tl.where(sel, q[:, None], qt)
        et = tl.where(sel, e[:, None], et)
    done = inside & (cols >= a)[None, :] & (cols < b)[None, :]
    tl.store(w_ptr + tile, w, mask=inside)
    tl.store(q_ptr + tile, qt, mask=done)
    tl.store(e_ptr + tile, et, mask=done)


def gptq_columns(w1: torch.Tensor, u1: torch.Tensor, scale: torch.Tensor, zterm: torch.Tensor,
                 gcols: torch.Tensor, codes1: torch.Tensor, err1: torch.Tensor, a: int, b: int, maxq: int,
                 sym: bool, block_r: int = 16) -> None:
    """Quantize columns ``a .. b-1`` of the lazy block ``w1`` [N, B] in place.

    ``u1``: the block's [B, B] slice of the upper Cholesky factor; ``scale``/``zterm`` [N, G] fp32
    (``zterm`` = zero points if ``sym`` else the fp16 offsets ``z*s``); ``gcols`` int32 [B]: each
    column's group. Writes codes into ``codes1`` and scaled errors into ``err1`` (both [N, B]).
    """
    n, bw = w1.shape
    assert w1.is_contiguous() and codes1.is_contiguous() and err1.is_contiguous() and u1.stride(1) == 1
    grid = (triton.cdiv(n, block_r),)
    _gptq_columns[grid](w1, u1, scale, zterm, gcols, codes1, err1, n, bw, scale.shape[1], u1.stride(0), a, b,
                        float(maxq), SYM=sym, BLOCK_R=block_r, BLOCK_B=triton.next_power_of_2(bw),
                        num_warps=4)
