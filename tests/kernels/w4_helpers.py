"""Shared helpers for the kernel tests (a plain module: conftest names clash across folders)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch

from klaq.formats.qweight import QuantizedWeight

HAS_CUDA = torch.cuda.is_available()  # the root conftest picks Triton's interpreter otherwise


def random_qweight(n: int, k: int, group_size: int, asym: bool, seed: int = 0) -> QuantizedWeight:
    """Uniform codes, positive fp16 scales, and (asym) random integer zero points."""
    rng = np.random.default_rng(seed)
    g = -(-k // group_size)
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scales = (rng.random((n, g)) * 0.02 + 0.001).astype(np.float16)
    zeros = rng.integers(0, 16, (n, g), dtype=np.uint8) if asym else None
    return QuantizedWeight(codes, scales, zeros, 4, group_size)


def check_cuda_kernel(fn, n: int, k: int, group_size: int, asym: bool, m: int, seed: int = 0, **config):
    """``fn(x, w, **config)`` (an fp16 CUDA kernel) against the numpy reference for a random weight
    and ``x [m, k]``; returns the repacked weight, x on the GPU and y."""
    from klaq.kernels.numpy_ref import reference_matmul
    from klaq.kernels.triton_w4a16 import repack

    qw = random_qweight(n, k, group_size, asym, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).half()
    w = repack(qw, "cuda")
    y = fn(x.cuda(), w, **config)
    assert y.shape == (m, n) and y.dtype == torch.float16
    err = rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw))
    assert err < 2e-3, err
    return w, x.cuda(), y


def rel_err(y, ref) -> float:
    y = np.asarray(y, dtype=np.float64)
    assert np.isfinite(y).all()
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def falls_back_once(monkeypatch, slot: str, kernel: str, ok: str, qw: QuantizedWeight, x: torch.Tensor,
                    match: str) -> None:
    """An optional Gluon kernel that fails to build or launch (another Triton's Gluon API):
    ``triton_w4a16.<slot>`` holds a module whose ``kernel`` raises, and ``triton_w4a16.<ok>`` admits
    it while the slot holds it. The call must warn (``match``), give the fallback's exact-enough
    result, and a second call must not try the kernel again."""
    import pytest

    from klaq.kernels import triton_w4a16
    from klaq.kernels.numpy_ref import reference_matmul

    calls = []

    def fail(*args, **kwargs):
        calls.append(kernel)
        raise RuntimeError("no such Gluon op")

    monkeypatch.setattr(triton_w4a16, slot, [SimpleNamespace(**{kernel: fail})])
    monkeypatch.setattr(triton_w4a16, ok, lambda *args: getattr(triton_w4a16, slot)[0] is not None)
    device = "cuda" if HAS_CUDA else "cpu"
    w = triton_w4a16.repack(qw, device)
    with pytest.warns(RuntimeWarning, match=match):
        y = triton_w4a16.w4a16_matmul(x.to(device), w)
    assert rel_err(y.float().cpu().numpy(), reference_matmul(x.float().numpy(), qw)) < 2e-3
    triton_w4a16.w4a16_matmul(x.to(device), w)
    assert len(calls) == 1 and getattr(triton_w4a16, slot) == [None]


# -- compiled for sm_90 on any machine ---------------------------------------------------------
# In a subprocess: without a GPU the root conftest turns on Triton's interpreter, whose kernels
# cannot be compiled; the child runs without it, builds PTX for sm_90 and sends it back as JSON.

W4_SIG = dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", o_ptr="*fp16", y_ptr="*fp16", ws_ptr="*fp32",
              cnt_ptr="*i32", M="i32", N="i32", K="i32", Kw="i32", stride_xm="i32", stride_ym="i32",
              group_size="i32", tiles_per_split="i32", n_tiles="i32")  # triton_w4a16's kernels
_CHILD = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from klaq.kernels import triton_w4a16
from klaq.runtime import triton_ops
out = {}
for key, module, name, sig, consts in json.loads(sys.stdin.read()):
    fn = getattr({"w4": triton_w4a16, "ops": triton_ops}[module], name)
    sig = dict(sig, **{k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_stages=1))
    out[key] = k.asm["ptx"]
print(json.dumps(out))
"""


def without_interpreter(code: str, stdin: str = "") -> str:
    """Run ``python -c code`` without ``TRITON_INTERPRET`` and return what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def ptx_for_sm90(jobs: list) -> dict:
    """PTX for sm_90 by job key; a job is ``(key, module, kernel, signature, constexprs)`` with module
    ``"w4"`` (klaq.kernels.triton_w4a16) or ``"ops"`` (klaq.runtime.triton_ops)."""
    return json.loads(without_interpreter(_CHILD, json.dumps(jobs)).strip().splitlines()[-1])


def barrier_between(ptx_lines: list, first: int, last: int) -> bool:
    """Whether a CTA barrier lies strictly between PTX lines ``first`` and ``last``."""
    return any("bar.sync" in s or "barrier.sync" in s for s in ptx_lines[first + 1:last])
