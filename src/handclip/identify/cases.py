"""Probe sets (``query_mode=case``): the photos of one unknown person, probed as one.

``query=DIR`` with ``query_mode=case``: every visible immediate subfolder of DIR is one case, made of every
image under it (searched recursively, in sorted order). The rules, chosen so that no photo is silently added to
or left out of a case:

* a photo directly in DIR belongs to no case: refused (put it in a case folder of its own);
* a case folder holding no image file: refused;
* a case folder none of whose photos can be decoded: refused, before the gallery is embedded;
* unreadable photos of a case that has readable ones: named, counted and left out (as unreadable queries are);
* hidden files and folders (a leading ".") and files without an image suffix are ignored, as elsewhere.

A case's identity is known when its folder is named like a gallery identity (``query/<identity>/...``), as a
single query photo's is when the folder it sits in is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.identify.sources import _EXPECTED, _image_entry, _visible

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One case: its folder and its photos (sorted)."""

    folder: Path
    photos: list[Path]

    @property
    def name(self) -> str:
        return self.folder.name


def resolve_cases(query: str | Path) -> list[Case]:
    """The cases of a query folder (see the module); one error line for the first rule broken."""
    text = "" if query is None else str(query)
    root = Path(text).expanduser()
    if not text or not root.is_dir():
        raise HandCLIPError(f"query_mode=case needs query=FOLDER whose subfolders are the cases (one folder of "
                            f"photos per unknown person), got {text!r}")
    root = root.resolve()
    loose = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and not p.is_dir()
                   and _image_entry(p))
    if loose:
        more = f" (and {len(loose) - 3} more)" if len(loose) > 3 else ""
        raise HandCLIPError(f"query folder {text!r} holds photos outside any case folder ({', '.join(loose[:3])}"
                            f"{more}); with query_mode=case every photo must sit in a case folder "
                            "(query/<case>/<photo>): move each into the folder of its case")
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(p for p in folder.rglob("*") if (p.is_file() or _image_entry(p)) and _visible(p, root))
        photos = [p for p in found if _image_entry(p)]
        if not photos:
            raise HandCLIPError(f"case folder {str(folder)!r} holds no images ({len(found)} other file(s)); "
                                f"expected {_EXPECTED}")
        if len(found) > len(photos):
            log.info("case %s: %d file(s) without an image suffix ignored", folder.name, len(found) - len(photos))
        cases.append(Case(folder, photos))
    if not cases:
        raise HandCLIPError(f"query folder {text!r} holds no case folders; with query_mode=case each subfolder "
                            "is one case (query/<case>/<photo>)")
    return cases


def readable_cases(cases: list[Case], readable: set[int]) -> list[list[int]]:
    """Per case, the indices (into the flattened list of every case's photos) of its readable photos; an error
    naming the cases without any, before the gallery is embedded."""
    groups, start, empty = [], 0, []
    for case in cases:
        rows = [i for i in range(start, start + len(case.photos)) if i in readable]
        start += len(case.photos)
        groups.append(rows)
        if not rows:
            empty.append(f"{str(case.folder)!r} ({len(case.photos)} photo(s))")
    if empty:
        raise HandCLIPError(f"case folder {empty[0]} has no readable photo"
                            + (f" (nor {len(empty) - 1} other case(s))" if len(empty) > 1 else "")
                            + "; the gallery was not embedded")
    return groups
