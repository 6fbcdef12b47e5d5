import subprocess
import sys

import numpy as np
import pytest
from w4_helpers import random_qweight, rel_err

from klaq.kernels import NumpyW4, pick_backend, prepare, reference_matmul, w4a16_matmul


def test_cpu_runtime_path_needs_no_torch():
    code = ("import sys, numpy as np, klaq.kernels as k\n"
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules\n"
            "print(k.pick_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"


def test_prepare_picks_by_device():
    qw = random_qweight(16, 64, 32, asym=False)
    assert isinstance(prepare(qw), NumpyW4)
    assert pick_backend(None) == "numpy"
    with pytest.raises(ValueError):
        prepare(qw, backend="cutlass")
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert rel_err(w4a16_matmul(x, prepare(qw)), reference_matmul(x, qw)) < 1e-5


def test_torch_backends():
    torch = pytest.importorskip("torch")
    from klaq.kernels.torch_w4a16 import TorchW4

    qw = random_qweight(16, 64, 32, asym=True)
    assert pick_backend("cpu") == "torch"
    w = prepare(qw, "cpu")
    assert isinstance(w, TorchW4)
    x = torch.randn(3, 64)
    assert rel_err(w4a16_matmul(x, w).numpy(), reference_matmul(x.numpy(), qw)) < 1e-5
    if torch.cuda.is_available() and pick_backend("cuda") == "triton":
        from klaq.kernels.triton_w4a16 import TritonW4

        assert isinstance(prepare(qw, "cuda"), TritonW4)
