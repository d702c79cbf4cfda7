"""What the argparse commands (prepare, synth) share: the help page's layout and the ``--overwrite`` flag."""

from __future__ import annotations

import argparse
import sys


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
