"""FP-target calibration: GPTQ fits the FP model's outputs from the quantized model's inputs."""

import numpy as np
import pytest
import torch
from tiny_archs import _ids, _model

from klaq.errors import KlaqError
from klaq.toolchain.algorithms.fp_target import fp_target_weight
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.engine import EngineConfig, quantize_blocks


def _moments(x_fp, x_q):
    n = x_q.shape[0]
    return x_q.T @ x_q / n, x_fp.T @ x_q / n


def test_same_streams_leave_the_weight_alone():
    torch.manual_seed(0)
    x, w = torch.randn(200, 16), torch.randn(8, 16)
    h, c = _moments(x, x)
    assert torch.equal(fp_target_weight(w, h, c, ridge=0.01), w)


def test_target_is_the_damped_least_squares_fit():
    """W̃ minimizes ‖X_fp Wᵀ − X_q W̃ᵀ‖² + a ridge toward W: with a tiny ridge it is the
    least-squares solution, and it beats keeping W on the quantized inputs."""
    torch.manual_seed(1)
    x_fp = torch.randn(500, 12, dtype=torch.float64)
    distort = torch.eye(12, dtype=torch.float64) + 0.2 * torch.randn(12, 12, dtype=torch.float64)
    x_q = x_fp @ distort + 0.01 * torch.randn(500, 12, dtype=torch.float64)  # upstream error, mostly linear
    w = torch.randn(6, 12, dtype=torch.float64)
    h, c = _moments(x_fp, x_q)
    wt = fp_target_weight(w, h, c, ridge=1e-9).double()
    lstsq = torch.linalg.lstsq(x_q, x_fp @ w.T).solution.T
    torch.testing.assert_close(wt, lstsq, rtol=1e-4, atol=1e-4)
    err = lambda m: float(((x_fp @ w.T - x_q @ m.T) ** 2).sum())  # noqa: E731
    assert err(wt) < 0.05 * err(w)
    # the ridge pulls toward W, never past the fit
    wd = fp_target_weight(w, h, c, ridge=10.0).double()
    assert err(wt) < err(wd) < err(w)


def test_dead_inputs_get_no_weight():
    torch.manual_seed(2)
    x_fp = torch.randn(100, 8)
    x_q = x_fp + 0.1 * torch.randn(100, 8)
    x_q[:, 3] = 0
    w = torch.randn(4, 8)
    h, c = _moments(x_fp, x_q)
    wt = fp_target_weight(w, h, c, ridge=0.0)
    assert torch.isfinite(wt).all()
    assert torch.equal(wt[:, 3], w[:, 3])  # nothing to fit along an input that is always 0


def _run(model_type="llama", **kw):
    model = _model(model_type)
    res = quantize_blocks(model, _ids(), EngineConfig(method="gptq", spec=QuantSpec(4, 32, False), progress=False, **kw))
    return {k: v.dequantize() for k, v in res.quantized.items()}


def test_engine_first_stage_matches_gptq_and_later_ones_move():
    """Block 0's first stage sees the same inputs in both streams (C = H): bit-identical to plain
    GPTQ. Every later linear fits the FP outputs instead, so its codes change."""
    plain, fpt = _run(), _run(fp_target=0.01)
    first = [k for k in plain if k.startswith("model.layers.0.self_attn.") and k.split(".")[-2] in ("q_proj", "k_proj", "v_proj")]
    assert len(first) == 3
    for k in first:
        np.testing.assert_array_equal(fpt[k], plain[k])
    moved = [k for k in plain if k not in first and not np.array_equal(fpt[k], plain[k])]
    assert len(moved) == len(plain) - 3
    again = _run(fp_target=0.01)  # deterministic
    for k in fpt:
        np.testing.assert_array_equal(fpt[k], again[k])


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2"])
def test_engine_fp_target_other_architectures_and_fp_calibration(model_type):
    """Runs where the block has extra norms (Gemma 3) or Conv1D linears (GPT-2), and with FP
    calibration between blocks (``propagate=False``: one activation stream)."""
    for propagate in (True, False):
        out = _run(model_type, fp_target=0.01, propagate=propagate)
        assert out and all(np.isfinite(v).all() for v in out.values())


def test_fp_target_needs_a_gptq_fit():
    with pytest.raises(KlaqError, match="fp-target"):
        quantize_blocks(_model("llama"), _ids(), EngineConfig(method="rtn", fp_target=0.01, progress=False))


def test_fp_target_needs_true_sequential_stages():
    """One capture per block would fit o_proj / down_proj to drift their predecessors' fits remove."""
    with pytest.raises(KlaqError, match="true-sequential"):
        quantize_blocks(_model("llama"), _ids(), EngineConfig(method="gptq", fp_target=1.0, true_sequential=False,
                                                             progress=False))


def test_engine_fp_target_with_activations_on_disk_is_the_same(tmp_path):
    """Both activation streams go through the same store: on disk the codes are those of RAM."""
    ram = _run(fp_target=0.01, activations="cpu")
    disk = _run(fp_target=0.01, activations="disk", activations_dir=str(tmp_path))
    assert ram.keys() == disk.keys()
    for k in ram:
        np.testing.assert_array_equal(disk[k], ram[k])
