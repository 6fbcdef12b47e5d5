"""bench/kernels.py's dependent chain (the GPU timing itself runs only in the benchmark)."""

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
# By path and under its own name: "kernels" in sys.modules would shadow HF's kernels package,
# which transformers imports.
_spec = importlib.util.spec_from_file_location("klaq_bench_kernels", Path(__file__).parents[2] / "bench" / "kernels.py")
bench_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_kernels)
chain = bench_kernels.chain


def test_chain_feeds_each_output_to_the_next_call():
    seen = []

    def call(scale, n):
        def f(x):
            seen.append(x.clone())
            return torch.cat([x * scale, torch.ones(n - x.shape[-1])]) if n > x.shape[-1] else (x * scale)[:n]
        return f

    x0 = torch.arange(4.0)
    fns = chain([call(2.0, 6), call(3.0, 4), call(5.0, 2), call(7.0, 4)], x0, 4)
    for f in fns:
        f()
    assert [s.tolist() for s in seen] == [
        [0, 1, 2, 3],  # x0
        [0, 2, 4, 6],  # the first output's leading 4 of 6
        [0, 6, 12, 18],
        [0, 1, 2, 3],  # the previous output is narrower than K: x0 again
    ]


def test_weight_copies_are_distinct_and_exceed_the_working_set():
    from klaq.kernels.triton_w4a16 import repack

    base = repack(bench_kernels.random_qweight(64, 256), "cpu")
    ws = bench_kernels.weight_copies(base)
    assert ws[0] is base and len(ws) == bench_kernels.copies_for(base.nbytes())
    assert sum(w.nbytes() for w in ws) >= bench_kernels.WORKING_SET
    for w in ws[1:]:
        assert w.qweight.data_ptr() != base.qweight.data_ptr() and torch.equal(w.qweight, base.qweight)
        assert torch.equal(w.scales, base.scales) and w.offsets is None
        assert (w.in_features, w.out_features, w.group_size, w.block_k) == (256, 64, 128, base.block_k)
    dense = bench_kernels.dense_copies(torch.ones(64, 256, dtype=torch.float16))
    assert sum(d.nbytes for d in dense) >= bench_kernels.WORKING_SET and len({d.data_ptr() for d in dense}) == len(dense)


def test_targets_say_how_the_chain_ran():
    """The M = 1 targets report each call alone and the dependent chain, naming PDL's state."""
    rows = [dict(n=n, k=k, m=1, t16=30.0, t4=10.0, t16c=31.0, t4c=10.0 + i, pdl=True)
            for i, (n, k) in enumerate(bench_kernels.LLAMA3_8B[:3])]
    lines = bench_kernels.targets(rows)
    assert lines[0] == "- M = 1, large shapes, >= 3.0x, each call alone: met (3.00x, 3.00x, 3.00x)"
    assert lines[1] == ("- M = 1, large shapes, >= 3.0x, dependent chain (as in a decode step; PDL on): "
                        "NOT met (3.10x, 2.82x, 2.58x)")
    rows[1]["pdl"] = False
    assert "PDL off" in bench_kernels.targets(rows)[1]


def test_a_cublas_time_out_of_line_with_the_other_shapes_does_not_count_as_met():
    """The H100 run that read cuBLAS at 64.8 us for 6144x4096, M = 256 (bench/results/kernels_h100_s9.md):
    klaq's unchanged times then read 2.19x there, which is no target met."""
    llama = bench_kernels.LLAMA3_8B[:3]
    rows = [dict(n=n, k=k, m=256, t16=t16, t4=t4)
            for (n, k), t16, t4 in zip(llama, (20.3, 64.8, 53.7), (21.0, 29.6, 59.0), strict=True)]
    assert [(r["n"], r["k"]) for r in bench_kernels.cublas_out_of_line(rows)] == [(6144, 4096)]
    line = bench_kernels.targets(rows)[0]
    assert line.startswith("- M = 256, large shapes, within 10% (>= 0.9x), each call alone: NOT confirmed: cuBLAS "
                           "out of line with the other shapes at 6144x4096 (64.8 us)"), line
    usual = [dict(r, t16=t) for r, t in zip(rows, (20.2, 26.5, 52.3), strict=True)]  # the next run's cuBLAS
    assert bench_kernels.cublas_out_of_line(usual) == []
    assert "NOT met (0.96x, 0.90x, 0.89x)" in bench_kernels.targets(usual)[0]
    small_slow = [dict(r, t16=t) for r, t in zip(rows, (60.0, 26.5, 52.3), strict=True)]  # a smaller shape slower than larger
    assert [r["n"] for r in bench_kernels.cublas_out_of_line(small_slow)] == [4096]
    m1 = [dict(n=n, k=k, m=1, t16=t, t4=1.0) for (n, k), t in zip(llama, (16.7, 23.1, 44.8), strict=True)]
    assert bench_kernels.cublas_out_of_line(m1) == []
