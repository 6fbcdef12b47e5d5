"""The device path must not drag in torch or transformers (`pip install klaq[runtime]` is enough)."""

import json
import subprocess
import sys

CHECK = """
import sys, json
from klaq.cli import run_main
sys.argv = ["klaq-run", sys.argv[1], "-p", "Hello", "-n", "4", "--json"]
try:
    run_main()
except SystemExit as e:
    assert not e.code, e.code
print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def test_klaq_run_imports_neither_torch_nor_transformers(tiny_q4_package):
    out = subprocess.run([sys.executable, "-c", CHECK, str(tiny_q4_package)], capture_output=True, text=True,
                         check=True)
    report, modules = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert report["new_tokens"] == 4
    assert modules == {"torch": False, "transformers": False}
