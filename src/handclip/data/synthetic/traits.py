"""Who a synthetic subject is: stable traits (skin, proportions, nails, creases, veins, marks) and ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from handclip.errors import HandCLIPError
from handclip.hands import ELEVEN_K_HANDS, aspect_of_hand

#: The four aspects, as written in HandInfo.csv's ``aspectOfHand`` column, in generation order.
ASPECTS: tuple[str, ...] = tuple(aspect_of_hand(hand) for hand in ELEVEN_K_HANDS)

MAX_SUBJECTS = 1000
#: Subject ids are drawn from these two ranges, half from each, so the published id thresholds
#: (1037..1051) put about half of the subjects in train_all and half in test.
TRAIN_ID_RANGE = (0, 1000)


TEST_ID_RANGE = (1100, 1600)


Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Mark:
    """A mole or birthmark attached to a hand part.

    ``part`` is -1 for the palm (``u`` across in [-0.5, 0.5], ``v`` up in [0, 1]) or a digit index
    0..4 (thumb, index, middle, ring, little; ``u`` across the digit in [-0.5, 0.5], ``v`` along it).
    """

    part: int
    u: float
    v: float
    radius: float
    darkness: float
    kind: str  # "mole" | "patch"


@dataclass(frozen=True)
class HandShape:
    """Proportions of one hand (left and right differ slightly), in palm-width units."""

    palm_height: float
    wrist_width: float
    lengths: tuple[float, ...]  # thumb, index, middle, ring, little
    widths: tuple[float, ...]
    base_drop: tuple[float, ...]  # how far below the palm top each finger (index..little) starts
    thumb_base: float  # height of the thumb base as a fraction of the palm height
    creases: tuple[float, ...]  # offsets of the palm crease control points
    veins: tuple[tuple[float, float, float], ...]  # (x at wrist, x at knuckles, bend) per vein


@dataclass(frozen=True)
class Identity:
    """Stable traits of one synthetic subject."""

    subject_id: str
    age: int
    gender: str
    skin: Colour
    skin_label: str
    nail_polish: int
    nail: Colour
    shapes: dict[str, HandShape]  # "right" | "left"
    marks: dict[str, tuple[Mark, ...]]  # aspect -> marks
    counts: dict[str, int]  # aspect -> number of images


_SKIN_TONES: tuple[tuple[Colour, str], ...] = (
    ((246, 216, 196), "very fair"),
    ((236, 196, 168), "fair"),
    ((222, 178, 142), "fair"),
    ((198, 146, 110), "medium"),
    ((172, 120, 86), "medium"),
    ((132, 88, 60), "dark"),
    ((96, 64, 44), "dark"),
)


_POLISH: tuple[Colour, ...] = (
    (200, 20, 40), (150, 10, 60), (230, 90, 150), (40, 50, 150), (30, 30, 30), (120, 40, 160), (230, 120, 40),
)


def mix(a: Sequence[float], b: Sequence[float], t: float) -> Colour:
    """Linear blend of two colours (``t = 0`` gives ``a``)."""
    return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(a, b))  # type: ignore[return-value]


def scale(c: Sequence[float], f: float) -> Colour:
    return tuple(int(max(0, min(255, round(x * f)))) for x in c)  # type: ignore[return-value]


def _hand_shape(rng: np.random.Generator, base: HandShape | None = None) -> HandShape:
    """Random proportions, or a slightly jittered copy of ``base`` (the other hand of the same person)."""
    if base is not None:
        j = lambda v, s: float(v * (1 + rng.normal(0, s)))  # noqa: E731
        return HandShape(
            palm_height=j(base.palm_height, 0.01),
            wrist_width=j(base.wrist_width, 0.01),
            lengths=tuple(j(v, 0.015) for v in base.lengths),
            widths=tuple(j(v, 0.015) for v in base.widths),
            base_drop=base.base_drop,
            thumb_base=base.thumb_base,
            creases=tuple(float(c + rng.normal(0, 0.01)) for c in base.creases),
            veins=base.veins,
        )
    length_scale = rng.uniform(0.8, 1.25)
    width_scale = rng.uniform(0.82, 1.15)
    typical_len = (0.62, 0.78, 0.88, 0.82, 0.64)
    typical_wid = (0.29, 0.235, 0.245, 0.225, 0.19)
    return HandShape(
        palm_height=float(rng.uniform(0.9, 1.3)),
        wrist_width=float(rng.uniform(0.7, 0.86)),
        lengths=tuple(float(t * length_scale * rng.uniform(0.85, 1.15)) for t in typical_len),
        widths=tuple(float(t * width_scale * rng.uniform(0.93, 1.07)) for t in typical_wid),
        base_drop=(
            float(rng.uniform(0.0, 0.06)), 0.0, float(rng.uniform(0.0, 0.06)), float(rng.uniform(0.08, 0.18)),
        ),
        thumb_base=float(rng.uniform(0.22, 0.4)),
        creases=tuple(float(v) for v in rng.uniform(-0.07, 0.07, size=8)),
        veins=tuple(
            (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.4, 0.4)), float(rng.uniform(-0.12, 0.12)))
            for _ in range(int(rng.integers(2, 4)))
        ),
    )


def _marks(rng: np.random.Generator, dorsal: bool) -> tuple[Mark, ...]:
    """Moles and at most one birthmark patch for one side of one hand."""
    marks = []
    for _ in range(int(rng.integers(2, 6) if dorsal else rng.integers(1, 4))):
        on_palm = rng.random() < 0.7
        marks.append(Mark(
            part=-1 if on_palm else int(rng.integers(0, 5)),
            u=float(rng.uniform(-0.4, 0.4)),
            v=float(rng.uniform(0.12, 0.9) if on_palm else rng.uniform(0.15, 0.6)),
            radius=float(rng.uniform(0.022, 0.045)),
            darkness=float(rng.uniform(0.35, 0.6)),
            kind="mole",
        ))
    if rng.random() < (1.0 if dorsal else 0.6):
        marks.append(Mark(
            part=-1,
            u=float(rng.uniform(-0.3, 0.3)),
            v=float(rng.uniform(0.2, 0.8)),
            radius=float(rng.uniform(0.09, 0.17)),
            darkness=float(rng.choice([rng.uniform(0.6, 0.75), rng.uniform(1.15, 1.25)])),
            kind="patch",
        ))
    return tuple(marks)


def make_identity(seed: int, subject_index: int, subject_id: str, images_per_aspect: int) -> Identity:
    """The stable traits of one subject (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, 1, subject_index])
    tone, label = _SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))]
    skin = tuple(int(np.clip(c * rng.uniform(0.94, 1.06), 0, 255)) for c in tone)
    gender = "female" if rng.random() < 0.5 else "male"
    polish = int(rng.random() < (0.45 if gender == "female" else 0.05))
    nail = _POLISH[int(rng.integers(len(_POLISH)))] if polish else mix(skin, (250, 205, 205), rng.uniform(0.35, 0.7))
    right = _hand_shape(rng)
    left = _hand_shape(rng, base=right)
    marks = {aspect: _marks(rng, aspect.startswith("dorsal")) for aspect in ASPECTS}
    counts = {aspect: max(2, images_per_aspect + int(rng.integers(-2, 3))) for aspect in ASPECTS}
    return Identity(
        subject_id=subject_id,
        age=int(rng.integers(18, 76)),
        gender=gender,
        skin=skin,  # type: ignore[arg-type]
        skin_label=label,
        nail_polish=polish,
        nail=nail,  # type: ignore[arg-type]
        shapes={"right": right, "left": left},
        marks=marks,
        counts=counts,
    )


def subject_ids(subjects: int, seed: int) -> list[str]:
    """``subjects`` distinct 7-digit ids, sorted: the first half below 1000, the rest in 1100..1600."""
    if not 1 <= subjects <= MAX_SUBJECTS:
        raise HandCLIPError(f"--subjects must be between 1 and {MAX_SUBJECTS}, got {subjects}")
    rng = np.random.default_rng([seed, 0])
    n_low = (subjects + 1) // 2
    low = rng.choice(np.arange(TRAIN_ID_RANGE[0], TRAIN_ID_RANGE[1] + 1), size=n_low, replace=False)
    high = rng.choice(np.arange(TEST_ID_RANGE[0], TEST_ID_RANGE[1] + 1), size=subjects - n_low, replace=False)
    return [f"{int(i):07d}" for i in sorted(np.concatenate([low, high]).tolist())]
