"""Packaging: every imported package is declared in pyproject.toml, and the version is written in one place."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, version

from conftest import ROOT

import handclip
from handclip import config


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalized(requirement: str) -> str:
    """The distribution a requirement names, normalised as PEP 503 does (``open_clip_torch>=3`` -> open-clip-torch)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def imported_modules(folder) -> set[str]:
    """Top-level modules imported anywhere under ``folder`` (absolute imports only)."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def third_party(names: set[str], local: set[str]) -> dict[str, list[str]]:
    """module -> the distributions that provide it, for the modules that are neither stdlib nor ours."""
    providers = packages_distributions()
    # pip: only the Python 3.10 fallback for tomllib (pip is in every virtual environment)
    outside = sorted(n for n in names if n not in sys.stdlib_module_names
                     and n not in local | {"__future__", "__main__", "pip"})
    return {name: [normalized(d) for d in providers.get(name, [])] for name in outside}


def check_declared(modules: dict[str, list[str]], declared: set[str]) -> list[str]:
    return [f"{module} (from {', '.join(dists) or 'no installed distribution'})"
            for module, dists in modules.items() if not set(dists) & declared]


def test_every_package_the_source_imports_is_declared():
    project = pyproject()["project"]
    declared = {normalized(r) for r in project["dependencies"]}
    declared |= {normalized(r) for extra in project["optional-dependencies"].values() for r in extra}
    modules = third_party(imported_modules(ROOT / "src" / "handclip"), {"handclip"})
    assert {"torch", "safetensors", "omegaconf", "platformdirs"} <= set(modules)  # the scan sees the imports
    assert check_declared(modules, declared) == []


def test_every_package_the_tests_import_is_in_the_test_extra():
    """make test installs .[test]: what the tests import comes with it (directly or as a core dependency)."""
    project = pyproject()["project"]
    declared = {normalized(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    local = {path.stem for path in (ROOT / "tests").glob("*.py")} | {"handclip"}
    modules = third_party(imported_modules(ROOT / "tests") - {"tests"}, local)
    assert "pytest" in modules
    assert check_declared(modules, declared) == []


def test_the_version_is_written_once_and_read_from_the_metadata():
    source = (ROOT / "src" / "handclip" / "__init__.py").read_text()
    assert not re.search(r"\d+\.\d+\.\d+", source)  # no version number in the package itself
    assert handclip.__version__ == version("handclip")
    assert pyproject()["project"]["version"] == version("handclip"), (
        "the installed handclip is older than pyproject.toml: reinstall it (make install)")


def test_each_release_has_a_changelog_entry():
    releases = re.findall(r"^## (\d+\.\d+\.\d+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases[0] == pyproject()["project"]["version"]  # the newest first: the version being released
    assert releases == sorted(releases, key=lambda v: tuple(map(int, v.split("."))), reverse=True)
    assert {"0.1.0", "0.2.0"} <= set(releases)


def test_the_crop_cache_of_an_installed_package_is_in_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("HANDCLIP_ROOT", raising=False)
    assert config.cache_dir() == str(ROOT / ".cache" / "handclip")  # a source checkout keeps .cache/handclip
    assert config.cache_dir("bench") == str(ROOT / ".cache" / "bench")
    monkeypatch.setattr(config, "checkout_root", lambda: None)  # installed (its configs are the checkout's here)
    monkeypatch.setattr(config, "config_dir", lambda: ROOT / "configs")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.chdir(tmp_path / "..")
    assert config.cache_dir() == str(tmp_path / "user-cache" / "handclip")
    assert config.cache_dir("bench") == str(tmp_path / "user-cache" / "handclip" / "bench")
    assert config.compose("train").paths.cache_dir == str(tmp_path / "user-cache" / "handclip")
    monkeypatch.setenv("HANDCLIP_ROOT", str(tmp_path / "root"))  # an explicit root anchors the cache too
    assert config.compose("train").paths.cache_dir == str((tmp_path / "root").resolve() / ".cache" / "handclip")
