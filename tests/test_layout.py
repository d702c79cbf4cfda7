"""Discovery of the split layout, listing, oddities of real data, and the errors of bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from conftest import make_layout, write_image

from handclip.data import layout
from handclip.data.images import ImageLoader, load_rgb
from handclip.errors import HandCLIPError
from handclip.hands import HAND_TYPES, hand_dir_name
from handclip.models.clip import preprocess_config


def test_discover_finds_hands_splits_and_runs(layout_root: Path):
    assert layout.available_hands(layout_root) == list(HAND_TYPES)
    dr = layout.discover_hand(layout_root, "dorsal_right")
    assert dr.path == layout_root / "train_val_test_split_dorsal_r"
    assert dr.runs == (("query0", "gallery0"), ("query1", "gallery1"))
    assert {"train", "val", "test", "train_all"} <= set(dr.splits)


def test_ten_runs_are_ordered_numerically(tmp_path: Path):
    root = make_layout(tmp_path, runs=11, n_test_ids=2, per_id=2)
    runs = layout.discover_hand(root, "dorsal_right").runs
    assert [q for q, _ in runs] == [f"query{i}" for i in range(11)]


def test_single_query_gallery_pair_is_one_run(tmp_path: Path):
    root = make_layout(tmp_path, runs=1)
    hand = root / "train_val_test_split_dorsal_r"
    (hand / "query0").rename(hand / "query")
    (hand / "gallery0").rename(hand / "gallery")
    assert layout.discover_hand(root, "dorsal_right").runs == (("query", "gallery"),)


def test_list_split_labels_and_order(layout_root: Path):
    train = layout.list_split(layout_root, "dorsal_right", "train")
    assert len(train) == 4 * 2
    assert [s.identity for s in train] == sorted(s.identity for s in train)
    assert layout.class_mapping(train) == [f"{i:07d}" for i in range(4)]


def test_oddities_of_published_data_are_accepted(tmp_path: Path, caplog):
    root = make_layout(tmp_path, n_train_ids=3)
    train = root / "train_val_test_split_dorsal_r" / "train"
    val = root / "train_val_test_split_dorsal_r" / "val"
    write_image(train / "0000000" / "extra.PNG", seed=1, fmt="PNG")
    write_image(train / "0000001" / "other.JPEG", seed=2, fmt="JPEG")
    (train / "0000000" / ".DS_Store").write_bytes(b"\0junk")
    (train / "Thumbs.db").write_bytes(b"junk")
    (train / "0000001" / "Thumbs.db").write_bytes(b"junk")
    (train / "0000009").mkdir()  # empty identity folder
    write_image(val / "0000777" / "orphan.jpg", seed=3)  # val identity without training images

    samples = layout.list_split(root, "dorsal_right", "train")
    names = {s.path.name for s in samples}
    assert {"extra.PNG", "other.JPEG"} <= names
    assert not {".DS_Store", "Thumbs.db"} & names
    classes = layout.class_mapping(samples)
    assert "0000009" not in classes and len(classes) == 3

    with caplog.at_level(logging.WARNING):
        kept = layout.drop_unknown_identities(layout.list_split(root, "dorsal_right", "val"), classes, "val")
    assert all(s.identity != "0000777" for s in kept) and len(kept) == 3
    assert "orphan.jpg" in caplog.text and "0000777" in caplog.text


def test_missing_root_says_how_to_make_data(tmp_path: Path):
    with pytest.raises(HandCLIPError, match=r"does not exist.*handclip.prepare.*make demo"):
        layout.available_hands(tmp_path / "nowhere")


def test_missing_hand_folder_lists_those_found(tmp_path: Path):
    root = make_layout(tmp_path, hands=("dorsal_right", "palmar_left"))
    with pytest.raises(HandCLIPError, match=r"train_val_test_split_dorsal_l.*found.*dorsal_r, .*palmar_l"):
        layout.list_split(root, "dorsal_left", "train")


def test_unknown_hand_lists_valid_ones(tmp_path: Path):
    with pytest.raises(HandCLIPError, match="dorsal_right, dorsal_left, palmar_right, palmar_left"):
        hand_dir_name("dorsal_middle")


def test_missing_split_names_it(tmp_path: Path):
    root = make_layout(tmp_path)
    shutil.rmtree(root / "train_val_test_split_dorsal_r" / "val")
    with pytest.raises(HandCLIPError, match=r"val' not found; splits present: .*train"):
        layout.list_split(root, "dorsal_right", "val")


def test_split_without_images(tmp_path: Path):
    root = make_layout(tmp_path)
    train = root / "train_val_test_split_dorsal_r" / "train"
    for p in [p for p in train.rglob("*") if p.is_file()]:
        p.unlink()
    (train / "0000000" / "notes.txt").write_text("not an image")
    with pytest.raises(HandCLIPError, match=r"train' holds no images"):
        layout.list_split(root, "dorsal_right", "train")


def test_query_without_gallery(tmp_path: Path):
    root = make_layout(tmp_path, runs=3)
    shutil.rmtree(root / "train_val_test_split_dorsal_r" / "gallery2")
    with pytest.raises(HandCLIPError, match=r"query2 found without the matching gallery2"):
        layout.discover_hand(root, "dorsal_right")


def test_truncated_and_unreadable_images_are_named(tmp_path: Path):
    good = write_image(tmp_path / "good.jpg", seed=0, size=(64, 48))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    not_image = tmp_path / "fake.jpg"
    not_image.write_text("hello")
    loader = ImageLoader(preprocess_config("HandCLIP-Tiny", None))
    assert loader(good).shape == (3, 64, 64)
    for bad in (truncated, not_image):
        with pytest.raises(HandCLIPError, match=bad.name):
            loader(bad)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_any_image_mode_is_converted_to_rgb(tmp_path: Path, mode: str):
    path = write_image(tmp_path / f"img_{mode}.{'png' if mode in ('RGBA', 'P') else 'jpg'}", seed=4, mode=mode)
    assert load_rgb(path).mode == "RGB"
