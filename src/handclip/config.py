"""Hydra/OmegaConf glue: where the configs are, the ``${handclip_root:}`` resolver, entry points, composing.

The configs are the top-level ``configs/`` folder of a source checkout; an installed wheel carries the
same folder as ``handclip/configs``. Relative data, output and cache paths are anchored to
:func:`project_root`: ``$HANDCLIP_ROOT`` if set, else the checkout, else (an installed package) the
current directory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from handclip.errors import exit_on_error

PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The source checkout this package runs from (``src/handclip`` -> ``.``), or None when installed."""
    root = PACKAGE_DIR.parents[1]
    return root if (root / "configs" / "train.yaml").is_file() and (root / "pyproject.toml").is_file() else None


def config_dir() -> Path:
    """``<checkout>/configs``, or the copy shipped inside the installed package."""
    root = checkout_root()
    return root / "configs" if root is not None else PACKAGE_DIR / "configs"


def project_root() -> str:
    """Anchor for relative paths: $HANDCLIP_ROOT if set, else the checkout, else the current directory."""
    root = os.environ.get("HANDCLIP_ROOT") or checkout_root() or Path.cwd()
    return str(Path(root).resolve())


def register_resolvers() -> None:
    """Make ``${handclip_root:}`` known to OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("handclip_root"):
        OmegaConf.register_new_resolver("handclip_root", project_root)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], object]], Callable[[], None]]:
    """Turn ``task(cfg)`` into a Hydra command-line entry point on HandCLIP's configs, with one-line errors.

    A single run turns an input error into one ``error:`` line and exit status 2. In a multirun the error
    is left to Hydra, which records the job as failed and goes on with the next one (the sweep's summary
    comes from the ``SweepSummary`` callback of ``configs/hydra/default.yaml``).
    """
    import hydra

    register_resolvers()

    def wrap(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        one_line = exit_on_error(task)

        @functools.wraps(task)
        def job(cfg: DictConfig) -> object:
            return task(cfg) if _in_multirun() else one_line(cfg)

        return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(job)

    return wrap


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config as the command line would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
