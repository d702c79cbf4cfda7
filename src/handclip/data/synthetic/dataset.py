"""Writing a synthetic dataset in the raw 11k format (``Hands/*.jpg`` + ``HandInfo.csv``), and a contact sheet."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from handclip.data.synthetic.render import encode_jpeg, render_image
from handclip.data.synthetic.traits import ASPECTS, Identity, make_identity, subject_ids
from handclip.errors import HandCLIPError
from handclip.utils.devices import usable_cpus
from handclip.utils.files import atomic_write, check_output_folder, check_writable, swap_in
from handclip.utils.locks import die_with_parent

CSV_COLUMNS: tuple[str, ...] = (
    "id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand", "imageName", "irregularities",
)


DEFAULT_SIZE: tuple[int, int] = (320, 240)


MIN_SIZE: tuple[int, int] = (64, 48)


MAX_SIZE: tuple[int, int] = (1600, 1200)


ACCESSORY_RATE = 0.05


@dataclass(frozen=True)
class ImageJob:
    """One image to render: who, which aspect, and its own random stream."""

    index: int
    subject_index: int
    aspect: str
    image_index: int
    accessory: bool
    name: str


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_dataset` wrote."""

    out_dir: Path
    csv_path: Path
    subjects: int
    images: int
    accessory_images: int
    seconds: float


def plan_images(identities: Sequence[Identity], seed: int) -> list[ImageJob]:
    """Every image to render, numbered in CSV order; about 5% flagged as wearing an accessory (at least one)."""
    rng = np.random.default_rng([seed, 3])
    jobs: list[ImageJob] = []
    for s, ident in enumerate(identities):
        for aspect in ASPECTS:
            for k in range(ident.counts[aspect]):
                n = len(jobs)
                jobs.append(ImageJob(n, s, aspect, k, bool(rng.random() < ACCESSORY_RATE), f"Hand_{n:07d}.jpg"))
    if jobs and not any(j.accessory for j in jobs):
        pick = int(rng.integers(len(jobs)))
        j = jobs[pick]
        jobs[pick] = ImageJob(j.index, j.subject_index, j.aspect, j.image_index, True, j.name)
    return jobs


def _job_bytes(ident: Identity, job: ImageJob, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng([seed, 2, job.index])
    return encode_jpeg(render_image(ident, job.aspect, size, rng, job.accessory), rng)


class Renderer:
    """Picklable worker: render a job and write its file."""

    def __init__(self, identities: Sequence[Identity], size: tuple[int, int], seed: int, hands_dir: Path):
        self.identities, self.size, self.seed, self.hands_dir = list(identities), size, seed, hands_dir

    def __call__(self, job: ImageJob) -> str:
        data = _job_bytes(self.identities[job.subject_index], job, self.size, self.seed)
        (self.hands_dir / job.name).write_bytes(data)
        return job.name


def csv_text(identities: Sequence[Identity], jobs: Sequence[ImageJob]) -> str:
    """HandInfo.csv contents; ids quoted as 7-digit strings like the real file."""
    lines = [",".join(CSV_COLUMNS)]
    for j in jobs:
        ident = identities[j.subject_index]
        lines.append(
            f'"{ident.subject_id}",{ident.age},{ident.gender},{ident.skin_label},{int(j.accessory)},'
            f"{ident.nail_polish},{j.aspect},{j.name},0"
        )
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    """``"320x240"`` -> ``(320, 240)``, within MIN_SIZE..MAX_SIZE."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise HandCLIPError(f"image size {text!r} is not of the form WIDTHxHEIGHT, e.g. 320x240") from None
    return check_size((w, h))


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    if not (MIN_SIZE[0] <= w <= MAX_SIZE[0] and MIN_SIZE[1] <= h <= MAX_SIZE[1]):
        raise HandCLIPError(
            f"image size {w}x{h} out of range; width must be {MIN_SIZE[0]}..{MAX_SIZE[0]} and height "
            f"{MIN_SIZE[1]}..{MAX_SIZE[1]}"
        )
    return (int(w), int(h))


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output without ``overwrite`` (with it, only Hands/ and HandInfo.csv are replaced,
    once the new ones are complete)."""
    check_output_folder(out_dir, overwrite, "its Hands/ and HandInfo.csv")
    check_writable(out_dir, "output folder (--out)")
    out_dir.mkdir(parents=True, exist_ok=True)


def default_workers() -> int:
    """Usable CPUs (at most 8)."""
    return min(8, usable_cpus())


def generate_dataset(
    out_dir: str | Path,
    subjects: int = 40,
    images_per_aspect: int = 6,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SynthSummary:
    """Write ``<out_dir>/Hands/*.jpg`` and ``<out_dir>/HandInfo.csv`` for ``subjects`` synthetic subjects.

    Each subject has all four aspects with ``images_per_aspect`` +-2 images each (at least 2).
    ``progress(done, total)`` is called as images are written. The result depends only on
    ``subjects``, ``images_per_aspect``, ``seed`` and ``size`` (not on ``workers``).
    """
    start = time.perf_counter()
    if images_per_aspect < 2:
        raise HandCLIPError(f"--images-per-aspect must be at least 2, got {images_per_aspect}")
    size = check_size(tuple(size))  # type: ignore[arg-type]
    ids = subject_ids(subjects, seed)
    out = Path(out_dir).expanduser()
    _prepare_out(out, overwrite)
    identities = [make_identity(seed, i, sid, images_per_aspect) for i, sid in enumerate(ids)]
    jobs = plan_images(identities, seed)

    hands_dir = out / "Hands"
    partial = out / ".Hands.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    render = Renderer(identities, size, seed, partial)
    n_workers = default_workers() if workers is None else max(1, workers)
    try:
        run_jobs(render, jobs, n_workers, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # Swap in the complete new set; the old one (with --overwrite) is removed only now.
    swap_in(partial, hands_dir)
    csv_path = atomic_write(out / "HandInfo.csv", csv_text(identities, jobs))
    return SynthSummary(out, csv_path, len(identities), len(jobs), sum(j.accessory for j in jobs),
                        time.perf_counter() - start)


def run_jobs(render: Renderer, jobs: Sequence[ImageJob], workers: int,
              progress: Callable[[int, int], None] | None) -> None:
    total = len(jobs)
    if workers == 1 or total < 16:
        for done, job in enumerate(jobs, 1):
            render(job)
            if progress:
                progress(done, total)
        return
    # An executor (not multiprocessing.Pool, whose terminate can hang on a full task pipe) so that an
    # error or Ctrl-C stops cleanly; pending work is cancelled.
    with ProcessPoolExecutor(workers, initializer=die_with_parent) as pool:  # no worker outlives a killed run
        try:
            for done, _ in enumerate(pool.map(render, jobs, chunksize=8), 1):
                if progress:
                    progress(done, total)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def contact_sheet(
    out_png: str | Path,
    identities: int = 4,
    images_per_aspect: int = 2,
    seed: int = 0,
    thumb: tuple[int, int] = (128, 96),
) -> Path:
    """A grid of synthetic images: one row per identity, ``images_per_aspect`` columns per aspect.

    Images are rendered at 320x240 (the demo size) and shrunk to ``thumb``.
    """
    tw, th = thumb
    pad, label_h, label_w = 4, 16, 64
    ids = subject_ids(max(identities, 2), seed)[:identities]
    idents = [make_identity(seed, i, sid, images_per_aspect) for i, sid in enumerate(ids)]
    cols = len(ASPECTS) * images_per_aspect
    sheet = Image.new("RGB", (label_w + cols * (tw + pad) + pad, label_h + len(idents) * (th + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for a, aspect in enumerate(ASPECTS):
        draw.text((label_w + a * images_per_aspect * (tw + pad) + pad, 2), aspect, fill=(0, 0, 0))
    for r, ident in enumerate(idents):
        y = label_h + r * (th + pad) + pad
        draw.text((4, y + th // 2 - 6), f"id {ident.subject_id}", fill=(0, 0, 0))
        for a, aspect in enumerate(ASPECTS):
            for k in range(images_per_aspect):
                rng = np.random.default_rng([seed, 4, r, a, k])
                img = render_image(ident, aspect, DEFAULT_SIZE, rng, accessory=False)
                x = label_w + (a * images_per_aspect + k) * (tw + pad) + pad
                sheet.paste(img.resize(thumb, Image.LANCZOS), (x, y))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out
