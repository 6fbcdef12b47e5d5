"""Calibration activations in RAM or on disk: same tensors back, files gone afterwards."""

import numpy as np
import pytest
import torch
from tiny_archs import _ids, _model

from klaq.errors import KlaqError
from klaq.toolchain import activations as act
from klaq.toolchain.activations import Activations, choose_where
from klaq.toolchain.algorithms.grid import QuantSpec
from klaq.toolchain.engine import EngineConfig, quantize_blocks


def test_disk_store_round_trips_and_cleans_up(tmp_path):
    xs = [torch.randn(2, 5, 8), torch.randn(1, 5, 8).half()]
    store = Activations("disk", str(tmp_path))
    for x in xs:
        store.append(x)
    assert len(store) == 2 and len(list(store.path.iterdir())) == 2
    for got, x in zip(store, xs, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, x.float(), rtol=0, atol=0)
    assert [t.shape[0] for t in store[0:2]] == [2, 1]
    where = store.path
    store.close()
    assert not where.exists() and len(store) == 0


def test_cpu_store_holds_tensors():
    store = Activations("cpu")
    store.append(torch.ones(1, 2, 3, dtype=torch.float16))
    assert store.path is None and store[0].dtype == torch.float32 and store[-1].shape == (1, 2, 3)


def test_auto_picks_disk_only_when_ram_is_short(monkeypatch):
    monkeypatch.setattr(act, "available_ram", lambda: 10 * 2**30)
    assert choose_where("auto", 128 * 512, 4096) == "cpu"  # 2 x 1 GiB of 10 GiB
    monkeypatch.setattr(act, "available_ram", lambda: 3 * 2**30)
    assert choose_where("auto", 128 * 512, 4096) == "disk"  # 2 GiB > half of 3 GiB
    assert choose_where("cpu", 128 * 512, 4096) == "cpu"
    # the FP-output fit carries a second stream (the FP model's activations): twice the need
    monkeypatch.setattr(act, "available_ram", lambda: 6 * 2**30)
    assert choose_where("auto", 128 * 512, 4096) == "cpu"  # 2 GiB of half of 6 GiB
    assert choose_where("auto", 128 * 512, 4096, streams=2) == "disk"  # 4 GiB > 3 GiB
    with pytest.raises(KlaqError, match="--activations must be one of auto, cpu, disk"):
        choose_where("gpu", 1, 1)
    with pytest.raises(KlaqError, match="cpu or disk"):
        Activations("auto")
    with pytest.raises(KlaqError, match="--activations must be one of"):  # before any calibration work
        quantize_blocks(_model("llama"), _ids(), EngineConfig(method="klawq", beta=1.0, kl_source="model",
                                                              activations="gpu", progress=False))


def test_bad_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(KlaqError, match="cannot create a directory"):
        Activations("disk", str(f))


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_engine_on_disk_activations_is_bit_identical(method, tmp_path):
    spec = QuantSpec(4, 32, False)
    ram = quantize_blocks(_model("qwen2"), _ids(), EngineConfig(method=method, spec=spec, progress=False,
                                                                activations="cpu", micro_batch=3))
    disk = quantize_blocks(_model("qwen2"), _ids(), EngineConfig(method=method, spec=spec, progress=False,
                                                                 activations="disk", micro_batch=3,
                                                                 activations_dir=str(tmp_path)))
    assert ram.quantized.keys() == disk.quantized.keys()
    for k, qw in ram.quantized.items():
        np.testing.assert_array_equal(qw.codes, disk.quantized[k].codes)
        np.testing.assert_array_equal(qw.scales, disk.quantized[k].scales)
    assert list(tmp_path.iterdir()) == []  # every block's files deleted
