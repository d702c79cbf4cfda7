"""HandCLIP Studio (handclip.app): the app's functions against identify, the HTTP surface in-process (uploads,
traversal, enrol then identify), the grey zone at its boundaries, names and uploads checked, the host/auth rule."""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import threading
import zlib
from pathlib import Path

import pytest
from conftest import make_layout, run_module, tiny_cfg, write_image
from PIL import Image

from handclip.app.decisions import band
from handclip.app.gallery import check_person
from handclip.app.settings import Limits, check_host
from handclip.app.uploads import MAX_UPLOAD_PIXELS, check_upload, check_uploads
from handclip.errors import HandCLIPError
from handclip.hands import hand_dir_name

HAND_DIR = hand_dir_name("dorsal_right")


@pytest.fixture(scope="module")
def studio_env(tmp_path_factory):
    """A 1-epoch tiny model with its calibration, a gallery of 3 people, and the app on them (50 kB upload cap)."""
    from handclip.config import compose
    from handclip.train import train

    base = tmp_path_factory.mktemp("app")
    data = make_layout(base / "data", n_train_ids=4, n_test_ids=3, per_id=3, runs=1)
    train(tiny_cfg(data, base / "outputs", "trainer.max_epochs=1"))
    gallery = base / "gallery"
    shutil.copytree(data / HAND_DIR / "gallery0", gallery)
    cfg = compose("app", ["experiment=demo", f"models_root={base / 'outputs'}", f"galleries=[{gallery}]",
                          f"out={base / 'app'}", "max_file_mb=0.05", "max_files=10", "device=cpu", "top_k=3"])
    from handclip.app.server import create_app

    app, studio, _ = create_app(cfg)
    return {"base": base, "data": data, "gallery": gallery, "app": app, "studio": studio, "cfg": cfg,
            "ckpt": base / "outputs" / "train" / "dorsal_right" / "checkpoints" / "best.ckpt",
            "queries": sorted((data / HAND_DIR / "query0").rglob("*.png"))}


@pytest.fixture(scope="module")
def client(studio_env):
    from fastapi.testclient import TestClient

    with TestClient(studio_env["app"]) as c:
        yield c


def request(env, top_k=3, target_fmr=None):
    from handclip.app.engine import Request

    studio = env["studio"]
    return Request(studio.models[0].label, studio.gallery_labels[0], top_k, target_fmr)


# -- the app's answers are identify's ------------------------------------------------------------------------
@pytest.mark.parametrize(("target_fmr", "gallery_mode"), [(None, "max"), (0.1, "max"), (None, "mean")])
def test_the_app_gives_identify_top_k_and_decisions(studio_env, target_fmr, gallery_mode):
    import handclip

    studio = studio_env["studio"]
    assert studio.models[0].path == studio_env["ckpt"]
    asked = request(studio_env, 3, target_fmr)
    asked.gallery_mode = gallery_mode
    outcome = studio.identify(studio_env["queries"], asked)
    expected = handclip.load(studio_env["ckpt"], cache_dir=studio_env["base"] / "cache").identify(
        studio_env["data"] / HAND_DIR / "query0", studio_env["gallery"], top_k=3, target_fmr=target_fmr,
        gallery_mode=gallery_mode)
    assert outcome.result["mode"]["gallery_mode"] == gallery_mode
    assert outcome.labels == [q.name for q in studio_env["queries"]] and len(expected) == len(outcome.records)
    for mine, theirs in zip(outcome.records, expected):
        assert mine["decision"] == theirs["decision"] and mine["accepted"] == theirs["accepted"]
        assert [t["identity"] for t in mine["top"]] == [t["identity"] for t in theirs["top"]]
        assert [t["score"] for t in mine["top"]] == pytest.approx([t["score"] for t in theirs["top"]], abs=1e-6)
        assert [Path(t["file"]).name for t in mine["top"]] == [Path(t["file"]).name for t in theirs["top"]]
    # the downloads are identify's own files, with these records
    written = json.loads(outcome.files["json"].read_text())
    assert [r["decision"] for r in written["queries"]] == [r["decision"] for r in outcome.records]
    assert outcome.files["csv"].read_text().splitlines()[0].startswith("query,true_identity,decision")
    assert outcome.band.threshold == written["threshold"]["threshold"]
    calibration = json.loads(studio_env["ckpt"].with_name("best.calibration.json").read_text())
    levels = calibration["levels"] if gallery_mode == "max" else calibration["modes"][gallery_mode]["levels"]
    assert outcome.band == band(written["threshold"], levels)  # the grey zone of this decision mode


def same_records(mine: list[dict], theirs: list[dict]) -> None:
    assert [r["decision"] for r in mine] == [r["decision"] for r in theirs]
    assert [[t["identity"] for t in r["top"]] for r in mine] == [[t["identity"] for t in r["top"]] for r in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]], abs=1e-5)


def test_an_exported_model_and_the_zero_shot_model_are_offered_and_answer_as_identify(studio_env):
    import handclip
    from handclip.app.engine import Request
    from handclip.models.open_clip_export import export_open_clip

    studio, base = studio_env["studio"], studio_env["base"]
    export_open_clip(studio_env["ckpt"], base / "outputs" / "export" / "dr.safetensors")
    zero_shot = handclip.load(model="HandCLIP-Tiny", seed=42)
    calibration = json.loads(studio_env["ckpt"].with_name("best.calibration.json").read_text())
    folder = base / "outputs" / "zs" / "eval"  # as eval writes it for the zero-shot model (its figures borrowed)
    folder.mkdir(parents=True)
    (folder / "dorsal_right_zeroshot.calibration.json").write_text(
        json.dumps({**calibration, "model_fingerprint": zero_shot.fingerprint}))
    try:
        labels = studio.refresh()
        assert labels[0] == studio.models[0].label and studio.models[0].kind == "checkpoint"
        kinds = {m.kind: m for m in studio.models}
        assert kinds["export"].label == "exported · export/dr.safetensors"
        assert kinds["zero-shot"].label == "zero-shot HandCLIP-Tiny · zs/eval/dorsal_right_zeroshot.calibration.json"
        queries = studio_env["queries"][:3]
        by_checkpoint = studio.identify(queries, request(studio_env)).records
        by_export = studio.identify(queries, Request(kinds["export"].label, studio.gallery_labels[0], 3)).records
        same_records(by_export, by_checkpoint)  # the same image tower, the checkpoint's calibration
        mine = studio.identify(queries, Request(kinds["zero-shot"].label, studio.gallery_labels[0], 3))
        theirs = handclip.load(model="HandCLIP-Tiny", seed=42, calibration=folder / "dorsal_right_zeroshot."
                               "calibration.json", cache_dir=base / "cache").identify(queries[0], studio_env["gallery"],
                                                                                    top_k=3)
        same_records(mine.records[:1], theirs)
        assert mine.result["model"]["zero_shot"] == "HandCLIP-Tiny"
        # another calibration file of the same zero-shot model: its threshold, the weights loaded once
        (folder / "palmar_left_zeroshot.calibration.json").write_text(
            json.dumps({**calibration, "model_fingerprint": zero_shot.fingerprint, "threshold": 0.25}))
        other = next(label for label in studio.refresh() if label.endswith("palmar_left_zeroshot.calibration.json"))
        again = studio.identify(queries, Request(other, studio.gallery_labels[0], 3))
        assert again.band.threshold == 0.25 and [r["score"] for r in again.records] == [r["score"] for r in
                                                                                       mine.records]
        assert studio.model(other).encoder is studio.model(kinds["zero-shot"].label).encoder
    finally:
        shutil.rmtree(base / "outputs" / "zs")
        shutil.rmtree(base / "outputs" / "export")
        studio.refresh()


def test_the_first_gallery_offered_is_the_one_of_the_model_hand(studio_env, tmp_path):
    from handclip.app.engine import Studio
    from handclip.app.settings import Folders

    splits = [tmp_path / hand_dir_name(h) / "gallery0" for h in ("dorsal_left", "dorsal_right", "palmar_left")]
    studio = Studio(Folders(galleries=splits, models_root=studio_env["studio"].folders.models_root,
                            out=tmp_path / "app"), Limits())
    assert studio.models[0].hand == "dorsal_right" and studio.default_gallery(studio.models[0].label) == str(splits[1])
    assert studio.default_gallery(None) == str(splits[0])


def test_batch_in_chunks_gives_the_same_records_and_one_csv(studio_env):
    studio, steps = studio_env["studio"], []
    whole = studio.identify(studio_env["queries"], request(studio_env))
    parts = studio.identify(studio_env["queries"], request(studio_env), chunk=2,
                            progress=lambda done, total: steps.append((done, total)))
    n = len(studio_env["queries"])
    assert steps == [(min(k + 2, n), n) for k in range(0, n, 2)]
    for mine, theirs in zip(parts.records, whole.records, strict=True):  # batches of other sizes: float rounding
        assert [t["identity"] for t in mine["top"]] == [t["identity"] for t in theirs["top"]]
        assert [t["score"] for t in mine["top"]] == pytest.approx([t["score"] for t in theirs["top"]], abs=1e-5)
    rows = parts.files["csv"].read_text().splitlines()
    assert len(rows) == 1 + 3 * n  # one header, top-3 rows per photo


def test_nothing_is_written_outside_the_gallery_and_the_app_folder(studio_env, tmp_path, monkeypatch):
    import tempfile

    studio, base = studio_env["studio"], studio_env["base"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a stray temporary file would go

    def snapshot():
        return {p: p.stat().st_mtime_ns for p in base.rglob("*") if studio.folders.out not in p.parents
                and studio_env["gallery"] not in p.parents and p not in (studio.folders.out, studio_env["gallery"])}

    before = snapshot()
    studio.identify(studio_env["queries"][:2], request(studio_env))
    photo = write_image(base / "app" / "in" / "e.png", seed=3, size=(48, 48), identity=5000)
    studio.enrol(studio.gallery_labels[0], "erin", [photo], studio.models[0].label)
    studio.remove_person(studio.gallery_labels[0], "erin", studio.models[0].label)
    assert snapshot() == before and list(tmp_path.iterdir()) == []


def test_request_folders_and_thumbnails_go_after_a_day(studio_env):
    import os
    import time

    studio = studio_env["studio"]
    first = studio.identify(studio_env["queries"][:1], request(studio_env))
    folder = first.files["json"].parents[1]
    studio.tiles(first, request(studio_env))
    thumbs = sorted((studio.folders.out / "thumbs").iterdir())
    day_ago = time.time() - 24 * 3600 - 60
    for path in (folder, thumbs[0]):
        os.utime(path, (day_ago, day_ago))
    second = studio.identify(studio_env["queries"][:1], request(studio_env))
    assert not folder.exists() and not thumbs[0].exists() and all(t.exists() for t in thumbs[1:])
    assert second.files["json"].is_file()


# -- the decision band ---------------------------------------------------------------------------------------
LEVELS = [{"target_fmr": 0.1, "threshold": 0.5}, {"target_fmr": 0.01, "threshold": 0.7},
          {"target_fmr": 0.001, "threshold": 0.8}, {"target_fmr": 0.0001, "threshold": 0.9}]


def test_grey_zone_lies_between_the_neighbouring_levels_at_its_exact_ends():
    b = band({"threshold": 0.7, "target_fmr": 0.01}, LEVELS)
    assert (b.low, b.high, b.low_fmr, b.high_fmr) == (0.5, 0.8, 0.1, 0.001)
    assert [b.zone(s) for s in (0.8, 0.7999, 0.7, 0.5, 0.4999)] == ["match", "grey zone", "grey zone", "grey zone",
                                                                    "no match"]
    loosest = band({"threshold": 0.5, "target_fmr": 0.1}, LEVELS)  # no looser level: the zone starts at it
    assert (loosest.low, loosest.high) == (0.5, 0.7)
    strictest = band({"threshold": 0.9, "target_fmr": 0.0001}, LEVELS)
    assert (strictest.low, strictest.high) == (0.8, 0.9) and strictest.zone(0.9) == "match"
    given = band({"threshold": 0.6}, None)  # threshold= given: no zone
    assert given.zone(0.6) == "match" and given.zone(0.5999) == "no match"


def test_the_decision_line_names_threshold_fmr_and_grey_zone():
    from handclip.app.decisions import describe

    b = band({"threshold": 0.7, "target_fmr": 0.01}, LEVELS)
    assert describe({"decision": "alice", "score": 0.85}, b) == (
        "**alice** (score 0.850 ≥ threshold 0.700 at FMR 1 %)")
    assert describe({"decision": "alice", "score": 0.75}, b).endswith(
        " — grey zone: between the thresholds at FMR 10 % (0.500) and 0.1 % (0.800); check by eye")
    assert describe({"decision": "unknown", "score": 0.45}, b) == (
        "**unknown** (best score 0.450 < threshold 0.700 at FMR 1 %)")


# -- names and uploads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "  ", "../x", "a/b", "a\\b", "..", "a..b", ".hidden", "~root", "a\x00b",
                                  "tab\there", "x" * 81, "unknown", "Unknown"])
def test_unsafe_person_names_are_refused(name):
    with pytest.raises(HandCLIPError):
        check_person(name)


@pytest.mark.parametrize("name", ["alice", "José Ortega", "o'brien-2", "x" * 80])
def test_plain_person_names_are_taken(name):
    assert check_person(f" {name} ") == name


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb when large)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))
    return path


def test_uploads_are_checked_by_content(tmp_path):
    limits = Limits(max_file_bytes=200_000)
    (tmp_path / "text.jpg").write_text("not a photo")
    (tmp_path / "empty.png").write_bytes(b"")
    good = write_image(tmp_path / "upload name.png", seed=1, size=(40, 30))
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    write_image(tmp_path / "big.bmp", seed=1, size=(400, 300))  # 360 kB
    cases = {
        "text.jpg": "not an image", "empty.png": "empty",
        "bomb.png": "decompression bomb", "huge.png": f"over the {MAX_UPLOAD_PIXELS // 10**6} megapixels",
        "tiny.png": "too small", "thin.png": "aspect ratio", "truncated.png": "text.jpg", "big.bmp": "MB",
    }
    png_claiming(tmp_path / "bomb.png", 60000, 60000)
    png_claiming(tmp_path / "huge.png", 8000, 6000)
    write_image(tmp_path / "tiny.png", seed=1, size=(15, 15))
    write_image(tmp_path / "thin.png", seed=1, size=(400, 20))
    for name, words in cases.items():
        with pytest.raises(HandCLIPError) as err:
            check_upload(tmp_path / name, limits)
        assert str(err.value).startswith(f"{name}: ") and str(tmp_path) not in str(err.value)
        if name != "truncated.png":
            assert words in str(err.value)
    ok = check_upload(good, limits)
    assert ok.file_name == ok.digest[:24] + ".png" and "upload" not in ok.file_name  # named by content
    assert check_upload(write_image(tmp_path / "photo.dat", seed=2, fmt="JPEG"), limits).suffix == ".jpg"
    accepted, messages = check_uploads([good] * 3, limits, max_files=2)
    assert accepted == [] and messages == ["3 files at once; at most 2 are taken (send them in parts)"]


def test_exif_orientation_is_applied_to_what_is_shown(tmp_path):
    from handclip.app.uploads import thumbnail

    img = Image.new("RGB", (60, 30), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert Image.open(thumbnail(tmp_path / "phone.jpg", tmp_path / "t.jpg")).size == (30, 60)


# -- over HTTP, in process -----------------------------------------------------------------------------------
def upload(client, *files: tuple[str, bytes]) -> list[dict]:
    done = client.post("/gradio_api/upload", files=[("files", (name, data, "application/octet-stream"))
                                                    for name, data in files])
    assert done.status_code == 200, done.text
    return [{"path": p, "meta": {"_type": "gradio.FileData"}} for p in done.json()]


def call(client, api: str, data: list) -> list:
    """An event through gradio's HTTP API (POST, then its server-sent events); the outputs of the complete event."""
    event = client.post(f"/gradio_api/call/{api}", json={"data": data})
    assert event.status_code == 200, event.text
    stream = client.get(f"/gradio_api/call/{api}/{event.json()['event_id']}").text
    kind = None
    for line in stream.splitlines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: ") and kind == "complete":
            return json.loads(line.removeprefix("data: "))
    raise AssertionError(f"no complete event: {stream[:500]}")


def test_the_page_is_served_without_cdn_fonts(client):
    page = client.get("/")
    assert page.status_code == 200 and "HandCLIP Studio" in page.text
    assert "fonts.googleapis" not in client.get("/theme.css").text


def test_an_oversize_upload_is_refused_with_413(client, studio_env):
    assert studio_env["studio"].limits.max_file_bytes == int(0.05 * 2**20)
    too_big = client.post("/gradio_api/upload", files=[("files", ("big.png", b"x" * 60_000, "image/png"))])
    assert too_big.status_code == 413
    from handclip.config import compose

    assert compose("app").max_file_mb == 20  # the default cap


@pytest.mark.parametrize("path", [
    "/gradio_api/file=/etc/passwd", "/file=/etc/passwd", "/file=../../../../etc/passwd",
    "/gradio_api/file=../../../../etc/passwd", "/gradio_api/file=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/gradio_api/file=%2Fetc%2Fpasswd", "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/gradio_api/file=GALLERY/../../../etc/passwd", "/gradio_api/file=GALLERY/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/gradio_api/file=CKPT", "/gradio_api/file=OUT/.hydra/config.yaml", "/static/../../../../etc/passwd",
    "/assets/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
])
def test_no_file_is_served_from_outside_the_app_folders(client, studio_env, path):
    path = (path.replace("GALLERY", str(studio_env["gallery"])).replace("CKPT", str(studio_env["ckpt"]))
            .replace("OUT", str(studio_env["studio"].folders.out)))
    (studio_env["studio"].folders.out / ".hydra").mkdir(parents=True, exist_ok=True)
    (studio_env["studio"].folders.out / ".hydra" / "config.yaml").write_text("secret: 1\n")
    answer = client.get(path)
    assert answer.status_code in (403, 404), (path, answer.status_code)
    assert b"root:" not in answer.content and b"secret" not in answer.content


def test_a_gallery_photo_is_served(client, studio_env):
    photo = sorted(studio_env["gallery"].rglob("*.png"))[0]
    served = client.get(f"/gradio_api/file={photo}")
    assert served.status_code == 200 and served.content == photo.read_bytes()


def test_a_bad_upload_gives_its_message_and_the_next_good_one_works(client, studio_env):
    studio = studio_env["studio"]
    options = [studio.models[0].label, studio.gallery_labels[0], 3, "calibrated target", "max", "off", "auto"]
    bad = upload(client, ("holiday.jpg", b"GIF89a not really"))
    messages, decision, table, _, files = call(client, "identify", [bad, *options])
    assert "holiday.jpg: not an image" in messages and decision == "" and files is None
    good = upload(client, ("query.png", studio_env["queries"][0].read_bytes()))
    messages, decision, table, tiles, files = call(client, "identify", [good, *options])
    assert messages == "" and "query.png:" in decision and "threshold" in decision
    assert [row[:3] for row in table["data"]][0][:2] == ["query.png", 1] and len(table["data"]) == 3
    assert len(tiles) == 4 and sorted(Path(f["path"]).suffix for f in files) == [".csv", ".json"]


def test_batch_takes_files_and_a_folder_and_gives_one_table_and_csv(client, studio_env):
    studio, queries = studio_env["studio"], studio_env["queries"]
    options = [studio.models[0].label, studio.gallery_labels[0], 2, "0.1", "max", "off", "auto"]
    files = upload(client, *((q.name, q.read_bytes()) for q in queries[:2]))
    folder = upload(client, *((q.name, q.read_bytes()) for q in queries[2:4]), ("notes.txt", b"no photo"))
    status, table, downloads = call(client, "batch", [files, folder, *options])
    assert status.startswith("4 photo(s) identified") and "notes.txt: not an image" in status
    assert [row[0] for row in table["data"]] == [q.name for q in queries[:4]]
    csv_file = next(Path(f["path"]) for f in downloads if f["path"].endswith(".csv"))
    assert len(csv_file.read_text().splitlines()) == 1 + 2 * 4
    assert all(row[1] == r["decision"] for row, r in zip(table["data"], studio.identify(
        queries[:4], request(studio_env, 2, 0.1)).records))


def test_a_client_file_name_never_becomes_a_path(client, studio_env):
    studio, base = studio_env["studio"], studio_env["base"]
    name = "../../../../../" + str(base / "evil.png").lstrip("/")
    sent = upload(client, (name, studio_env["queries"][0].read_bytes()))
    options = [studio.models[0].label, studio.gallery_labels[0], 3, "calibrated target", "max", "off", "auto"]
    _, _, table, _, _ = call(client, "identify", [sent, *options])
    status, *_ = call(client, "enrol", [studio.gallery_labels[0], "mallory", sent, studio.models[0].label])
    assert table["data"][0][0] == "evil.png" and "mallory: 1 photo(s) added" in status
    assert not (base / "evil.png").exists() and not list(base.parent.glob("evil.png"))
    assert [p.name for p in (studio_env["gallery"] / "mallory").iterdir()] == [
        f"{__import__('hashlib').sha256(studio_env['queries'][0].read_bytes()).hexdigest()[:24]}.png"]
    call(client, "remove_person", [studio.gallery_labels[0], "mallory", studio.models[0].label])


def test_enrolment_then_identify_finds_the_new_person(client, studio_env, tmp_path):
    studio = studio_env["studio"]
    photos = [write_image(tmp_path / f"d{k}.png", seed=k, size=(48, 48), identity=3000) for k in range(2)]
    sent = upload(client, *((p.name, p.read_bytes()) for p in photos))
    status, people, *_ = call(client, "enrol", [studio.gallery_labels[0], "dave", sent, studio.models[0].label])
    assert "dave: 2 photo(s) added" in status and "index updated: 2 photo(s) embedded" in status, status
    assert ["dave", 2] in people["data"]
    assert sorted(p.name for p in (studio_env["gallery"] / "dave").iterdir()) == sorted(
        f"{__import__('hashlib').sha256(p.read_bytes()).hexdigest()[:24]}.png" for p in photos)
    query = io.BytesIO()
    Image.open(photos[0]).save(query, format="JPEG", quality=95)  # other bytes, the same picture
    options = [studio.models[0].label, studio.gallery_labels[0], 3, "calibrated target", "max", "off", "auto"]
    _, _, table, _, _ = call(client, "identify", [upload(client, ("who.jpg", query.getvalue())), *options])
    assert table["data"][0][:3] == ["who.jpg", 1, "dave"]
    status, people, *_ = call(client, "remove_person", [studio.gallery_labels[0], "dave", studio.models[0].label])
    assert "dave removed (2 photo(s))" in status and "dave" not in [row[0] for row in people["data"]]
    assert not (studio_env["gallery"] / "dave").exists()
    status, *_ = call(client, "remove_person", [studio.gallery_labels[0], "../data", studio.models[0].label])
    assert "no person" in status and (studio_env["base"] / "data").is_dir()


def test_enrolment_refuses_a_bad_name_and_writes_nothing(client, studio_env):
    studio = studio_env["studio"]
    before = sorted(p.name for p in studio_env["gallery"].iterdir())
    sent = upload(client, ("x.png", studio_env["queries"][0].read_bytes()))
    status, *_ = call(client, "enrol", [studio.gallery_labels[0], "../evil", sent, studio.models[0].label])
    assert "no path separators" in status
    assert sorted(p.name for p in studio_env["gallery"].iterdir()) == before


def test_identify_never_sees_a_half_enrolled_person(studio_env, tmp_path, monkeypatch):
    """Enrolments of two photos each run while identify runs: every identify sees whole people only (each photo
    write is slowed down, so that an identify would fall between two writes without the gallery's lock)."""
    import time

    from handclip.app.uploads import Upload

    save = Upload.save
    monkeypatch.setattr(Upload, "save", lambda self, *args: (save(self, *args), time.sleep(0.3))[0])
    studio, label, gallery = studio_env["studio"], studio_env["studio"].models[0].label, studio_env["gallery"]
    base = len(list(gallery.rglob("*.png")))
    seen, errors = [], []

    def enrol():
        try:
            for n in range(3):
                files = [write_image(tmp_path / f"p{n}_{k}.png", seed=k, size=(48, 48), identity=4000 + n)
                         for k in range(2)]
                studio.enrol(studio.gallery_labels[0], f"person{n}", files, label)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    writer = threading.Thread(target=enrol)
    writer.start()
    while True:  # at least once, then until the enrolments are done
        seen.append(studio.identify(studio_env["queries"][:1], request(studio_env)).result["gallery"]["images"])
        if not writer.is_alive():
            break
    writer.join()
    assert not errors and seen and all((n - base) % 2 == 0 for n in seen), seen
    for n in range(3):
        studio.remove_person(studio.gallery_labels[0], f"person{n}", label)


def test_explore_shows_the_evaluation_of_the_chosen_model(studio_env):
    studio, label = studio_env["studio"], studio_env["studio"].models[0].label
    text, pictures = studio.evaluation(label)  # no eval run yet: says how to make one; the training curves
    assert "python -m handclip.eval" in text and [c for _, c in pictures] == ["training curves"]
    folder = studio_env["base"] / "outputs" / "eval"
    folder.mkdir()
    (folder / "comparison.md").write_text("| hand | rank-1 |\n|---|---|\n| dorsal_right | 0.5 |\n")
    for name in ("comparison_cmc_dorsal_right", "comparison_cmc_palmar_left", "comparison_roc_det"):
        write_image(folder / f"{name}.png", seed=1)
    try:
        text, pictures = studio.evaluation(label)
        assert "| dorsal_right | 0.5 |" in text
        assert [c for _, c in pictures] == ["comparison_roc_det", "comparison_cmc_dorsal_right", "training curves"]
    finally:
        shutil.rmtree(folder)


# -- the address and the login -------------------------------------------------------------------------------
def test_another_host_needs_auth_and_warns(caplog):
    assert check_host("127.0.0.1", None) is None and check_host("localhost", None) is None
    assert check_host("::1", "u:p") == ("u", "p")
    with pytest.raises(HandCLIPError, match="host=0.0.0.0 .* only with auth=USER:PASSWORD"):
        check_host("0.0.0.0", None)
    with pytest.raises(HandCLIPError, match="USER:PASSWORD"):
        check_host("192.168.1.5", "nopassword")
    with caplog.at_level(logging.WARNING):
        assert check_host("0.0.0.0", "analyst:secret") == ("analyst", "secret")
    assert "other machines can reach" in caplog.text and "secret" not in caplog.text


def test_the_command_refuses_another_host_without_auth_in_one_line(tmp_path):
    done = run_module("handclip.app", "host=0.0.0.0", f"out={tmp_path / 'app'}", f"paths.output_root={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: host=0.0.0.0 would let other machines reach the app (biometric data); it is served on another "
        "address than loopback (127.0.0.1) only with auth=USER:PASSWORD set"]


def test_with_auth_the_page_needs_a_login(studio_env):
    from fastapi.testclient import TestClient

    from handclip.app.server import create_app

    cfg = studio_env["cfg"].copy()
    cfg.auth = "analyst:secret"
    app, _, _ = create_app(cfg)
    with TestClient(app) as c:
        assert c.get("/config").status_code == 401
        assert c.post("/login", data={"username": "analyst", "password": "wrong"}).status_code == 400
        assert c.post("/login", data={"username": "analyst", "password": "secret"}).status_code == 200
        assert c.get("/config").status_code == 200
