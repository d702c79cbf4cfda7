"""Help pages and flags the commands share: the argparse commands' (prepare, synth) layout and ``--overwrite`` flag,
and what the Hydra commands' help templates (``configs/hydra/help/``) print values with."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Options with their defaults; the description and the epilog (examples, outputs) kept as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=118)


class _Renamed(argparse.Action):
    """A flag's old name: it still works, with a one-line note naming the new one."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string} is deprecated; it is now called {self.new_name} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, True)


def add_overwrite_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``--overwrite``: the word every HandCLIP command uses for replacing its outputs (the Hydra commands take
    ``overwrite=true``); ``--force``, its former name, is still accepted."""
    parser.add_argument("--overwrite", action="store_true", help=help)
    parser.add_argument("--force", dest="overwrite", action=_Renamed, new_name="--overwrite", default=False,
                        help=argparse.SUPPRESS)


def cli_value(value) -> str:
    """``${handclip_value:${key}}``: a value as it is written on the command line (null, true, [1,5,10]); the help
    pages show each key's live value with it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ",".join(cli_value(v) for v in value) + "]"
    return str(value)


def group_options(folder: Path) -> str:
    """``${handclip_options:<group>}``: the options of a config group (the YAML files of its folder)."""
    return " | ".join(sorted(p.stem for p in folder.glob("*.yaml")))
