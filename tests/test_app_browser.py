"""HandCLIP Studio in a real browser: the server started as a user starts it (``python -m handclip.app`` on a free
loopback port), headless Chromium (Debian's, driven by Playwright) enrols a person with several photos, identifies
one of them, and the page shows the person first at score 1 with the decision; a screenshot of the page is saved.
The server ends with the test, also when it fails (conftest.app_server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import ROOT, app_server
from studio_page import enrol, identify, open_studio, table

from handclip.bench.app import make_gallery, write_photo, zero_shot_model

SIZE = (64, 64)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """The app on a gallery of 4 people x 3 photos and the zero-shot tiny model, calibrated on that gallery."""
    tmp = tmp_path_factory.mktemp("studio")
    gallery = make_gallery(tmp / "gallery", 12, 3, SIZE)
    photos = [p for files in gallery.values() for p in files]
    zero_shot_model(tmp / "models", "HandCLIP-Tiny", photos, [p for p, files in gallery.items() for _ in files], 42)
    args = ["model=tiny", "model.model_name=HandCLIP-Tiny", "seed=42", f"models_root={tmp / 'models'}",
            f"galleries=[{json.dumps(str(tmp / 'gallery'))}]", f"out={tmp / 'out'}", "device=cpu"]
    with app_server(tmp, *args) as server:
        yield {"server": server, "gallery": tmp / "gallery", "people": sorted(gallery), "tmp": tmp}
    assert server.process.poll() is not None  # nothing outlives the test


@pytest.mark.slow
@pytest.mark.browser
def test_enrol_a_person_then_identify_their_photo(studio, browser, tmp_path):
    alice = [write_photo(tmp_path / "upload" / f"alice{j}.jpg", 100 + j, SIZE) for j in range(3)]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        open_studio(page, studio["server"].url)
        status = enrol(page, "alice", alice)
        assert "alice: 3 photo(s) added" in status.replace("\\", ""), status
        assert ["alice", "3"] in table(page, "enrol-people")
        assert sorted(p.suffix for p in (studio["gallery"] / "alice").iterdir()) == [".jpg"] * 3  # on disk, by hash

        decision, rows = identify(page, [alice[1]], "alice")
        assert rows[0] == ["photo", "rank", "person", "score", "decision", "zone"]
        assert len(rows) == 1 + 5  # top-5 of the 5 people
        photo, rank, person, score, decided, zone = rows[1]
        assert (photo, rank, person, decided, zone) == ("alice1.jpg", "1", "alice", "alice", "match")
        assert float(score) >= 0.999  # the photo matches itself
        assert [r[1] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
        assert {r[2] for r in rows[2:]} == set(studio["people"])  # everyone else, once
        assert [float(r[3]) for r in rows[1:]] == sorted((float(r[3]) for r in rows[1:]), reverse=True)
        assert all(r[0] == "alice1.jpg" and r[4] == "" for r in rows[2:])  # one decision per photo
        assert "alice1.jpg: alice (score 1.000 ≥ threshold" in decision
        assert "at FMR 1 %" in decision
    finally:
        page.screenshot(path=tmp_path / "studio.png", full_page=True)
        page.close()
    shot = (tmp_path / "studio.png").read_bytes()
    assert shot.startswith(b"\x89PNG") and len(shot) > 20_000


def make_browser(tmp_path, chromium: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), "browser", f"CHROMIUM={chromium}"], capture_output=True,
                          text=True, env={**_without_make_level(), "PATH": path}, timeout=60)


def _without_make_level() -> dict:
    """The environment without what an outer make (``make test``) passes on: its sub-make would say
    ``make[2]: ***`` instead of ``make: ***``."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def test_make_browser_accepts_an_installed_chromium(tmp_path):
    fake = tmp_path / "chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    done = make_browser(tmp_path, str(fake), os.environ["PATH"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_without_chromium_or_a_way_to_install_it_make_browser_says_how_in_one_line(tmp_path):
    """Not root, or no apt-get: nothing is installed, and the one line says what to do (never a skipped test)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("make", "id"):  # and no apt-get, no chromium on this PATH
        (bin_dir / tool).symlink_to(shutil.which(tool))
    done = make_browser(tmp_path, "", str(bin_dir))
    assert done.returncode != 0 and done.stdout == ""
    first, *rest = done.stderr.splitlines()
    assert first == ("error: the browser tests need Chromium: sudo apt-get install chromium (Debian/Ubuntu), or "
                     "make test CHROMIUM=/path/to/chrome")
    assert all(line.startswith("make: ***") for line in rest)  # make's own note of the failed target
