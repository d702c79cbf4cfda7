"""Shared fixtures: small split layouts written on the fly, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from handclip.data.layout import HAND_TYPES, hand_dir_name  # noqa: E402


def write_image(path: Path, seed: int, size=(40, 30), mode: str = "RGB", fmt: str | None = None) -> Path:
    """A small random image whose colour depends on the seed (identity-like)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_layout(root: Path, hands=("dorsal_right",), n_train_ids=4, n_test_ids=3, per_id=3, runs=2, size=(40, 30)) -> Path:
    """Write a tiny split layout: train/val/train_all for train ids, test/query{i}/gallery{i} for test ids."""
    for h, hand in enumerate(hands):
        base = root / hand_dir_name(hand)
        for i in range(n_train_ids):
            ident = f"{i:07d}"
            for k in range(per_id):
                split = "val" if k == 0 else "train"
                name = f"Hand_{h}{i:03d}{k}.jpg"
                write_image(base / split / ident / name, seed=1000 * i + k, size=size)
                write_image(base / "train_all" / ident / name, seed=1000 * i + k, size=size)
        for i in range(n_test_ids):
            ident = f"{2000 + i:07d}"
            names = [f"Hand_{h}{2000 + i}{k}.jpg" for k in range(per_id)]
            for k, name in enumerate(names):
                write_image(base / "test" / ident / name, seed=1000 * (i + 50) + k, size=size)
            for r in range(runs):
                g = (i + r) % per_id
                for k, name in enumerate(names):
                    split = f"gallery{r}" if k == g else f"query{r}"
                    write_image(base / split / ident / name, seed=1000 * (i + 50) + k, size=size)
    return root


@pytest.fixture
def layout_root(tmp_path: Path) -> Path:
    return make_layout(tmp_path / "data", hands=tuple(HAND_TYPES))
