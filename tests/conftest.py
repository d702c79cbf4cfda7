"""Shared fixtures and helpers: small split layouts written on the fly, configs, run logs, offline settings."""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from handclip.hands import ELEVEN_K_HANDS, HAND_TYPES, hand_dir_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def tiny_preprocess():
    """open_clip preprocessing of the tiny test architecture (64 x 64 crops).

    A function, not a constant: conftest is imported by pytest-xdist's controller too, which runs no test
    and should not spend seconds importing open_clip before the workers start.
    """
    from handclip.models.clip import preprocess_config

    return preprocess_config("HandCLIP-Tiny", None)


#: The five figures a training run logs once per epoch.
FIVE_METRICS = ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/rank1")


# -- images and layouts ------------------------------------------------------------------------
def identity_pixels(identity: int, seed: int, size=(48, 48)) -> np.ndarray:
    """An image that carries its identity in a learnable but not trivial way.

    Each identity owns a fixed 6 x 6 pattern of light and dark cells; every image of it shows that
    pattern (amplitude 60) over a random background colour with pixel noise. A randomly initialised
    tiny ViT ranks mostly by colour, so ``val/rank1`` starts low and rises as the pattern is learnt.
    """
    pattern = np.random.default_rng([identity, 7]).choice([-1.0, 1.0], size=(6, 6, 3))
    rng = np.random.default_rng([identity, seed, 11])
    cells = np.kron(pattern, np.ones((size[1] // 6, size[0] // 6, 1)))
    pixels = rng.uniform(50, 205, size=3) + 60 * cells + rng.normal(0, 10, size=cells.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_image(path: Path, seed: int, size=(40, 30), mode: str = "RGB", fmt: str | None = None,
                identity: int | None = None) -> Path:
    """A small image: random colour and noise from ``seed``, or (``identity`` given) an identity's pattern."""
    if identity is not None:
        pixels = identity_pixels(identity, seed, size)
    else:
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


def make_layout(root: Path, hands=("dorsal_right",), n_train_ids=4, n_test_ids=3, per_id=3, runs=2,
                size=(48, 48)) -> Path:
    """Write a tiny split layout: train/val/train_all for train ids, test/query{i}/gallery{i} for test ids.

    Images carry their identity (:func:`identity_pixels`), so a model can learn from them. PNG keeps
    the pattern exact.
    """
    for h, hand in enumerate(hands):
        base = root / hand_dir_name(hand)
        for i in range(n_train_ids):
            ident = f"{i:07d}"
            for k in range(per_id):
                split = "val" if k == 0 else "train"
                name = f"Hand_{h}{i:03d}{k}.png"
                write_image(base / split / ident / name, seed=k, size=size, identity=i)
                write_image(base / "train_all" / ident / name, seed=k, size=size, identity=i)
        for i in range(n_test_ids):
            ident = f"{2000 + i:07d}"
            names = [f"Hand_{h}{2000 + i}{k}.png" for k in range(per_id)]
            for k, name in enumerate(names):
                write_image(base / "test" / ident / name, seed=k, size=size, identity=2000 + i)
            for r in range(runs):
                g = (i + r) % per_id
                for k, name in enumerate(names):
                    split = f"gallery{r}" if k == g else f"query{r}"
                    write_image(base / split / ident / name, seed=k, size=size, identity=2000 + i)
    return root


@pytest.fixture
def layout_root(tmp_path: Path) -> Path:
    return make_layout(tmp_path / "data", hands=tuple(HAND_TYPES))


# -- configs -----------------------------------------------------------------------------------
def quiet_overrides(out: Path) -> list[str]:
    """Overrides every test run shares: outputs and cache under ``out``, no progress output."""
    return [f"paths.output_root={out}", f"paths.cache_dir={out / 'cache'}", "data.progress=false",
            "data.cache_workers=0"]


def tiny_cfg(data: Path, out: Path, *extra: str, hand: str = "dorsal_right"):
    """The demo recipe (tiny model, CPU) on ``data``, writing under ``out``."""
    from handclip.config import compose

    return compose("train", [
        "experiment=demo", f"hand={hand}", f"paths.data_dir={data}", *quiet_overrides(out),
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *extra,
    ])


def eval_cfg(data: Path, out: Path, *extra: str):
    """The eval config on ``data``; plots and ranking pictures only when asked (verification.pictures=true)."""
    from handclip.config import compose

    pictures = [] if any(e.startswith("verification.pictures=") for e in extra) else ["verification.pictures=false"]
    return compose("eval", ["experiment=demo", f"paths.data_dir={data}", *quiet_overrides(out), *pictures, *extra])


@pytest.fixture
def built_encoders(monkeypatch) -> list:
    """The zero-shot encoders that handclip.eval builds, in order (random weights: a reference must use the same)."""
    from handclip.models import encoder

    built = []
    real = encoder.zero_shot_encoder
    monkeypatch.setattr(encoder, "zero_shot_encoder", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    return built


# -- run logs ----------------------------------------------------------------------------------
def read_metrics(run_dir: Path, version: int = 0) -> list[dict]:
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- subprocesses ------------------------------------------------------------------------------
def fake_checkpoint(path: Path, epochs: int = 2, resumable: bool = True, **hparams) -> Path:
    """A checkpoint file laid out as Lightning writes one, without weights (what the run/resume policy reads):
    HandCLIP's hyperparameters and, when ``resumable``, optimizer and loop state after ``epochs`` epochs."""
    import torch

    ckpt = {"state_dict": {}, "epoch": epochs - 1,
            "hyper_parameters": {"classes": ["001", "002", "003"], "hand": "dorsal_right",
                                 "model_name": "HandCLIP-Tiny", **hparams}}
    if resumable:
        progress = {"ready": epochs, "started": epochs, "processed": epochs, "completed": epochs - 1}
        ckpt["optimizer_states"] = [{}]
        ckpt["loops"] = {"fit_loop": {"epoch_progress": {"total": progress, "current": progress}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` (mount's size=, e.g. "1m") mounted on ``folder`` for the block; the test is skipped
    where mounting is refused (a real full disk: permission bits do not stop root)."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m handclip.*`` in a subprocess: this checkout's sources, offline."""
    path = str(ROOT / "src") + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: int = 300, **env: str):
    import subprocess

    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def pytest_configure(config) -> None:
    """Under pytest-xdist, share the cores between workers instead of oversubscribing them: the worker's own torch,
    and every process a test starts (``OMP_NUM_THREADS``, unless already set: ``python -m handclip...``, the app's
    server). A child with a thread per core while the other worker is busy ran ~2x slower on 2 cores (a `-m` sweep:
    39-49 s against 19-28 s)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import torch

        torch.set_num_threads(threads)


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder (a read-only tmpfs: permission bits do not stop root); unmounted strictly at the end (a
    folder still in use fails the test)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# -- the app in a server process, a headless browser ------------------------------------------------
@contextlib.contextmanager
def app_server(folder: Path, *args: str, timeout: float = 240.0):
    """``python -m handclip.app ARGS`` as a user runs it, on a free port of 127.0.0.1 (its log in
    ``folder/server.log``); yields the :class:`handclip.utils.servers.Server`. The server and everything it
    started end with the block, also on a failure, and die with the test process."""
    from handclip.utils.servers import local_server

    env = cli_env(GRADIO_ANALYTICS_ENABLED="False")
    command = lambda port: [sys.executable, "-m", "handclip.app", "host=127.0.0.1", f"port={port}", *args]
    with local_server(command, folder / "server.log", env=env, cwd=folder, timeout=timeout) as server:
        yield server


def chromium_path() -> str:
    """Debian's chromium (or $CHROMIUM): the browser tests fail, never skip, without it."""
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not exe or not os.access(exe, os.X_OK):
        pytest.fail("the browser tests need Chromium: make browser (as root: apt-get install chromium), "
                    "or CHROMIUM=/path/to/chrome", pytrace=False)
    return exe


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright (Debian's browser, not Playwright's own download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


# -- hand-type galleries, one tiny model per hand type, the hand-type classifier (fusion, routing) ----------
#: Each hand type's photos carry its own colour (the random tiny model sees colour; the synthetic layouts of
#: conftest draw every hand type alike, so they cannot tell hand types apart).
TINT = {"dorsal_right": (200, 70, 70), "dorsal_left": (70, 200, 70), "palmar_right": (70, 70, 200),
        "palmar_left": (200, 200, 70)}


def write_photo(path: Path, hand: str, identity: int, seed: int) -> Path:
    """An identity's pattern (conftest) over its hand type's colour."""
    pattern = identity_pixels(identity, seed).astype(np.float64) - 128
    jitter = np.random.default_rng([identity, seed, 3]).uniform(-12, 12, size=3)
    pixels = np.clip(np.array(TINT[hand]) + jitter + 0.4 * pattern, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def tiny_checkpoint(path: Path, hand: str, seed: int) -> Path:
    """A HandCLIP checkpoint of the tiny architecture with random weights drawn from ``seed``."""
    import torch

    from handclip.models.clip import build_image_tower

    torch.manual_seed(seed)
    tower = build_image_tower("HandCLIP-Tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"encoder.visual.{k}": v for k, v in tower.state_dict().items()},
                "hyper_parameters": {"classes": ["0", "1"], "hand": hand, "model_name": "HandCLIP-Tiny"}}, path)
    return path


#: The gallery: person -> hand types enrolled (not every person has every hand type).
ENROLLED = {"ann": ELEVEN_K_HANDS, "bob": ("dorsal_right", "palmar_left"), "cat": ("dorsal_right", "dorsal_left"),
            "dan": ("dorsal_left", "palmar_right", "palmar_left"), "eve": ("dorsal_right",)}
#: The cases: case folder -> (person number for the pattern, hand types photographed)
CASES = {"ann": (0, ("dorsal_right", "palmar_left")), "dan": (3, ("dorsal_left", "palmar_left", "dorsal_right")),
         "stranger": (9, ("dorsal_right", "dorsal_left"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("routing")
    data = base / "data"
    for hand in ELEVEN_K_HANDS:  # an 11k layout for the classifier: train and val photos of 5 people
        for i in range(5):
            for k in range(3):
                split = "val" if k == 0 else "train"
                write_photo(data / hand_dir_name(hand) / split / f"{i:07d}" / f"{k}.png", hand, 100 + i, k)
    gallery = base / "gallery"
    for n, (person, hands) in enumerate(ENROLLED.items()):
        for hand in hands:
            for k in range(2):
                write_photo(gallery / person / hand / f"{person}_{k}.png", hand, n, 10 + k)
    cases = base / "cases"
    for case, (n, hands) in CASES.items():
        for hand in hands:
            write_photo(cases / case / hand / f"{case}.png", hand, n, 20)
    from handclip.config import compose
    from handclip.identify.hand_training import train_hand_classifier

    out = base / "out"
    models = {h: tiny_checkpoint(out / "train" / h / "checkpoints" / "best.ckpt", h, seed) for seed, h in
              enumerate(ELEVEN_K_HANDS)}
    clf = train_hand_classifier(compose("identify", [
        "experiment=demo", "task=train_hand_type", f"paths.data_dir={data}", f"paths.output_root={out}",
        "progress=false", "num_workers=0"]))
    return {"base": base, "data": data, "gallery": gallery, "cases": cases, "out": out, "models": models,
            "clf": clf}


def calibrated_models(world, root: Path, fused: float, per_hand: dict[str, float], fingerprints=None) -> Path:
    """The world's hand models under ``root/train/<hand>/checkpoints``, each with a calibration file at
    ``per_hand[hand]``, and a fused calibration (``fused`` for mean and max) naming their fingerprints."""
    from handclip.config import compose
    from handclip.evaluation.calibration import CALIBRATION_FORMAT, sidecar_path, write_calibration
    from handclip.evaluation.fused_calibration import fused_calibration_path, write_fused_calibration
    from handclip.identify.fused_threshold import checkpoint_fingerprint

    models = {}
    for hand, ckpt in world["models"].items():
        to = root / "train" / hand / "checkpoints" / "best.ckpt"
        to.parent.mkdir(parents=True)
        shutil.copy2(ckpt, to)
        fp = checkpoint_fingerprint(compose("identify", ["experiment=demo"]), to)
        models[hand] = {"fingerprint": (fingerprints or {}).get(hand, fp), "checkpoint": str(to)}
        row = {"threshold": per_hand[hand], "target_fmr": 0.01, "fmr": 0.0, "tar": 1.0, "resolved": True}
        write_calibration(sidecar_path(to), {"format": CALIBRATION_FORMAT, **row, "levels": [row],
                                             "model_fingerprint": fp})
    row = {"threshold": fused, "target_fmr": 0.01, "fmr": 0.0, "tar": 1.0, "resolved": True}
    write_fused_calibration(fused_calibration_path(root), {"format": 1, "target_fmr": 0.01, "fusions": {
        f: {**row, "levels": [row], "by_hand_count": {}} for f in ("mean", "max")}}, models)
    return root
