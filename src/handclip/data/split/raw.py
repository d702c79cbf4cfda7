"""Reading and checking the raw 11k Hands download: ``HandInfo.csv`` and the ``Hands/`` folder."""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from handclip.errors import HandCLIPError
from handclip.hands import ELEVEN_K_HANDS, aspect_of_hand

log = logging.getLogger(__name__)

CSV_NAME = "HandInfo.csv"
IMAGES_DIR = "Hands"
REQUIRED_COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")
#: ``aspectOfHand`` values (lower case) -> hand type.
ASPECT_TO_HAND: dict[str, str] = {aspect_of_hand(hand): hand for hand in ELEVEN_K_HANDS}
_ID_RE = re.compile(r"\d{1,7}")
#: At most this many offending items are named in one message.
MAX_NAMED = 5


@dataclass(frozen=True)
class Record:
    """One row of HandInfo.csv."""

    line: int
    identity: str  # 7-digit id
    hand: str  # HAND_TYPES key
    image: str
    accessories: bool


def _row_error(csv_path: Path, line: int, message: str) -> HandCLIPError:
    return HandCLIPError(f"{csv_path}: line {line}: {message}")


def _parse_row(csv_path: Path, line: int, row: Mapping[str | None, str | None], n_columns: int) -> Record:
    if None in row or any(v is None for v in row.values()):
        found = n_columns + len(row.get(None) or []) - sum(v is None for v in row.values())  # type: ignore[arg-type]
        raise _row_error(csv_path, line, f"expected {n_columns} columns, found {found}")
    raw_id = (row["id"] or "").strip()
    if not _ID_RE.fullmatch(raw_id):
        raise _row_error(csv_path, line, f"bad id {raw_id!r}; expected a number of up to 7 digits, e.g. 0000123")
    aspect = " ".join((row["aspectOfHand"] or "").replace("_", " ").lower().split())
    if aspect not in ASPECT_TO_HAND:
        raise _row_error(csv_path, line, f"unknown aspectOfHand {row['aspectOfHand']!r}; expected one of "
                                         f"{', '.join(repr(a) for a in ASPECT_TO_HAND)}")
    accessories = (row["accessories"] or "").strip()
    if accessories not in ("0", "1"):
        raise _row_error(csv_path, line, f"accessories must be 0 or 1, got {accessories!r}")
    image = (row["imageName"] or "").strip()
    if not image or os.path.basename(image) != image or image.startswith("."):
        raise _row_error(csv_path, line, f"bad imageName {image!r}; expected a file name like Hand_0000002.jpg")
    return Record(line, raw_id.zfill(7), ASPECT_TO_HAND[aspect], image, accessories == "1")


def _decode(csv_path: Path, data: bytes) -> str:
    """The text of HandInfo.csv: UTF-8 (with or without BOM), UTF-16 with a BOM, or, when it is not valid
    UTF-8 (a file re-saved by a spreadsheet), Windows-1252 / Latin-1, with a warning naming the first line
    that is not UTF-8."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise HandCLIPError(f"{csv_path} starts with a UTF-16 byte order mark but is not valid UTF-16 "
                                f"(byte {err.start}); save it as UTF-8") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start:err.end].hex(" ")
        try:
            text, encoding = data.decode("cp1252"), "Windows-1252"
        except UnicodeDecodeError:
            text, encoding = data.decode("latin-1"), "Latin-1"
        log.warning("%s is not UTF-8 (line %d has byte(s) %s); read it as %s", csv_path, line, bad, encoding)
        return text


def read_hand_info(raw_dir: str | Path) -> list[Record]:
    """Parse and validate ``<raw_dir>/HandInfo.csv`` (errors name the line and the bad value)."""
    csv_path = Path(raw_dir).expanduser() / CSV_NAME
    if not csv_path.is_file():
        raise HandCLIPError(f"{csv_path} not found; expected the 11k Hands HandInfo.csv next to the Hands/ folder")
    reader = csv.DictReader(io.StringIO(_decode(csv_path, csv_path.read_bytes()), newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise HandCLIPError(f"{csv_path}: line 1: missing column(s) {', '.join(missing)}; header is "
                                f"{','.join(header) or '(empty)'}")
        reader.fieldnames = header
        records = [_parse_row(csv_path, reader.line_num, row, len(header)) for row in reader]
    except csv.Error as err:
        raise _row_error(csv_path, reader.reader.line_num, f"not a readable CSV line ({err})") from None
    if not records:
        raise HandCLIPError(f"{csv_path} has a header but no image rows")
    _check_duplicates(csv_path, records)
    return records


def _check_duplicates(csv_path: Path, records: list[Record]) -> None:
    seen: dict[str, int] = {}
    for rec in records:
        if rec.image in seen:
            raise _row_error(csv_path, rec.line, f"imageName {rec.image!r} already listed on line {seen[rec.image]}")
        seen[rec.image] = rec.line


def check_images(raw_dir: str | Path, records: Iterable[Record]) -> None:
    """Every image the CSV lists must exist in ``<raw_dir>/Hands``."""
    images_dir = Path(raw_dir).expanduser() / IMAGES_DIR
    if not images_dir.is_dir():
        raise HandCLIPError(f"image folder {images_dir} not found; expected the 11k Hands images next to "
                            f"{CSV_NAME}")
    present = set(os.listdir(images_dir))
    missing = [rec for rec in records if rec.image not in present]
    if missing:
        named = ", ".join(f"{r.image} (line {r.line})" for r in missing[:MAX_NAMED])
        more = f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
        raise HandCLIPError(f"{len(missing)} image(s) listed in {images_dir.parent / CSV_NAME} are missing from "
                            f"{images_dir}: {named}{more}")
