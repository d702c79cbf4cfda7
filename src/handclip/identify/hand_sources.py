"""Which files a gallery and a query stand for when identify fuses hand types (``fusion=mean|max``).

A gallery is ``<person>/<hand type>/<photo>`` (photos may sit deeper), hand types named as
:data:`handclip.hands.HAND_TYPES` names them. A query is one photo, a folder or a glob (as without fusion);
photos are grouped into *probes*, each one unknown person:

* a photo in a hand-type folder (``<case>/<hand type>/photo.jpg``) has that hand type, and every photo under
  the same case folder (the folder holding the hand-type folders: the query folder itself for
  ``query/<hand type>/photo.jpg``) belongs to one probe, scored over its hand types;
* any other photo is a probe of its own; its hand type is ``query_hand=`` or, when not given, predicted by the
  hand-type classifier.

A probe's identity is known when its case folder (a lone photo: the folder it sits in) is named like a gallery
person. A folder that holds hand-type folders holds nothing else: another sub-folder is an unknown hand-type
folder, a photo beside them has no hand type; both are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.hands import HAND_TYPES
from handclip.identify.sources import GalleryFile, _image_entry, _visible, resolve_queries

_NAMES = ", ".join(HAND_TYPES)


@dataclass
class Probe:
    """One unknown person: a case folder or a lone photo, and its photos with their hand types."""

    path: Path
    """The case folder, or the photo itself."""
    truth_name: str
    """The folder name that, when it names a gallery person, makes the probe's identity known."""
    photos: list[Path] = field(default_factory=list)
    hands: list[str | None] = field(default_factory=list)
    """Per photo: its hand type (None: still to be predicted)."""
    sources: list[str] = field(default_factory=list)
    """Per photo: where its hand type came from: folder, given (query_hand=) or predicted."""
    probabilities: list[float | None] = field(default_factory=list)


def _unknown_folder(folder: Path, where: str) -> HandCLIPError:
    return HandCLIPError(f"unknown hand-type folder {str(folder)!r} in {where}; hand-type folders are named "
                         f"{_NAMES}")


def scan_hand_gallery(root: str | Path) -> dict[str, list[GalleryFile]]:
    """The gallery's photos per hand type (sorted; identity = person). One error line, before any work, for a
    gallery that is not laid out ``<person>/<hand type>/<photo>``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HandCLIPError(f"gallery {str(root)!r} is not a folder; with fusion= it holds <person>/<hand type>/"
                            "<photo> folders")
    root = root.resolve()
    per_hand: dict[str, list[GalleryFile]] = {}
    for person in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not person.is_dir():
            if _image_entry(person):
                raise HandCLIPError(f"gallery photo {str(person)!r} is not in a <person>/<hand type>/ folder (with "
                                    "fusion= the gallery holds <person>/<hand type>/<photo>)")
            continue
        for entry in sorted(p for p in person.iterdir() if not p.name.startswith(".")):
            if entry.is_dir() and entry.name not in HAND_TYPES:
                raise _unknown_folder(entry, f"gallery person {person.name!r}")
            if not entry.is_dir():
                if _image_entry(entry):
                    raise HandCLIPError(f"gallery photo {str(entry)!r} is not in a hand-type folder; put it in "
                                        f"{person.name}/<hand type>/ ({_NAMES})")
                continue
            for image in sorted(entry.rglob("*")):
                if _image_entry(image) and _visible(image, root):
                    per_hand.setdefault(entry.name, []).append(
                        GalleryFile(image, image.relative_to(root).as_posix(), person.name))
    if not per_hand:
        raise HandCLIPError(f"gallery {str(root)!r} holds no photos in <person>/<hand type>/ folders ({_NAMES})")
    return dict(sorted(per_hand.items()))


def _check_case_folder(folder: Path) -> None:
    """A folder holding hand-type folders holds only hand-type folders."""
    for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if entry.is_dir() and entry.name not in HAND_TYPES:
            raise _unknown_folder(entry, f"case folder {str(folder)!r}")
        if not entry.is_dir() and _image_entry(entry):
            raise HandCLIPError(f"query photo {str(entry)!r} sits beside hand-type folders in {str(folder)!r}; put "
                                f"it in the folder of its hand type ({_NAMES})")


def resolve_probes(query: str | Path, query_hand: str | None) -> list[Probe]:
    """The query's probes (see the module), in the order of their first photo; errors before any work."""
    if query_hand is not None and query_hand not in HAND_TYPES:
        raise HandCLIPError(f"query_hand={query_hand!r}: expected one of {_NAMES}")
    photos = resolve_queries(query)
    top = Path(str(query)).expanduser()
    top = top.resolve() if top.is_dir() else None
    probes: dict[Path, Probe] = {}
    checked: set[Path] = set()
    for photo in photos:
        if top is not None:  # a folder: the nearest hand-type folder inside it (photos may sit deeper)
            hand_dir = next((p for p in photo.parents if p.name in HAND_TYPES and p.is_relative_to(top)), None)
        else:  # a photo or a glob: the folder the photo sits in
            hand_dir = photo.parent if photo.parent.name in HAND_TYPES else None
        if hand_dir is None:
            hand, source, case = query_hand, "given" if query_hand else "predicted", photo
            truth = photo.parent.name
        else:
            hand, source, case = hand_dir.name, "folder", hand_dir.parent
            truth = case.name
            if query_hand is not None and query_hand != hand:
                raise HandCLIPError(f"query photo {str(photo)!r} is in a {hand} folder but query_hand={query_hand}; "
                                    "leave query_hand= out, or move the photo")
            if top is not None and case.is_relative_to(top) and case not in checked:
                _check_case_folder(case)
                checked.add(case)
        probe = probes.setdefault(case, Probe(case, truth))
        probe.photos.append(photo)
        probe.hands.append(hand)
        probe.sources.append(source)
        probe.probabilities.append(None)
    return list(probes.values())


def check_gallery_covers(probes: list[Probe], gallery: dict[str, list[GalleryFile]], query_hand: str | None) -> None:
    """Every hand type the query has is in the gallery; with ``query_hand=`` every gallery person has photos of
    it. Hand types still to be predicted are checked once predicted."""
    if query_hand is not None:
        persons = sorted({f.identity for files in gallery.values() for f in files})
        having = {f.identity for f in gallery.get(query_hand, [])}
        lacking = [p for p in persons if p not in having]
        if lacking:
            raise HandCLIPError(f"gallery person(s) {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''} "
                                f"have no {query_hand} photos (query_hand={query_hand}); add "
                                f"<person>/{query_hand}/ photos or leave them out of the gallery")
    for hand in sorted({h for p in probes for h in p.hands if h is not None}):
        first = next(p for p in probes if hand in p.hands)
        if hand not in gallery:
            raise HandCLIPError(f"query {str(first.path)!r} has {hand} photos but no gallery person has any "
                                f"(gallery hand types: {', '.join(gallery)})")
        persons = sorted({f.identity for f in gallery[hand]})
        if len(persons) < 2:
            raise HandCLIPError(f"query {str(first.path)!r} has {hand} photos but only gallery person "
                                f"{persons[0]!r} has any; each hand type of the query needs 2 or more people with "
                                "photos of it in the gallery")
