"""HandCLIP: fine-tune CLIP's image tower to re-identify people from photos of their hands."""

from pathlib import Path

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
# The project root (where configs/, outputs/ and data/ live) for an editable install: src/handclip -> ..
PROJECT_ROOT = PACKAGE_DIR.parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
