import pytest

from klaq.errors import KlaqError
from klaq.targets.fit import check_fit, kv_cache_bytes
from klaq.targets.profiles import TARGETS, get_target


def test_required_targets_present_with_sane_values():
    for name in ("x86-cpu", "jetson-orin-nano", "jetson-agx-orin", "rpi5", "cuda"):
        t = get_target(name)
        assert 0 < t.usable_fraction <= 1 and t.bandwidth_gbs > 0
        assert t.default_bits in (2, 3, 4, 8) and t.default_group_size in (32, 64, 128, 256, -1)
    assert get_target("jetson-orin-nano").gpu_arch == "sm_87" and not get_target("jetson-orin-nano").has_triton
    assert len(TARGETS) >= 5


def test_unknown_target_lists_known_ones():
    with pytest.raises(KlaqError, match="rpi5"):
        get_target("toaster")


def test_roofline():
    t = get_target("jetson-orin-nano")
    assert t.decode_ceiling(4.5e9) == pytest.approx(68.0 / 4.5)


def test_fit_check_refuses_what_cannot_fit():
    nano = get_target("jetson-orin-nano")  # 8 GB x 0.65 usable
    kv = kv_cache_bytes(32, 8, 128, 2048)
    assert kv == 2 * 32 * 8 * 128 * 2048 * 2
    assert check_fit(nano, int(4.5e9), kv).fits
    with pytest.raises(KlaqError, match="jetson-orin-nano") as exc:
        check_fit(nano, int(16e9), kv)  # an fp16 8B model
    assert exc.value.exit_code == 3
