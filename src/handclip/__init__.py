"""HandCLIP: fine-tune CLIP's image tower to re-identify people from photos of their hands."""

__version__ = "0.2.0"
