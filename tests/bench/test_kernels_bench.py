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
