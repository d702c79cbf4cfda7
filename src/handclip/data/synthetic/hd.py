"""Writing a synthetic dataset in the raw HD layout: ``Original Images/1-501/<id>_<n>.jpg`` and ``.../502-712/``.

The subjects are the 11k generator's (dorsal right photographs only), split in HD's proportions (251 train, 251
test, 213 distractors out of 715): train ids in 1..447 (at or below the published threshold), test ids in
448..501, distractor ids in 502..712, so that ``python -m handclip.prepare --dataset hd`` splits them as it
splits the real download.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from handclip.data.synthetic.dataset import (
    DEFAULT_SIZE,
    ImageJob,
    Renderer,
    SynthSummary,
    check_size,
    default_workers,
    run_jobs,
)
from handclip.data.synthetic.traits import make_identity
from handclip.errors import HandCLIPError
from handclip.utils.files import check_output_folder, check_writable, swap_in

ASPECT = "dorsal right"
#: (folder, first id, last id) of each group of subjects, in order: train, test, distractors.
ID_RANGES = (("1-501", 1, 447), ("1-501", 448, 501), ("502-712", 502, 712))
#: The real download's identities per group: 251 train, 251 test, 213 distractors.
PUBLISHED_SUBJECTS = (251, 251, 213)
MAX_HD_SUBJECTS = 150  # the test group (448..501) holds at most 54 ids


def hd_groups(subjects: int) -> tuple[int, int, int]:
    """How many of ``subjects`` train, test and distract, in the published proportions (each at least 2)."""
    if not 6 <= subjects <= MAX_HD_SUBJECTS:
        raise HandCLIPError(f"--subjects must be between 6 and {MAX_HD_SUBJECTS} for --dataset hd, got {subjects}")
    distract = max(2, round(subjects * PUBLISHED_SUBJECTS[2] / sum(PUBLISHED_SUBJECTS)))
    train = (subjects - distract + 1) // 2
    return train, subjects - distract - train, distract


def hd_subject_ids(subjects: int, seed: int) -> list[tuple[str, int]]:
    """(folder, id) of every subject: ids drawn from each group's range, sorted within it."""
    rng = np.random.default_rng([seed, 5])
    out = []
    for (folder, lo, hi), n in zip(ID_RANGES, hd_groups(subjects)):
        out += [(folder, int(i)) for i in sorted(rng.choice(np.arange(lo, hi + 1), size=n, replace=False))]
    return out


def generate_hd_dataset(out_dir: str | Path, subjects: int = 40, images_per_aspect: int = 6, seed: int = 0,
                        size: tuple[int, int] = DEFAULT_SIZE, overwrite: bool = False, workers: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> SynthSummary:
    """Write ``<out_dir>/Original Images/{1-501,502-712}/<id>_<n>.jpg``: ``images_per_aspect`` +-2 dorsal right
    photographs (at least 2) of each of ``subjects`` synthetic subjects."""
    start = time.perf_counter()
    if images_per_aspect < 2:
        raise HandCLIPError(f"--images-per-aspect must be at least 2, got {images_per_aspect}")
    size = check_size(tuple(size))  # type: ignore[arg-type]
    ids = hd_subject_ids(subjects, seed)
    out = Path(out_dir).expanduser()
    images_dir = out / "Original Images"
    check_output_folder(out, overwrite, "its Original Images/")
    check_writable(out, "output folder (--out)")
    out.mkdir(parents=True, exist_ok=True)
    identities = [make_identity(seed, i, str(sid), images_per_aspect) for i, (_, sid) in enumerate(ids)]
    jobs = [
        ImageJob(0, s, ASPECT, k, False, f"{folder}/{sid}_{k + 1}.jpg")
        for s, (folder, sid) in enumerate(ids) for k in range(identities[s].counts[ASPECT])
    ]
    jobs = [ImageJob(n, j.subject_index, j.aspect, j.image_index, False, j.name) for n, j in enumerate(jobs)]
    partial = out / ".Original Images.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for folder, _, _ in ID_RANGES:
        (partial / folder).mkdir(parents=True, exist_ok=True)
    render = Renderer(identities, size, seed, partial)
    try:
        run_jobs(render, jobs, default_workers() if workers is None else max(1, workers), progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap_in(partial, images_dir)
    return SynthSummary(out, images_dir, len(identities), len(jobs), 0, time.perf_counter() - start)
