import pytest
from w4_helpers import HAS_CUDA, random_qweight, rel_err

torch = pytest.importorskip("torch")
from klaq.kernels.numpy_ref import reference_matmul  # noqa: E402
from klaq.kernels.torch_w4a16 import TorchW4  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,group_size", [(576, 128), (576, 32), (4096 + 64, 256), (101, 64)])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [1, 3, 33])
def test_torch_matches_reference(device, k, group_size, asym, m):
    qw = random_qweight(40, k, group_size, asym, seed=k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    w = TorchW4(qw, device)
    ref = reference_matmul(x.numpy(), qw)
    assert rel_err(w(x.to(device)).cpu().numpy(), ref) < 1e-5  # float32 activations: exact dequant
    assert rel_err(w(x.to(device, torch.bfloat16)).float().cpu().numpy(), ref) < 1.5e-2
    if device == "cuda":
        assert rel_err(w(x.to(device, torch.float16)).float().cpu().numpy(), ref) < 2e-3


def test_dequantize_is_the_contract_and_cache_is_reused():
    qw = random_qweight(8, 200, 64, asym=True)
    w = TorchW4(qw, "cpu", cache=True)
    assert (w.dequantize(torch.float32).numpy() == qw.dequantize()).all()
    x = torch.randn(2, 200)
    w(x)
    dense = w._dense
    w(x)
    assert w._dense is dense
