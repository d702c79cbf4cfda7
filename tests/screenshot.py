"""docs/studio.png, the README's picture of HandCLIP Studio: the app on the demo's model and gallery (after
`make demo`), two of the demo's query photos identified in headless Chromium, the page saved (`make screenshot`).

    python tests/screenshot.py [--out docs/studio.png]

The app runs as `make app` runs it (experiment=demo) on a free loopback port, with its own folder in a temporary
directory; it ends with the script. The photos: from the demo's identify results, one photo decided right and one
decided unknown although its person ranks first (the demo model is weak and its threshold strict).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "outputs" / "demo"
HAND_DIR = "train_val_test_split_dorsal_r"
QUERIES = ROOT / "data" / "demo" / "splits" / HAND_DIR / "query0"


def demo_photos() -> list[Path]:
    """A query photo the demo decides right and one it calls unknown though its person ranks first."""
    results = DEMO / "identify" / "query0-vs-gallery0" / "results.json"
    local = lambda record: QUERIES / Path(record["query"]).parent.name / Path(record["query"]).name
    try:
        records = json.loads(results.read_text())["queries"]
    except (OSError, ValueError, KeyError):
        return sorted(QUERIES.glob("*/*.jpg"))[:2]
    right = [r for r in records if r.get("correct")]
    near = [r for r in records if r["decision"] == "unknown" and r["top"][0]["identity"] == r.get("true_identity")]
    return [local(r) for r in (right[:1] + near[:1])] or sorted(QUERIES.glob("*/*.jpg"))[:2]


def choose(page, elem_id: str, text: str) -> None:
    """Pick the option of a dropdown that contains ``text``."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option").filter(has_text=text).first.click()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "studio.png")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if not (DEMO / "train" / "dorsal_right" / "checkpoints" / "best.ckpt").is_file() or not QUERIES.is_dir():
        print("error: no demo model or data here: run `make demo` first", file=sys.stderr)
        return 2
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not chromium:
        print("error: Chromium is needed: make browser (as root: apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright
    from studio_page import identify, open_studio

    from handclip.utils.servers import local_server

    photos = demo_photos()
    with tempfile.TemporaryDirectory(prefix="handclip-screenshot-") as tmp:
        command = lambda port: [sys.executable, "-m", "handclip.app", "experiment=demo", "host=127.0.0.1",
                                f"port={port}", f"out={tmp}/app", "device=cpu"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
        with local_server(command, Path(tmp) / "server.log", env=env, cwd=ROOT) as server, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            open_studio(page, server.url)
            choose(page, "gallery-select", HAND_DIR)
            _, rows = identify(page, photos, "Threshold")
            page.wait_for_timeout(1500)  # the thumbnails load
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(f"written: {args.out} ({len(rows) - 1} table rows for {', '.join(p.name for p in photos)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
