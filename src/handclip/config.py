"""Hydra/OmegaConf glue: where the configs are, the ``${handclip_root:}`` resolver, entry points, composing.

The configs are the top-level ``configs/`` folder of a source checkout; an installed wheel carries the
same folder as ``handclip/configs``. Relative data, output and cache paths are anchored to
:func:`project_root`: ``$HANDCLIP_ROOT`` if set, else the checkout, else (an installed package) the
current directory.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from handclip.errors import HandCLIPError, exit_on_error

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


def register_resolvers() -> None:
    """Make ``${handclip_root:}`` and the other ``handclip_*`` resolvers known to OmegaConf (idempotent)."""
    resolvers = {"handclip_root": project_root, "handclip_precision": precision_for, "handclip_gpu_count": gpu_count,
                 "handclip_job_devices": job_devices, "handclip_log_file": log_file}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


#: Launcher presets (``launcher=...`` or ``hydra/launcher=...``) and the optional extra they need.
LAUNCHER_EXTRAS = {"slurm": "cluster", "local": "cluster", "submitit_slurm": "cluster", "submitit_local": "cluster"}
_LAUNCHER_MODULES = ("hydra_plugins.hydra_submitit_launcher", "submitit")


def check_launcher_installed(argv: list[str]) -> None:
    """A launcher preset named on the command line needs its optional extra: say how to install it."""
    import importlib.util
    import re

    for token in argv:
        match = re.fullmatch(r"[+~]*(?:hydra/)?launcher=(\w+)", token)
        if not match or match.group(1) not in LAUNCHER_EXTRAS:
            continue
        missing = [m for m in _LAUNCHER_MODULES if _find_spec(importlib.util, m) is None]
        if missing:
            extra = LAUNCHER_EXTRAS[match.group(1)]
            raise HandCLIPError(
                f"{token} needs Hydra's submitit launcher, which is not installed ({', '.join(missing)} not "
                f"found); install the optional extra: pip install -e \".[{extra}]\" (or pip install "
                "hydra-submitit-launcher)"
            )


def _find_spec(util, name: str):
    try:
        return util.find_spec(name)
    except (ImportError, ValueError):  # a parent package missing, or a module hidden in sys.modules
        return None


def check_group_options(argv: list[str]) -> None:
    """``group=option`` on the command line naming no config of that group (``hand=dorsal_up``): one line
    listing the options, instead of Hydra's multi-line report with exit status 1. Sweeps (``hand=a,b``) are
    checked option by option; glob(), range() and interpolations are left to Hydra, as is everything when
    extra config folders are given."""
    import re

    from handclip.hands import check_hand

    if any(t.startswith(("--config-dir", "-cd", "hydra.searchpath", "+hydra.searchpath")) for t in argv):
        return
    root = config_dir()
    for token in argv:
        match = re.fullmatch(r"\+{0,2}(\w+)=([\w.,-]+)", token)
        if not match or not (root / match.group(1)).is_dir():
            continue
        group, options = match.groups()
        known = sorted(p.stem for p in (root / group).glob("*.yaml"))
        for option in options.split(","):
            if option in known or option == "null":
                continue
            if group == "hand":
                check_hand(option)  # the hand types' own message
            raise HandCLIPError(f"{group}={option}: no such {group} config; expected one of: {', '.join(known)}")


def check_override_keys(config_name: str, argv: list[str]) -> None:
    """``key=value`` on the command line naming no key of the config (``trainer.max_epoch=3``): one line with the
    closest key and how to add a new one, instead of Hydra's multi-line report with exit status 1.

    The group choices on the command line are composed first (a sweep's first option), so keys that an
    experiment or model config adds count. Appends (``+key=``), deletions (``~key``), Hydra's own settings and
    runs with other config names or folders are left to Hydra, as is a config that does not compose.
    """
    import re

    if any(t.startswith(("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")) for t in argv):
        return
    root = config_dir()
    choices, settings = [], []
    for token in argv:
        match = re.fullmatch(r"(\w[\w.]*)=(.*)", token)
        if not match or match.group(1).split(".")[0] == "hydra":
            continue
        key, value = match.groups()
        if (root / key).is_dir():
            first = value.split(",")[0]
            if re.fullmatch(r"[\w.-]+", first):  # not glob(), range() or an interpolation
                choices.append(f"{key}={first}")
        else:
            settings.append((key, value))
    if not settings:
        return
    try:
        tree = OmegaConf.to_container(compose(config_name, choices), resolve=False)
    except Exception:  # noqa: BLE001 - Hydra's own report says what does not compose
        return
    for key, value in settings:
        if not _has_key(tree, key.split(".")):
            hint = "".join(f"; did you mean {close}?" for close in _closest_key(tree, key)[:1])
            raise HandCLIPError(f"{key}={value}: no such key in the {config_name} config{hint} (a new key is added "
                                f"with +{key}={value})")


def _has_key(node, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _closest_key(tree: dict, key: str) -> list[str]:
    """The likely intended key: a sibling with a similar name (``trainer.max_epoch``), else a key as deep with a
    similar path (``trainr.max_epochs``)."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    node = tree
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        return [f"{parent}.{m}" if parent else m for m in difflib.get_close_matches(leaf, [str(k) for k in node], 1)]
    return difflib.get_close_matches(key, [k for k in _dotted_keys(tree) if k.count(".") == key.count(".")], 1)


def _dotted_keys(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, child in node.items():
            yield f"{prefix}{key}"
            yield from _dotted_keys(child, f"{prefix}{key}.")


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

        main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(job)

        @functools.wraps(main)
        def entry() -> None:
            exit_on_error(check_launcher_installed)(sys.argv[1:])  # before Hydra composes the launcher
            exit_on_error(check_group_options)(sys.argv[1:])
            exit_on_error(check_override_keys)(config_name, sys.argv[1:])
            main()

        return entry

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
