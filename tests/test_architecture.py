"""The shape of the code: layers that point one way, no import cycles, small files, one home for hand types."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT

from handclip.hands import ELEVEN_K_HANDS, HAND_TYPES

SRC = ROOT / "src" / "handclip"

#: Layers, lowest first. A module may import its own layer and those below; data and models (both
#: layer 1) never import each other.
LAYERS = {
    "base": ("handclip", "handclip.errors", "handclip.hands", "handclip.config", "handclip.schema",
             "handclip.schema_ranges", "handclip.command_line", "handclip.metrics", "handclip.utils"),
    "data": ("handclip.data",),
    "models": ("handclip.models",),
    "app": ("handclip.api", "handclip.app", "handclip.evaluation", "handclip.run_folder", "handclip.hydra_callbacks",
            "handclip.launch", "handclip.bench", "handclip.identify", "handclip.training"),
    "entry": ("handclip.train", "handclip.eval", "handclip.prepare", "handclip.synth", "handclip.bench.__main__",
              "handclip.identify.__main__", "handclip.export", "handclip.app.__main__"),
}
RANK = {"base": 0, "data": 1, "models": 1, "app": 2, "entry": 3}
#: Entry points stay about the size of lightning-hydra-template's src/train.py.
ENTRY_MAX_LINES = 120
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> str:
    best = max((prefix for prefixes in LAYERS.values() for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(layer for layer, prefixes in LAYERS.items() if best in prefixes)


def imports_of(module: str) -> set[str]:
    """HandCLIP modules imported anywhere in ``module`` (``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert {m: layer_of(m) for m in MODULES}  # raises on a module outside every layer


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    here = layer_of(module)
    for target in sorted(GRAPH[module]):
        there = layer_of(target)
        assert RANK[there] <= RANK[here], f"{module} ({here}) imports {target} ({there})"
        assert {here, there} != {"data", "models"}, f"{module} ({here}) imports {target} ({there})"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    limit = ENTRY_MAX_LINES if layer_of(module) == "entry" else MAX_LINES
    assert lines <= limit, f"{MODULES[module]} has {lines} lines (at most {limit})"


def test_hand_type_configs_match_the_definition():
    configs = sorted((ROOT / "configs" / "hand").glob("*.yaml"))
    assert sorted(p.stem for p in configs) == sorted(HAND_TYPES)
    for path in configs:
        text = path.read_text()
        assert re.search(rf"^name: {path.stem}$", text, re.M), path
        assert f"train_val_test_split_{HAND_TYPES[path.stem]}" in text, path  # the comment names the right folder


def test_makefile_hand_list_matches_the_definition():
    match = re.search(r"^HANDS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match and match.group(1).strip().split(",") == list(ELEVEN_K_HANDS)  # make train/demo: the 11k hands
