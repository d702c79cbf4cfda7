"""Synthetic hand photographs in the raw 11k Hands download format (``Hands/*.jpg`` + ``HandInfo.csv``), or
in the raw HD layout (:mod:`handclip.data.synthetic.hd`).

Every subject ("identity") gets stable traits: skin tone, palm proportions, finger lengths and widths,
nail colour, palm creases, veins and marks (moles, a birthmark) at fixed places relative to the hand.
Every image then varies what a camera and a pose would: finger spread, rotation, shift, scale, sleeve,
lighting gradient, brightness, colour cast, background tint, noise, blur and JPEG quality. The nuisance
variation is deliberately strong, so that raw-pixel or colour similarity is a poor identity cue while
shape proportions and mark positions stay consistent and learnable.

Geometry is built in *hand coordinates*: the palm is one unit wide, the wrist at ``y = 0``, fingers
pointing to ``+y``; a right hand seen from the back (dorsal right) has its thumb at ``-x``. Palmar views
and left hands are mirror images in ``x`` (so marks, which are attached to the hand, mirror too), and
an affine frame maps hand coordinates to pixels.

Everything is seeded: the same seed gives byte-identical images and CSV, whatever the worker count.
"""

from handclip.data.synthetic.dataset import (
    CSV_COLUMNS,
    DEFAULT_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    SynthSummary,
    check_size,
    contact_sheet,
    generate_dataset,
    parse_size,
)
from handclip.data.synthetic.hd import generate_hd_dataset, hd_groups, hd_subject_ids
from handclip.data.synthetic.render import render_image
from handclip.data.synthetic.traits import ASPECTS, MAX_SUBJECTS, Identity, make_identity, subject_ids

__all__ = [
    "ASPECTS", "CSV_COLUMNS", "DEFAULT_SIZE", "MAX_SIZE", "MAX_SUBJECTS", "MIN_SIZE", "Identity", "SynthSummary",
    "check_size", "contact_sheet", "generate_dataset", "generate_hd_dataset", "hd_groups", "hd_subject_ids",
    "make_identity", "parse_size", "render_image", "subject_ids",
]
