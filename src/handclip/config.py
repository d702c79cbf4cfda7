"""Hydra/OmegaConf glue: where the configs are, the ``${handclip_root:}`` resolver, entry points, composing.

The configs are the top-level ``configs/`` folder of a source checkout; an installed wheel carries the
same folder as ``handclip/configs``. Relative data and output paths are anchored to :func:`project_root`:
``$HANDCLIP_ROOT`` if set, else the checkout, else (an installed package) the current directory. Caches go
to :func:`cache_dir` (an installed package: the user's cache folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from handclip.utils.cli import cli_value, group_options
from handclip.utils.files import slug

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


def cache_dir(name: str = "handclip") -> str:
    """``${handclip_cache_dir:<name>}``: where HandCLIP keeps what it can rebuild (the crop cache: ``handclip``; the
    benchmark's scratch files: ``bench``). In a source checkout, or with $HANDCLIP_ROOT, ``<root>/.cache/<name>``; an
    installed package uses the user's cache folder (platformdirs: ``~/.cache/handclip`` on Linux, with ``<name>``
    below it for the others), not ``./.cache`` of whatever directory it runs in."""
    if os.environ.get("HANDCLIP_ROOT") or checkout_root() is not None:
        return str(Path(project_root()) / ".cache" / name)
    from platformdirs import user_cache_dir

    base = Path(user_cache_dir("handclip", appauthor=False))
    return str(base if name == "handclip" else base / name)


def _uses_cuda(accelerator: str) -> bool:
    if str(accelerator).lower() in ("gpu", "cuda"):
        return True
    if str(accelerator).lower() != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def precision_for(accelerator: str) -> str:
    """``${handclip_precision:<accelerator>}``: bf16-mixed on a CUDA GPU, fp32 elsewhere."""
    return "bf16-mixed" if _uses_cuda(accelerator) else "32-true"


def gpu_count() -> int:
    """``${handclip_gpu_count:}``: CUDA GPUs visible to this process."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def job_devices(accelerator: str):
    """``${handclip_job_devices:<accelerator>}``: [GPU k mod GPUs] for job k of a sweep on a GPU machine, else 1."""
    if not _uses_cuda(accelerator) or gpu_count() == 0:
        return 1
    from hydra.core.hydra_config import HydraConfig

    number = HydraConfig.get().job.get("num") if HydraConfig.initialized() else None
    return [int(number or 0) % gpu_count()]


def log_file(path: str) -> str:
    """``${handclip_log_file:<path>}``: ``path`` in rank 0 of a multi-process run (or alone), else os.devnull."""
    from handclip.utils.devices import launched_as_rank_zero

    return path if launched_as_rank_zero() else os.devnull


#: Set by the ``SweepFolders`` Hydra callback for the jobs of a multirun (and the processes they start): the keys
#: the sweep varies, comma-separated. Internal: not a setting.
SWEPT_KEYS_VARIABLE = "HANDCLIP_SWEPT_KEYS"
#: Keys that never name a sweep job's folder: where things go, how fast, and the hand type (a folder of its own).
UNNAMED_KEYS = ("hand", "paths", "ckpt_path", "hydra", "launcher", "data.num_workers", "data.cache_workers",
                "data.progress", "data.cache_dir", "trainer.enable_progress_bar", "device", "progress")
#: Characters kept in a sweep job's folder name (Hydra's override_dirname style); others become "_".
_FOLDER_SAFE = "A-Za-z0-9._=,+-"


def sweep_job_name(overrides: list[str], swept: set[str]) -> str:
    """The folder name of a sweep job, from its overrides of swept keys: ``model.lr=0.0001,seed=2`` (sorted, as
    Hydra's ``override_dirname``); "" when the sweep varies nothing but the hand type (and settings that do not
    change what is trained: paths, workers, progress)."""
    named = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in swept and not any(key == k or key.startswith(f"{k}.") or key.startswith(f"{k}/")
                                    for k in UNNAMED_KEYS):
            named.append(f"{key}={value}")
    return slug(",".join(sorted(named)), allowed=_FOLDER_SAFE)


def sweep_dir() -> str:
    """``${handclip_sweep_dir:}``: ``<job name>/`` for a job of a sweep that varies more than the hand type, else ""
    (a single run, and a sweep over hand types only, keep ``<task>/<hand>``)."""
    swept = os.environ.get(SWEPT_KEYS_VARIABLE)
    if not swept:
        return ""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    name = sweep_job_name([str(o) for o in HydraConfig.get().overrides.task], set(swept.split(",")))
    return f"{name}/" if name else ""


def register_resolvers() -> None:
    """Make ``${handclip_root:}`` and the other ``handclip_*`` resolvers known to OmegaConf, and the typed schemas
    (:mod:`handclip.schema`) known to Hydra (idempotent)."""
    from handclip.schema import register_schemas

    register_schemas()
    resolvers = {"handclip_root": project_root, "handclip_cache_dir": cache_dir, "handclip_precision": precision_for,
                 "handclip_gpu_count": gpu_count, "handclip_job_devices": job_devices, "handclip_log_file": log_file,
                 "handclip_sweep_dir": sweep_dir,
                 "handclip_value": cli_value,
                 "handclip_options": lambda group: group_options(config_dir() / group)}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config as the command line would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])
