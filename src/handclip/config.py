"""Hydra/OmegaConf glue: the config folder, the project-root resolver, composing configs in code."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from handclip import CONFIG_DIR, PROJECT_ROOT


def project_root() -> str:
    """Anchor for relative paths: $HANDCLIP_ROOT if set, else the project checkout."""
    return str(Path(os.environ.get("HANDCLIP_ROOT", PROJECT_ROOT)).resolve())


if not OmegaConf.has_resolver("handclip_root"):
    OmegaConf.register_new_resolver("handclip_root", project_root)


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config as the command line would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
