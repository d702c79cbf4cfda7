"""The ``bench`` config as plain values: quick settings applied, ``{cpu: ..., cuda: ...}`` values chosen."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from handclip.errors import HandCLIPError
from handclip.utils.devices import resolve_device

PARTS = ("data", "train", "eval", "search", "checkpoints", "scaling", "rerank", "inference", "app")
#: The parts of a full run (``bench.parts`` by default); a run of other parts writes its own file.
FULL_RUN = ("data", "train", "eval", "search", "checkpoints")


def _per_device(node: Any, device_type: str) -> Any:
    """Replace every ``{cpu: a, cuda: b}`` mapping by the value for ``device_type``."""
    if isinstance(node, dict):
        if node and set(node) <= {"cpu", "cuda"}:
            return node.get(device_type, node.get("cpu"))
        return {k: _per_device(v, device_type) for k, v in node.items()}
    if isinstance(node, list):
        return [_per_device(v, device_type) for v in node]
    return node


def bench_settings(cfg: DictConfig) -> tuple[dict, torch.device]:
    """The ``bench`` settings as plain values: quick settings applied, per-device values chosen."""
    if "bench" not in cfg:
        raise HandCLIPError("config has no 'bench' section (compose the 'bench' config)")
    bench = OmegaConf.to_container(cfg.bench, resolve=True)
    quick_settings = bench.pop("quick_settings", None) or {}
    device = resolve_device(str(bench.get("device", "auto")), "bench.device")
    bench = _per_device(bench, device.type)
    if bench.get("quick"):
        merged = OmegaConf.merge(bench, _per_device(quick_settings, device.type))
        bench = OmegaConf.to_container(merged, resolve=True)
    parts = list(bench.get("parts") or PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise HandCLIPError(f"bench.parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
    bench["parts"] = parts
    return bench, device
