"""What a HandCLIP checkpoint holds besides its weights, under the key ``"handclip"``.

Layout by version: 0.1.0 saved the whole open_clip model; 0.2.0 only the image tower and the head (no block below);
format 2 adds this block and makes ``best.ckpt`` weights-only. Model name, pretrained source, hand type and classes
are Lightning's ``hyper_parameters`` of the checkpoint; the block adds:

* ``preprocess``: the open_clip preprocessing the image tower was trained with (size, mean, std, resize...),
* ``metrics``: the logged figures when the checkpoint was written (``val/rank1``...),
* ``threshold``: ``None`` here. An open-set threshold is calibrated after training and kept in a sidecar file next
  to the checkpoint, so that calibrating never rewrites a checkpoint; readers merge it in.

All values are plain, so checkpoints load with torch's ``weights_only`` unpickler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from open_clip.transform import PreprocessCfg

import handclip

META_KEY = "handclip"
FORMAT = 2


def checkpoint_metadata(preprocess: PreprocessCfg, metrics: Mapping[str, Any]) -> dict[str, Any]:
    figures = {}
    for name, value in metrics.items():
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or isinstance(value, (int, float)):
            figures[str(name)] = float(value)
    return {
        "format": FORMAT,
        "handclip_version": handclip.__version__,
        "preprocess": dataclasses.asdict(preprocess),
        "metrics": figures,
        "threshold": None,
    }


def preprocess_from_meta(values: Mapping[str, Any] | None) -> PreprocessCfg | None:
    """The ``PreprocessCfg`` stored in a checkpoint, or None for checkpoints that predate the block."""
    if not values:
        return None
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    return PreprocessCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})
