"""HandCLIP: fine-tune CLIP's image tower to re-identify people from photos of hands.

``handclip.load(checkpoint)`` gives a model to embed and identify photos with (:mod:`handclip.api`). Importing
``handclip`` itself loads nothing heavy: torch and open_clip load on the first ``handclip.load``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml holds the version; the installed package's metadata carries it here.
    __version__ = version("handclip")
except PackageNotFoundError:  # run from a source tree that was never installed (PYTHONPATH=src)
    __version__ = "0+unknown"

__all__ = ["HandCLIP", "__version__", "identify_fused", "load"]


def __getattr__(name: str):
    # The package root is the base layer that every module imports (for __version__); the API on top of
    # everything is therefore reached by name, on first use, never imported here.
    if name in ("load", "HandCLIP", "identify_fused"):
        return getattr(importlib.import_module("handclip.api"), name)
    raise AttributeError(f"module 'handclip' has no attribute {name!r}")
