"""HandCLIP: fine-tune CLIP's image tower to re-identify people from photos of their hands."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml holds the version; the installed package's metadata carries it here.
    __version__ = version("handclip")
except PackageNotFoundError:  # run from a source tree that was never installed (PYTHONPATH=src)
    __version__ = "0+unknown"
