"""bench/cluster_probe.py on the CPU machine: it imports what it times (the cluster kernel, the dispatch, the tall
kernel, bench/kernels.py's timing) and says how to run it; the timing itself needs a Hopper GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
pytest.importorskip("triton.experimental.gluon")


def test_the_probe_imports_and_documents_its_options():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "cluster_probe.py"), "--help"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for option in ("--batches", "--shapes", "--plans", "--stages"):
        assert option in res.stdout
