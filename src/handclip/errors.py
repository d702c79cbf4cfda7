"""One exception type for every input problem a user can fix; entry points print it without a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: How torch's DataLoader re-raises an exception of one of its worker processes (the worker's traceback
#: is folded into the message, which ends with ``<module>.<class>: <original message>``).
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


class HandCLIPError(Exception):
    """A problem with the user's input (data, config, checkpoint) described in plain words."""


def user_error(err: BaseException | None) -> HandCLIPError | None:
    """The HandCLIPError behind ``err``: ``err`` itself, or the cause a library wrapped it in (Hydra's
    ``InstantiationException`` for errors raised while it builds configured objects, ``raise ... from``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, HandCLIPError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def error_message(err: HandCLIPError) -> str:
    """The user-facing text of ``err``, without the worker traceback a DataLoader folds into it."""
    text = str(err)
    if _WORKER_TRACEBACK in text:
        marker = f"{HandCLIPError.__module__}.{HandCLIPError.__qualname__}: "
        text = text.rpartition(marker)[2] if marker in text else text.rpartition("\n")[2]
    return text.strip()


def exit_on_error(func: F) -> F:
    """Run an entry point; turn a HandCLIPError (also one wrapped by a library) into one line on stderr,
    ``error: ...``, and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as err:
            found = user_error(err)
            if found is None:
                raise
            print(f"error: {error_message(found)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
