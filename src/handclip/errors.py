"""One exception type for every input problem a user can fix; entry points print it without a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class HandCLIPError(Exception):
    """A problem with the user's input (data, config, checkpoint) described in plain words."""


def exit_on_error(func: F) -> F:
    """Run an entry point; turn a HandCLIPError into a one-line message on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except HandCLIPError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
