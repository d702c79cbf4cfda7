"""Ranking pictures: a query beside its top-k gallery images, scores under them, green/red borders for right and
wrong identities when the truth is known. Drawn with Pillow (one picture per query must stay cheap: a folder
of a thousand queries gives a thousand pictures).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from handclip.data.images import to_rgb
from handclip.errors import HandCLIPError
from handclip.utils.files import atomic_write, printable

GREEN = (34, 139, 34)
RED = (205, 38, 38)
BLUE = (31, 119, 180)
GREY = (170, 170, 170)
BORDER = 6
GAP = 10
LINE = 17


@dataclass
class Tile:
    """One image of a row: its file, caption lines, and its border colour (None: a thin grey frame)."""

    path: str | Path
    caption: list[str] = field(default_factory=list)
    border: tuple[int, int, int] | None = None


@dataclass
class Row:
    """A query and its ranked gallery images, under a heading line; ``more``: further query images (the other
    photos of a case), drawn beside the query."""

    heading: str
    query: Tile
    items: list[Tile]
    more: list[Tile] = field(default_factory=list)


def match_colour(match: bool | None) -> tuple[int, int, int] | None:
    """Green for the right identity, red for a wrong one, None when the truth is unknown."""
    return None if match is None else (GREEN if match else RED)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):  # pragma: no cover - older Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def thumbnail(path: str | Path, size: int) -> Image.Image:
    """The whole image scaled to fit ``size`` x ``size`` (a grey "unreadable" box if it cannot be decoded)."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at a reduced scale
            img = to_rgb(ImageOps.exif_transpose(img), path)
            return ImageOps.contain(img, (size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError, HandCLIPError):
        box = Image.new("RGB", (size, size), (230, 230, 230))
        ImageDraw.Draw(box).text((8, size // 2 - 8), "unreadable", fill=(90, 90, 90), font=_font(13))
        return box


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    text = printable(text)  # one line: a newline in a file name is drawn as \n
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render(rows: list[Row], title: str | None = None, thumb: int = 150) -> Image.Image:
    """The picture of ``rows`` (one query and its ranking per row)."""
    font, bold = _font(13), _font(15)
    cols = 1 + max((len(r.more) + len(r.items) for r in rows), default=0)
    cell = thumb + 2 * BORDER
    captions = max((len(t.caption) for r in rows for t in [r.query, *r.more, *r.items]), default=0)
    row_h = LINE + 4 + cell + captions * LINE + GAP
    width = GAP + cols * (cell + GAP) + 2 * GAP  # extra space between the query and its ranking
    top = (LINE + GAP) if title else GAP
    canvas = Image.new("RGB", (width, top + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, GAP // 2), _fit(draw, title, bold, width - 2 * GAP), fill="black", font=bold)
    for r, row in enumerate(rows):
        y = top + r * row_h
        draw.text((GAP, y), _fit(draw, row.heading, bold, width - 2 * GAP), fill="black", font=bold)
        y += LINE + 4
        for c, tile in enumerate([row.query, *row.more, *row.items]):
            x = GAP + c * (cell + GAP) + (2 * GAP if c > len(row.more) else 0)
            colour = tile.border or GREY
            inset = 0 if tile.border else BORDER - 1  # a thin frame when there is no verdict
            draw.rectangle([x + inset, y + inset, x + cell - 1 - inset, y + cell - 1 - inset], fill=colour)
            draw.rectangle([x + BORDER, y + BORDER, x + BORDER + thumb - 1, y + BORDER + thumb - 1], fill="white")
            img = thumbnail(tile.path, thumb)
            canvas.paste(img, (x + BORDER + (thumb - img.width) // 2, y + BORDER + (thumb - img.height) // 2))
            for i, line in enumerate(tile.caption):
                draw.text((x, y + cell + 2 + i * LINE), _fit(draw, line, font, cell), fill="black", font=font)
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (a reader never sees half of it)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: one picture per query
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, buf.getvalue(), durable=False)


def ranking_picture(rows: list[Row], path: str | Path, title: str | None = None, thumb: int = 150) -> Path:
    """Render ``rows`` and write them to ``path`` (PNG)."""
    return save_png(render(rows, title, thumb), path)
