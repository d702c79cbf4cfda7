"""--help of every command (what it does, the keys that matter with their live values, three examples that run,
where its outputs go), --cfg job, --overwrite, and the console scripts (handclip-train ... = python -m ...)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

from handclip.command_line import check_group_options, check_override_keys

#: command -> (the module `python -m` runs, its config)
HYDRA_COMMANDS = {"train": ("handclip.train", "train"), "eval": ("handclip.eval", "eval"),
                  "identify": ("handclip.identify", "identify"), "export": ("handclip.export", "export"),
                  "bench": ("handclip.bench", "bench"), "app": ("handclip.app", "app")}
ARGPARSE_COMMANDS = {"prepare": "handclip.prepare", "synth": "handclip.synth"}
#: what `python -m <package>` runs when the command is a package
MAIN_MODULE = {"handclip.identify": "handclip.identify.__main__", "handclip.bench": "handclip.bench.__main__",
               "handclip.app": "handclip.app.__main__"}


def run_in_process(module: str, *args: str, monkeypatch) -> tuple[int, str, str]:
    """``python -m module args`` in this process: exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", [module, *args])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code or 0
    return code, out.getvalue(), err.getvalue()


def examples(page: str, module: str) -> list[list[str]]:
    """The command lines of the page's examples (after "Examples:"/"examples:"), without ``python -m module``."""
    section = re.split(r"\n[Ee]xamples:\n", page, maxsplit=1)[1].split("\n\n")[0]
    lines = [line.strip() for line in section.splitlines()]
    assert all(line.startswith(f"python -m {module} ") for line in lines), lines
    return [shlex.split(line)[3:] for line in lines]


@pytest.mark.parametrize("command", HYDRA_COMMANDS)
def test_help_page_of_each_hydra_command(command, monkeypatch):
    module, config = HYDRA_COMMANDS[command]
    code, page, err = run_in_process(module, "--help", monkeypatch=monkeypatch)
    assert code == 0, err
    assert page.startswith(f"handclip-{command} (python -m {module}): ")
    assert "powered by Hydra" not in page and "__main__" not in page
    assert "\nOutputs: " in page and "Keys that matter" in page and "--cfg job" in page
    runs = examples(page, module)
    assert len(runs) == 3
    for argv in runs:  # every example is a command line this command accepts (keys, types, config options)
        check_group_options(argv)
        check_override_keys(config, argv)


@pytest.mark.parametrize(("command", "args", "shown"), [
    ("train", [], ["hand=dorsal_right ", "model=vit_b32 ", "model.lr=1e-05 ", "data.batch_size=64 ",
                   "trainer.max_epochs=50 ", "ckpt_path=null ", f"Outputs: {ROOT}/outputs/train/dorsal_right/"]),
    # the page shows the values of the rest of the command line: the demo's, and the overrides given
    ("train", ["experiment=demo", "hand=palmar_left", "data.batch_size=8"],
     ["model=tiny ", "model.lr=0.0003 ", "data.batch_size=8 ", "trainer.max_epochs=30 ", "experiment=demo ",
      f"Outputs: {ROOT}/outputs/demo/train/palmar_left/"]),
    ("eval", ["metrics.ranks=[1,20]"], ["metrics.ranks=[1,20] ", "all=false ", f"Outputs: {ROOT}/outputs/eval/"]),
    ("identify", ["top_k=3", "name=case1"], ["top_k=3 ", "name=case1 ", f"Outputs: {ROOT}/outputs/identify/<name>/"]),
    ("export", ["format=onnx"], ["format=onnx ", "onnx.opset=18 ", "overwrite=false"]),
    ("app", ["top_k=9", "experiment=demo"], ["top_k=9 ", "host=127.0.0.1 ", f"models_root={ROOT}/outputs/demo ",
                                             f"Outputs: {ROOT}/outputs/demo/app/"]),
    ("bench", ["bench.quick=true"], ["bench.quick=true ", "bench.parts=[data,train,eval,search,checkpoints] ",
                                     f"Outputs: {ROOT}/benchmarks/results/<device>.json"]),
])
def test_help_shows_the_values_of_this_command_line(command, args, shown, monkeypatch):
    module, _ = HYDRA_COMMANDS[command]
    code, page, err = run_in_process(module, *args, "--help", monkeypatch=monkeypatch)
    assert code == 0, err
    for text in shown:
        assert text in page, text


def test_help_lists_the_options_of_each_group_from_its_folder(monkeypatch):
    _, page, _ = run_in_process("handclip.train", "--help", monkeypatch=monkeypatch)
    for group in ("hand", "model", "trainer", "logger", "experiment", "launcher", "hparams_search"):
        options = " | ".join(sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml")))
        assert f"options: {options}" in page, group


@pytest.mark.parametrize("command", ["train", "bench"])
def test_cfg_job_still_prints_the_config(command, monkeypatch):
    from omegaconf import OmegaConf

    module, _ = HYDRA_COMMANDS[command]
    code, out, err = run_in_process(module, "--cfg", "job", "seed=7" if command == "train" else "bench.seed=7",
                                    monkeypatch=monkeypatch)
    assert code == 0, err
    cfg = OmegaConf.to_container(OmegaConf.create(out))
    assert (cfg["seed"] if command == "train" else cfg["bench"]["seed"]) == 7
    assert "hydra" not in cfg


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS)
def test_help_page_of_prepare_and_synth(command, monkeypatch):
    module = ARGPARSE_COMMANDS[command]
    code, page, err = run_in_process(module, "--help", monkeypatch=monkeypatch)
    assert code == 0, err
    assert page.startswith(f"usage: python -m {module} ")
    assert "\noutputs: " in page and f"Also installed as: handclip-{command}" in page
    assert "(default 0)" in page and "--overwrite" in page and "--force" not in page
    parser = runpy.run_module(module)["build_parser"]()
    runs = examples(page, module)
    assert len(runs) == 3
    for argv in runs:
        parser.parse_args(argv)  # exits with status 2 on an option the command does not take


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS)
def test_force_is_the_old_name_of_overwrite(command, capsys):
    parser = runpy.run_module(ARGPARSE_COMMANDS[command])["build_parser"]()
    base = ["--raw", "r", "--out", "o"] if command == "prepare" else ["--out", "o"]
    assert parser.parse_args(base).overwrite is False
    assert parser.parse_args([*base, "--overwrite"]).overwrite is True
    assert capsys.readouterr().err == ""
    assert parser.parse_args([*base, "--force"]).overwrite is True
    assert capsys.readouterr().err == "note: --force is deprecated; it is now called --overwrite (same meaning)\n"


#: Each console script, run from its entry point as its installed script does, with --help and with a mistake.
PROBE = """
import contextlib, io, json, sys
from importlib.metadata import entry_points

mistakes = {"train": ["trainer.max_epoch=3"], "eval": ["hand=dorsal_up"], "identify": ["top_k=abc"],
            "export": ["fromat=onnx"], "prepare": ["--raw", "no/such/raw", "--out", "out"],
            "synth": ["--out", "out", "--size", "10x10"], "bench": ["bench.quik=true"], "app": ["top_k=abc"]}
found = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("handclip-")}
results = {"declared": {name: ep.value for name, ep in found.items()}}
for name, ep in sorted(found.items()):
    main = ep.load()
    for case, args in (("help", ["--help"]), ("mistake", mistakes[name.removeprefix("handclip-")])):
        sys.argv = [name, *args]
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as stop:
                code = stop.code or 0
        results[f"{name} {case}"] = [code, out.getvalue(), err.getvalue()]
results["loaded"] = [m for m in ("torch", "pytorch_lightning", "open_clip") if m in sys.modules]
print(json.dumps(results))
"""


def declared_scripts() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_console_scripts_are_the_python_m_forms():
    expected = {f"handclip-{command}": f"{MAIN_MODULE.get(module, module)}:main"
                for command, module in {**{c: m for c, (m, _) in HYDRA_COMMANDS.items()}, **ARGPARSE_COMMANDS}.items()}
    assert declared_scripts() == expected


def test_console_scripts_run(tmp_path):
    """The installed entry points (pip install -e . / make install): each answers --help and a mistake (one error
    line, exit status 2) before torch loads."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)
    assert results["declared"] == declared_scripts(), (
        "the installed handclip's console scripts differ from pyproject.toml's: reinstall it (make install)")
    for name in declared_scripts():
        code, page, err = results[f"{name} help"]
        assert code == 0 and err == "", (name, err)
        assert (f"{name} (python -m " in page) or (f"Also installed as: {name}" in page), name
        code, out, err = results[f"{name} mistake"]
        assert code == 2 and out == "", (name, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
    assert results["loaded"] == []
    assert list(tmp_path.iterdir()) == []  # neither the pages nor the mistakes wrote anything
