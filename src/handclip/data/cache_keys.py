"""What a cached crop is keyed on: its file (resolved path, size, modification time) and the preprocessing.

A row of the crop cache (:mod:`handclip.data.cache`) is reused only while its file still has the same
:data:`Entry`; a cache folder holds the rows of one set of preprocessing settings and one storage format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from handclip.data.images import ImageLoader
from handclip.errors import HandCLIPError

#: (resolved path, size in bytes, st_mtime_ns): a row is reused only if its file still has this key.
Entry = tuple[str, int, int]


def settings_of(loader: ImageLoader) -> Any:
    """The preprocessing settings as plain JSON values (tuples become lists, as after a JSON round trip); a loader
    that decodes JPEGs at a reduced scale (``decode="draft"``) has settings of its own."""
    settings = json.loads(json.dumps(dataclasses.asdict(loader.cfg)))
    return {**settings, "decode": loader.decode} if loader.decode != "full" else settings


def digest(value: Any) -> str:
    """A short hash of a JSON value (key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


def file_entry(path: str | Path) -> Entry:
    """The key of one image file, or an error naming it when it cannot be read."""
    try:
        resolved = Path(path).resolve()
        st = resolved.stat()
    except OSError as err:
        raise HandCLIPError(f"cannot read image {str(path)!r}: {err}") from None
    return str(resolved), st.st_size, st.st_mtime_ns


def folder_name(format_version: int, settings: Any) -> str:
    """The cache folder of one storage format and one set of preprocessing settings."""
    return f"v{format_version}-{digest({'format': format_version, 'settings': settings})}"


def list_key(entries: list[Entry]) -> str:
    """The name of the cache file of a list of images (by path, in order)."""
    return digest([e[0] for e in entries])
