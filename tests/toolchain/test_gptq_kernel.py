"""GPTQ's column loops against the torch loop: numpy (the CPU default) bit-exact, Triton bit-exact under
the interpreter (CI) and on a GPU equal up to the rare code that an FMA moves across a rounding
boundary."""

import pytest
import torch

from klaq.toolchain.algorithms.gptq import gptq_quantize
from klaq.toolchain.algorithms.grid import QuantSpec

CASES = [  # (n, k, group, sym, act_order, bits): ragged groups, per-channel, g256 lazy blocks, act-order
    (24, 160, 32, False, False, 4), (24, 160, 64, True, False, 4), (19, 300, 128, False, False, 4),
    (24, 96, -1, False, False, 4), (24, 160, 32, True, True, 4), (40, 512, 256, False, False, 4),
    (24, 160, 32, False, False, 3), (24, 128, 64, True, False, 8), (24, 130, 64, False, False, 2),
]


def _problem(n, k, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(4 * k, k, generator=g) * torch.rand(k, generator=g) * 3
    x[:, 5] = 0  # a dead input column
    return w.to(device), (x.T @ x).to(device)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_loop_equals_torch_loop(case):
    n, k, group, sym, act_order, bits = case
    w, h = _problem(n, k, seed=k + n)
    spec = QuantSpec(bits, group, sym)
    q_ref, d_ref, i_ref = gptq_quantize(w, h, spec, act_order=act_order, kernel="torch")
    q_tri, d_tri, i_tri = gptq_quantize(w, h, spec, act_order=act_order, kernel="triton")
    assert (q_tri.codes == q_ref.codes).all()
    assert (q_tri.scales == q_ref.scales).all()
    assert (q_tri.zeros is None and q_ref.zeros is None) or (q_tri.zeros == q_ref.zeros).all()
    assert torch.equal(d_tri, d_ref)
    assert i_tri.loss == pytest.approx(i_ref.loss, rel=1e-6) and i_tri.dead == i_ref.dead == 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_numpy_loop_equals_torch_loop(case):
    n, k, group, sym, act_order, bits = case
    w, h = _problem(n, k, seed=k + n + 1)
    spec = QuantSpec(bits, group, sym)
    q_ref, d_ref, i_ref = gptq_quantize(w, h, spec, act_order=act_order, kernel="torch")
    q_np, d_np, i_np = gptq_quantize(w, h, spec, act_order=act_order, kernel="numpy")
    assert (q_np.codes == q_ref.codes).all() and (q_np.scales == q_ref.scales).all()
    assert (q_np.zeros is None and q_ref.zeros is None) or (q_np.zeros == q_ref.zeros).all()
    assert torch.equal(d_np, d_ref) and i_np.loss == i_ref.loss and i_np.dead == i_ref.dead == 1


def test_kernel_choice():
    from klaq.toolchain.algorithms.gptq import _column_kernel

    w, h = _problem(8, 64, 0)
    with pytest.raises(ValueError, match="unknown GPTQ column kernel"):
        gptq_quantize(w, h, QuantSpec(4, 32, True), kernel="cuda")
    assert _column_kernel(None, torch.device("cpu")) == "numpy"
    assert _column_kernel("torch", torch.device("cpu")) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: "-".join(map(str, c)))
def test_triton_loop_on_gpu(case):
    n, k, group, sym, act_order, bits = case
    w, h = _problem(4 * n, k, seed=k, device="cuda")
    spec = QuantSpec(bits, group, sym)
    q_ref, _, i_ref = gptq_quantize(w, h, spec, act_order=act_order, kernel="torch")
    q_tri, _, i_tri = gptq_quantize(w, h, spec, act_order=act_order, kernel="triton")
    differ = (q_tri.codes != q_ref.codes).mean()
    assert differ < 0.01, differ  # FMA contraction may move a code across a rounding boundary
    assert i_tri.loss == pytest.approx(i_ref.loss, rel=0.02)
