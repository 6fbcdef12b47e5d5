"""Keep the source checkout's root off ``sys.path``.

The checkout's top level holds ``kernels/`` (installed as ``klaq.kernels``). Hugging Face's
``kernels`` package has the same top-level name, and transformers (5.2x) imports it whenever it is
installed. ``python -m ...`` run from the checkout root puts that root first on ``sys.path``, so
``import kernels`` finds klaq's folder and transformers fails at import. klaq itself never imports
its subpackages by their top-level names, so dropping the root costs nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def unshadow_checkout() -> None:
    """Remove the checkout root (``''``, ``.`` or its absolute path) from ``sys.path``, where the
    checkout is a klaq source tree; an installed klaq (no top-level ``kernels/``) is left alone."""
    if not (CHECKOUT / "kernels" / "__init__.py").is_file() or not (CHECKOUT / "pyproject.toml").is_file():
        return
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != CHECKOUT]
    mod = sys.modules.get("kernels")
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve().parent == CHECKOUT / "kernels":
        del sys.modules["kernels"]
