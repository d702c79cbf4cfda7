"""Synthetic 11k-style hands: format, determinism, identity structure, output-folder rules."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handclip import synth
from handclip.data.synthetic import ASPECTS, CSV_COLUMNS, contact_sheet, generate_dataset, parse_size
from handclip.errors import HandCLIPError

SIZE = (96, 72)
THRESHOLDS = {"dorsal right": 1050, "dorsal left": 1037, "palmar right": 1051, "palmar left": 1042}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "raw"
    generate_dataset(out, subjects=12, images_per_aspect=4, seed=0, size=SIZE, workers=1)
    return out


def _rows(raw_dir: Path) -> list[dict[str, str]]:
    with open(raw_dir / "HandInfo.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_csv_format(raw: Path) -> None:
    text = (raw / "HandInfo.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert all(re.match(r'^"\d{7}",\d+,(male|female),', line) for line in lines[1:])
    rows = _rows(raw)
    assert {r["aspectOfHand"] for r in rows} == set(ASPECTS)
    assert {r["accessories"] for r in rows} == {"0", "1"}
    assert all(re.fullmatch(r"Hand_\d{7}\.jpg", r["imageName"]) for r in rows)
    assert len({r["imageName"] for r in rows}) == len(rows)
    # every subject has every aspect, with at least two images each
    per = Counter((r["id"], r["aspectOfHand"]) for r in rows)
    ids = {r["id"] for r in rows}
    assert len(ids) == 12
    assert all(per[(i, a)] >= 2 for i in ids for a in ASPECTS)
    accessory_rate = sum(r["accessories"] == "1" for r in rows) / len(rows)
    assert 0 < accessory_rate < 0.15


def test_images_decode_at_requested_size(raw: Path) -> None:
    rows = _rows(raw)
    assert sorted(p.name for p in (raw / "Hands").iterdir()) == sorted(r["imageName"] for r in rows)
    for r in rows[::7]:
        with Image.open(raw / "Hands" / r["imageName"]) as img:
            assert img.format == "JPEG"
            assert img.size == SIZE
            img.load()


def test_ids_split_about_in_half_by_published_thresholds(raw: Path) -> None:
    rows = _rows(raw)
    for aspect, threshold in THRESHOLDS.items():
        ids = {int(r["id"]) for r in rows if r["aspectOfHand"] == aspect}
        train = [i for i in ids if i <= threshold]
        assert len(train) == len(ids) // 2


def _pixels(raw: Path, rows: list[dict[str, str]]) -> np.ndarray:
    feats = []
    for r in rows:
        with Image.open(raw / "Hands" / r["imageName"]) as img:
            feats.append(np.asarray(img.convert("RGB").resize((24, 18), Image.BILINEAR), dtype=np.float32).ravel())
    return np.stack(feats)


def test_raw_pixels_are_a_poor_identity_cue(raw: Path) -> None:
    """Leave-one-out nearest neighbour on downsampled pixels re-identifies well below 100%."""
    rows = _rows(raw)
    for aspect in ("dorsal right", "palmar left"):
        sub = [r for r in rows if r["aspectOfHand"] == aspect]
        x = _pixels(raw, sub)
        y = np.array([r["id"] for r in sub])
        dist = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(dist, np.inf)
        rank1 = float((y[dist.argmin(1)] == y).mean())
        assert rank1 < 0.8, f"{aspect}: raw-pixel rank-1 {rank1:.2f} is too high"
        # ... while images of different identities are not identical
        assert np.abs(x[y != y[0]] - x[0]).mean() > 1.0


def test_same_seed_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(subjects=3, images_per_aspect=2, size=(64, 48))
    a = _tree_bytes(generate_dataset(tmp_path / "a", seed=5, workers=1, **kwargs).out_dir)
    b = _tree_bytes(generate_dataset(tmp_path / "b", seed=5, workers=2, **kwargs).out_dir)
    c = _tree_bytes(generate_dataset(tmp_path / "c", seed=6, workers=1, **kwargs).out_dir)
    assert a == b
    assert a != c


def test_refuses_non_empty_out_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "Hands").mkdir()
    (out / "Hands" / "stale.jpg").write_bytes(b"old")
    with pytest.raises(HandCLIPError, match="not empty.*--overwrite"):
        generate_dataset(out, subjects=2, images_per_aspect=2, size=(64, 48), workers=1)
    assert (out / "Hands" / "stale.jpg").exists()
    generate_dataset(out, subjects=2, images_per_aspect=2, size=(64, 48), workers=1, overwrite=True)
    assert not (out / "Hands" / "stale.jpg").exists()
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(list((out / "Hands").iterdir())) == len(_rows(out))


@pytest.mark.parametrize("bad", ["320", "axb", "10x10", "2000x1200"])
def test_bad_size(bad: str) -> None:
    with pytest.raises(HandCLIPError, match="size"):
        parse_size(bad)


def test_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(HandCLIPError, match="images-per-aspect"):
        generate_dataset(tmp_path / "x", subjects=2, images_per_aspect=1)
    with pytest.raises(HandCLIPError, match="subjects"):
        generate_dataset(tmp_path / "x", subjects=0)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert synth.main(["--out", str(out), "--subjects", "2", "--images-per-aspect", "2", "--size", "64x48",
                       "--workers", "1"]) == 0
    assert (out / "HandInfo.csv").is_file()
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        synth.main(["--out", str(out), "--subjects", "2"])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_contact_sheet(tmp_path: Path) -> None:
    png = contact_sheet(tmp_path / "sheet.png", identities=2, images_per_aspect=1, thumb=(48, 36))
    with Image.open(png) as img:
        assert img.width > 4 * 48 and img.height > 2 * 36


def test_force_keeps_old_images_until_the_new_set_is_complete(tmp_path, monkeypatch):
    import handclip.data.synthetic.dataset as synthetic

    out = tmp_path / "raw"
    synthetic.generate_dataset(out, subjects=2, images_per_aspect=2, size=(96, 72), workers=1)
    before = sorted(p.name for p in (out / "Hands").iterdir())
    csv_before = (out / "HandInfo.csv").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(synthetic, "run_jobs", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        synthetic.generate_dataset(out, subjects=3, images_per_aspect=2, size=(96, 72), workers=1, overwrite=True)
    assert sorted(p.name for p in (out / "Hands").iterdir()) == before
    assert (out / "HandInfo.csv").read_text() == csv_before
    assert not (out / ".Hands.partial").exists()


def test_hd_layout_in_the_published_proportions(tmp_path: Path) -> None:
    """synth --dataset hd: dorsal right photographs named <id>_<n>.jpg, train ids at or below 447, test ids in
    448..501 (both in 1-501), distractor ids in 502..712 (in 502-712); the same seed gives the same bytes."""
    from handclip.data.synthetic import generate_hd_dataset, hd_groups

    assert hd_groups(30) == (11, 10, 9)  # 9 = round(30 * 213 / 715) distractors, the rest halved
    generate_hd_dataset(tmp_path / "a", subjects=30, images_per_aspect=2, seed=3, size=SIZE, workers=1)
    root = tmp_path / "a" / "Original Images"
    ids: dict[str, set[int]] = {}
    for folder in ("1-501", "502-712"):
        for path in (root / folder).iterdir():
            assert re.fullmatch(r"\d+_\d+\.jpg", path.name), path
            ids.setdefault(folder, set()).add(int(path.name.split("_")[0]))
            assert Image.open(path).size == SIZE
    low, high = {i for i in ids["1-501"] if i <= 447}, {i for i in ids["1-501"] if i > 447}
    assert (len(low), len(high), len(ids["502-712"])) == (11, 10, 9)
    assert max(high) <= 501 and min(ids["502-712"]) >= 502 and max(ids["502-712"]) <= 712
    generate_hd_dataset(tmp_path / "b", subjects=30, images_per_aspect=2, seed=3, size=SIZE, workers=2)
    files = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    other = tmp_path / "b" / "Original Images"
    assert files == sorted(p.relative_to(other) for p in other.rglob("*.jpg"))
    assert all((root / f).read_bytes() == (other / f).read_bytes() for f in files)
    for bad in (5, 151):
        with pytest.raises(HandCLIPError, match=rf"^--subjects must be between 6 and 150 for --dataset hd, got {bad}$"):
            generate_hd_dataset(tmp_path / "c", subjects=bad)
