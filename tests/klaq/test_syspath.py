"""The checkout root on sys.path must not let klaq's top-level kernels/ shadow HF's ``kernels``."""

import subprocess
import sys

from klaq._syspath import CHECKOUT

CODE = f"""
import sys
sys.path.insert(0, {str(CHECKOUT)!r})
sys.path.insert(0, '')
from klaq._syspath import unshadow_checkout
unshadow_checkout()
try:
    import kernels
except ImportError:
    print('absent')
else:
    print(kernels.__file__)
"""


def test_checkout_root_is_dropped_from_sys_path():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         cwd=CHECKOUT).stdout.strip()
    assert out == "absent" or not out.startswith(str(CHECKOUT / "kernels")), out


def test_python_m_klaq_from_checkout_root_imports_transformers():
    """What `python -m klaq` does first (klaq/__main__.py), then the transformers import that failed."""
    code = ("import sys; sys.path.insert(0, ''); import klaq._syspath as s; s.unshadow_checkout();"
            "import transformers.integrations.hub_kernels")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=CHECKOUT)
    assert res.returncode == 0, res.stderr[-2000:]
