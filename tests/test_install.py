"""The wheel: built from this checkout, installed elsewhere, its entry points run from another directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """handclip built as a wheel (from a copy of the checkout) and installed into a folder of its own."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("src", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(base / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "dist").glob("handclip-*.whl")
    target = base / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel


def run_installed(wheel: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` with only the installed package on the path (not this checkout's src)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HANDCLIP_ROOT")}
    # the user's cache folder (platformdirs reads XDG_CACHE_HOME on Linux), kept inside the test's folder
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(wheel.parent.parent / "site"),
               XDG_CACHE_HOME=str(wheel.parent.parent / "user-cache"))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_holds_every_module_and_config(installed):
    names = set(zipfile.ZipFile(installed).namelist())
    modules = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "handclip").rglob("*.py")}
    configs = {f"handclip/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert modules and modules <= names, sorted(modules - names)
    assert configs and configs <= names, sorted(configs - names)
    assert "handclip/models/model_configs/HandCLIP-Tiny.json" in names


def test_installed_entry_points_run_from_another_directory(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run_installed(installed, work, "-c",
                          "import handclip.config as c; print(c.__file__); print(c.config_dir())")
    assert where.returncode == 0, where.stderr
    assert str(ROOT) not in where.stdout and "site" in where.stdout

    job = run_installed(installed, work, "-m", "handclip.train", "--cfg", "job", "--resolve")
    assert job.returncode == 0, job.stderr[-3000:]
    assert "model_name: ViT-B-32-quickgelu" in job.stdout
    assert f"data_dir: {work.resolve()}/data/11k" in job.stdout  # anchored to the current directory
    assert f"cache_dir: {installed.parent.parent / 'user-cache' / 'handclip'}\n" in job.stdout  # the user's cache
    for module in ("handclip.eval", "handclip.bench"):
        assert run_installed(installed, work, "-m", module, "--cfg", "job").returncode == 0, module

    # the whole chain on a few synthetic hands, every file under the current directory
    steps = [
        ("handclip.synth", "--out", "raw", "--subjects", "6", "--images-per-aspect", "3", "--size", "96x72",
         "--workers", "1"),
        ("handclip.prepare", "--raw", "raw", "--out", "data/demo/splits", "--runs", "2"),
        ("handclip.train", "experiment=demo", "hand=dorsal_right", "trainer.max_epochs=1", "data.progress=false",
         "trainer.enable_progress_bar=false"),
        ("handclip.eval", "experiment=demo", "all=true", "data.progress=false"),
    ]
    for step in steps:
        result = run_installed(installed, work, "-m", *step)
        assert result.returncode == 0, (step[0], result.stderr[-3000:])
    assert (work / "outputs" / "demo" / "train" / "dorsal_right" / "checkpoints" / "best.ckpt").is_file()
    assert "| dorsal_right | HandCLIP (fine-tuned) |" in result.stdout
    assert (work / "outputs" / "demo" / "eval" / "comparison.md").is_file()
    # the crop cache in the user's cache folder, not in ./.cache of the directory the commands ran in
    assert any((installed.parent.parent / "user-cache" / "handclip").iterdir())
    assert not (work / ".cache").exists()
