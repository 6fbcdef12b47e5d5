import numpy as np
import pytest
from w4_helpers import random_qweight, rel_err

from klaq.formats.qweight import pack_codes
from klaq.kernels import NumpyW4, prepare, reference_matmul, w4a16_matmul


def test_reference_matches_explicit_formula():
    qw = random_qweight(5, 70, 32, asym=True, seed=1)
    x = np.random.default_rng(1).standard_normal((2, 70))
    s = qw.scales.astype(np.float64).repeat(32, axis=1)[:, :70]
    z = qw.zeros.astype(np.float64).repeat(32, axis=1)[:, :70]
    explicit = x @ ((qw.codes - z) * s).T
    assert rel_err(reference_matmul(x, qw), explicit) < 1e-3  # only the fp16 z*s rounding differs


@pytest.mark.parametrize("k", [576, 1536, 4096 + 64, 101])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 33])
def test_numpy_fallback_matches_reference(k, group_size, asym, m):
    qw = random_qweight(40, k, group_size, asym, seed=k + m)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    assert rel_err(NumpyW4(qw)(x), reference_matmul(x, qw)) < 1e-5


def test_numpy_fallback_stays_packed_and_accepts_vectors():
    qw = random_qweight(64, 576, 128, asym=False)
    w = prepare(qw)
    assert isinstance(w, NumpyW4)
    assert w.nbytes() <= pack_codes(qw.codes, 4).nbytes + qw.scales.nbytes * 2  # ~4.1 bits/weight
    x = np.random.default_rng(0).standard_normal(576).astype(np.float32)
    y = w4a16_matmul(x, w)
    assert y.shape == (64,)
    assert rel_err(y, reference_matmul(x[None], qw)[0]) < 1e-5


def test_wrong_layout_is_caught():
    """The tolerance is tight enough to see one group's scale applied to its neighbour."""
    qw = random_qweight(16, 256, 64, asym=False)
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    w = NumpyW4(qw)
    w.scales = w.scales[::-1].copy()
    assert rel_err(w(x), reference_matmul(x, qw)) > 1e-2


@pytest.mark.parametrize("k,group_size", [(101, 101), (75, 25), (33, 32)])
def test_numpy_fallback_odd_groups_and_per_channel(k, group_size):
    """Odd group widths (per-channel on an odd K) are padded per group, not only at the end."""
    for m in (1, 5):
        qw = random_qweight(12, k, group_size, asym=True, seed=k)
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        assert rel_err(NumpyW4(qw)(x), reference_matmul(x, qw)) < 1e-5
