"""Synthetic hand photographs in the raw 11k Hands download format (``Hands/*.jpg`` + ``HandInfo.csv``).

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

from __future__ import annotations

import io
import math
from concurrent.futures import ProcessPoolExecutor
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from handclip.errors import HandCLIPError

#: The four aspects, as written in HandInfo.csv's ``aspectOfHand`` column, in generation order.
ASPECTS: tuple[str, ...] = ("dorsal right", "dorsal left", "palmar right", "palmar left")
CSV_COLUMNS: tuple[str, ...] = (
    "id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand", "imageName", "irregularities",
)
DEFAULT_SIZE: tuple[int, int] = (320, 240)
MIN_SIZE: tuple[int, int] = (64, 48)
MAX_SIZE: tuple[int, int] = (1600, 1200)
MAX_SUBJECTS = 1000
#: Subject ids are drawn from these two ranges, half from each, so the published id thresholds
#: (1037..1051) put about half of the subjects in train_all and half in test.
TRAIN_ID_RANGE = (0, 1000)
TEST_ID_RANGE = (1100, 1600)
ACCESSORY_RATE = 0.05

Point = tuple[float, float]
Colour = tuple[int, int, int]
Array = np.ndarray


# --------------------------------------------------------------------------------------------------
# Identity traits
# --------------------------------------------------------------------------------------------------


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
_SLEEVES: tuple[Colour, ...] = (
    (30, 40, 90), (20, 20, 20), (200, 200, 205), (120, 30, 30), (60, 110, 60), (160, 140, 110), (90, 90, 100),
)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> Colour:
    """Linear blend of two colours (``t = 0`` gives ``a``)."""
    return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(a, b))  # type: ignore[return-value]


def _scale(c: Sequence[float], f: float) -> Colour:
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
    nail = _POLISH[int(rng.integers(len(_POLISH)))] if polish else _mix(skin, (250, 205, 205), rng.uniform(0.35, 0.7))
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


# --------------------------------------------------------------------------------------------------
# Geometry helpers (hand coordinates, numpy (N, 2) arrays)
# --------------------------------------------------------------------------------------------------


def _unit(angle_deg: float) -> Array:
    """Direction at ``angle_deg`` from +y towards +x."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a), math.cos(a)])


def _normal(d: Array) -> Array:
    """``d`` turned 90 degrees clockwise (towards +x when ``d`` is +y)."""
    return np.array([d[1], -d[0]])


def _capsule(base: Array, d: Array, length: float, w0: float, w1: float, n_arc: int = 10) -> Array:
    """A finger: a tapered band from ``base`` along ``d`` with a round tip."""
    n = _normal(d)
    tip = base + d * (length - w1 / 2)
    arc = [tip + (n * math.cos(t) + d * math.sin(t)) * (w1 / 2) for t in np.linspace(0, math.pi, n_arc)]
    return np.array([base + n * w0 / 2, *arc, base - n * w0 / 2])


def _ellipse(centre: Array, d: Array, half_len: float, half_wid: float, n: int = 18) -> Array:
    """An ellipse with its long axis along ``d``."""
    nrm = _normal(d)
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return centre + np.outer(np.cos(t) * half_len, d) + np.outer(np.sin(t) * half_wid, nrm)


def _curve(points: Sequence[Sequence[float]], n: int = 12) -> Array:
    """A smooth open curve: a quadratic Bezier for three control points, Chaikin-rounded otherwise."""
    pts = np.asarray(points, dtype=float)
    if len(pts) == 3:
        t = np.linspace(0, 1, n)[:, None]
        return (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t**2 * pts[2]
    return _chaikin(pts, 2, closed=False)


def _chaikin(points: Array, iterations: int, closed: bool = True) -> Array:
    """Round a polygon's corners by Chaikin corner cutting."""
    pts = np.asarray(points, dtype=float)
    for _ in range(iterations):
        nxt = np.roll(pts, -1, axis=0) if closed else pts[1:]
        cur = pts if closed else pts[:-1]
        q = 0.75 * cur + 0.25 * nxt
        r = 0.25 * cur + 0.75 * nxt
        new = np.empty((2 * len(cur), 2))
        new[0::2], new[1::2] = q, r
        pts = new if closed else np.vstack([pts[:1], new, pts[-1:]])
    return pts


@dataclass(frozen=True)
class Digit:
    """A posed digit: where it starts, where it points, how long and wide it is."""

    base: Array
    d: Array
    length: float
    width: float

    def at(self, u: float, v: float) -> Array:
        """Point ``u`` widths across and ``v`` lengths along the digit."""
        return self.base + self.d * (v * self.length) + _normal(self.d) * (u * self.width)

    @property
    def tip_width(self) -> float:
        return self.width * 0.86

    def outline(self) -> Array:
        return _capsule(self.base, self.d, self.length, self.width, self.tip_width)


@dataclass(frozen=True)
class Pose:
    """Per-image pose and camera: the nuisance variables."""

    angle: float
    scale: float
    shift: tuple[float, float]
    finger_angles: tuple[float, ...]  # index..little, degrees
    thumb_angle: float
    curl: tuple[float, ...]  # apparent length factor per digit (foreshortening)
    sleeve: Colour | None
    sleeve_start: float


def _random_pose(rng: np.random.Generator) -> Pose:
    spread = rng.uniform(0.0, 1.0)
    step = 4 + 9 * spread
    return Pose(
        angle=float(rng.uniform(-12, 12)),
        scale=float(rng.uniform(0.9, 1.05)),
        shift=(float(rng.uniform(-0.09, 0.09)), float(rng.uniform(-0.07, 0.07))),
        finger_angles=tuple(float((i - 1.3) * step + rng.normal(0, 2.5)) for i in range(4)),
        thumb_angle=float(-rng.uniform(28, 62)),
        curl=tuple(float(rng.uniform(0.94, 1.0)) for _ in range(5)),
        sleeve=_SLEEVES[int(rng.integers(len(_SLEEVES)))] if rng.random() < 0.55 else None,
        sleeve_start=float(rng.uniform(-0.55, -0.2)),
    )


def _pose_digits(shape: HandShape, pose: Pose) -> list[Digit]:
    """Thumb then index..little, posed."""
    h = shape.palm_height
    thumb_base = np.array([-0.36, h * shape.thumb_base])
    digits = [Digit(thumb_base, _unit(pose.thumb_angle), shape.lengths[0] * pose.curl[0] + 0.12, shape.widths[0])]
    for i in range(4):
        x = -0.5 + (i + 0.5) / 4
        base = np.array([x * 0.96, h - 0.1 - shape.base_drop[i]])
        length = shape.lengths[i + 1] * pose.curl[i + 1] + 0.1
        digits.append(Digit(base, _unit(pose.finger_angles[i]), length, shape.widths[i + 1]))
    return digits


def _palm_outline(shape: HandShape) -> Array:
    """The palm (with the thenar bulge at the thumb side and the wrist), rounded."""
    h, ww = shape.palm_height, shape.wrist_width
    ctrl = np.array([
        (-ww / 2, -0.05), (-0.5, h * 0.2), (-0.56, h * shape.thumb_base + 0.05), (-0.5, h * 0.7),
        (-0.48, h - 0.02), (-0.2, h), (0.2, h), (0.48, h - 0.1 - shape.base_drop[3] / 2),
        (0.5, h * 0.55), (0.45, h * 0.2), (ww / 2, -0.05),
    ])
    return _chaikin(ctrl, 3)


def _palm_point(shape: HandShape, u: float, v: float) -> Array:
    return np.array([u * (shape.wrist_width + (1 - shape.wrist_width) * min(1.0, 2 * v)), v * shape.palm_height])


def _mark_centre(shape: HandShape, digits: list[Digit], mark: Mark) -> Array:
    if mark.part < 0:
        return _palm_point(shape, mark.u, mark.v)
    return digits[mark.part].at(mark.u * 0.6, 0.15 + mark.v * 0.6)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


class _Frame:
    """Maps hand coordinates to canvas pixels (mirror, rotate, scale, shift)."""

    def __init__(self, size: tuple[int, int], pose: Pose, mirror: bool, pivot: Point):
        w, h = size
        self.ppu = pose.scale * 0.37 * min(w * 0.75, h)
        self.flip = -1.0 if mirror else 1.0
        a = math.radians(pose.angle)
        self.cos, self.sin = math.cos(a), math.sin(a)
        self.centre = (w / 2 + pose.shift[0] * w, h / 2 + pose.shift[1] * h)
        self.pivot = pivot

    def __call__(self, pts: Array) -> list[Point]:
        pts = np.atleast_2d(pts)
        x = (pts[:, 0] - self.pivot[0]) * self.flip
        y = -(pts[:, 1] - self.pivot[1])
        px = (x * self.cos - y * self.sin) * self.ppu + self.centre[0]
        py = (x * self.sin + y * self.cos) * self.ppu + self.centre[1]
        return list(zip(px.tolist(), py.tolist()))

    def px(self, units: float) -> int:
        return max(1, int(round(units * self.ppu)))


def _draw_arm(draw: ImageDraw.ImageDraw, f: _Frame, shape: HandShape, skin: Colour, pose: Pose) -> None:
    ww = shape.wrist_width
    arm = np.array([(-ww / 2, 0.15), (ww / 2, 0.15), (ww * 0.62, -3.5), (-ww * 0.62, -3.5)])
    draw.polygon(f(arm), fill=skin)
    if pose.sleeve is not None:
        s0 = pose.sleeve_start
        sleeve = np.array([(-ww * 0.7, s0), (ww * 0.7, s0 + 0.04), (ww * 0.9, -3.5), (-ww * 0.9, -3.5)])
        draw.polygon(f(sleeve), fill=pose.sleeve, outline=_scale(pose.sleeve, 0.7), width=f.px(0.012))


def _draw_silhouette(draw: ImageDraw.ImageDraw, f: _Frame, shapes: Iterable[Array], colour: Colour,
                     width: int) -> None:
    """The hand's outer contour: every part filled and stroked in ``colour``, later covered by skin."""
    for poly in shapes:
        draw.polygon(f(poly), fill=colour, outline=colour, width=width)


def _draw_nail(draw: ImageDraw.ImageDraw, f: _Frame, dg: Digit, ident: Identity, under: bool) -> None:
    """A nail near the tip; ``under`` draws the palmar view's rim peeking past the fingertip."""
    w = dg.tip_width
    half_len = w * 0.55
    if under:
        centre = dg.at(0, 1.0) - dg.d * (half_len * 0.75)
        draw.polygon(f(_ellipse(centre, dg.d, half_len, w * 0.36)), fill=ident.nail)
        return
    centre = dg.at(0, 1.0) - dg.d * (half_len + w * 0.1)
    draw.polygon(f(_ellipse(centre, dg.d, half_len, w * 0.34)), fill=ident.nail, outline=_scale(ident.skin, 0.75))
    if not ident.nail_polish:
        tip = centre + dg.d * half_len * 0.75
        draw.polygon(f(_ellipse(tip, dg.d, half_len * 0.22, w * 0.3)), fill=(246, 240, 232))


def _draw_dorsal_details(draw: ImageDraw.ImageDraw, f: _Frame, ident: Identity, shape: HandShape,
                         digits: list[Digit]) -> None:
    skin = ident.skin
    wrinkle, lw = _scale(skin, 0.72), f.px(0.011)
    for vx0, vx1, bend in shape.veins:
        vein = _curve([(vx0 * shape.wrist_width, 0.05), ((vx0 + vx1) / 2 + bend, shape.palm_height * 0.5),
                       (vx1, shape.palm_height * 0.85)])
        draw.line(f(vein), fill=_mix(skin, (90, 110, 150), 0.22), width=f.px(0.02))
    for k, dg in enumerate(digits):
        if k > 0:  # knuckle bump on the palm just below the finger base
            bump = _ellipse(dg.at(0, 0.1), dg.d, dg.width * 0.22, dg.width * 0.3)
            draw.polygon(f(bump), fill=_scale(skin, 1.07))
        joints = ((0.55, 3),) if k == 0 else ((0.5, 3), (0.78, 1))
        for v, lines in joints:
            for j in range(lines):
                c = dg.at(0, v + 0.025 * j)
                arc = [c - _normal(dg.d) * dg.width * 0.28, c + dg.d * 0.018, c + _normal(dg.d) * dg.width * 0.28]
                draw.line(f(_curve(arc, 6)), fill=wrinkle, width=lw)
        _draw_nail(draw, f, dg, ident, under=False)


def _draw_palmar_details(draw: ImageDraw.ImageDraw, f: _Frame, ident: Identity, shape: HandShape,
                         digits: list[Digit]) -> None:
    light = _mix(ident.skin, (250, 200, 185), 0.12)
    crease, lw = _scale(ident.skin, 0.66), f.px(0.014)
    h, c = shape.palm_height, shape.creases
    draw.polygon(f(_ellipse(np.array([0.05, h * 0.5]), np.array([0.0, 1.0]), h * 0.38, 0.36, 24)), fill=light)
    for dg in digits:
        for v in ((0.42,) if dg is digits[0] else (0.32, 0.62)):
            draw.line(f(np.array([dg.at(-0.42, v), dg.at(0.42, v)])), fill=crease, width=lw)
    lines = (
        [(0.5, h * (0.8 + c[0])), (0.1, h * (0.72 + c[1])), (-0.22, h * (0.9 + c[2]))],  # heart
        [(-0.5, h * (0.66 + c[3])), (-0.05, h * (0.55 + c[4])), (0.36, h * (0.5 + c[5]))],  # head
        [(-0.47, h * (0.68 + c[3])), (-0.18 + c[6], h * 0.35), (-0.1 + c[7], h * 0.03)],  # life
    )
    for pts in lines:
        draw.line(f(_curve(pts, 14)), fill=crease, width=lw)


def _draw_marks(draw: ImageDraw.ImageDraw, f: _Frame, ident: Identity, shape: HandShape, digits: list[Digit],
                aspect: str) -> None:
    for mark in ident.marks[aspect]:
        centre = _mark_centre(shape, digits, mark)
        colour = _scale(_mix(ident.skin, (110, 70, 45), 0.4), mark.darkness) if mark.kind == "mole" else (
            _scale(ident.skin, mark.darkness))
        squash = 0.7 if mark.kind == "patch" else 0.9
        draw.polygon(f(_ellipse(centre, np.array([0.6, 0.8]), mark.radius, mark.radius * squash, 16)), fill=colour)


def _draw_accessory(draw: ImageDraw.ImageDraw, f: _Frame, shape: HandShape, digits: list[Digit],
                    rng: np.random.Generator) -> None:
    metal = (212, 175, 55) if rng.random() < 0.5 else (196, 198, 206)
    if rng.random() < 0.6:  # a ring on the ring (or middle) finger
        dg = digits[3 if rng.random() < 0.7 else 2]
        band = np.array([dg.at(-0.56, 0.2), dg.at(0.56, 0.2), dg.at(0.56, 0.28), dg.at(-0.56, 0.28)])
        draw.polygon(f(band), fill=metal, outline=_scale(metal, 0.6), width=f.px(0.008))
    else:  # a bracelet at the wrist
        ww = shape.wrist_width * 0.58
        band = np.array([(-ww, -0.05), (ww, -0.05), (ww * 1.02, -0.17), (-ww * 1.02, -0.17)])
        draw.polygon(f(band), fill=metal, outline=_scale(metal, 0.6), width=f.px(0.01))


@dataclass(frozen=True)
class _Posed:
    """A hand posed on a canvas: the pixel frame and the hand-coordinate parts."""

    frame: _Frame
    shape: HandShape
    digits: list[Digit]
    palm: Array
    dorsal: bool

    def silhouette(self) -> list[Array]:
        return [self.palm, *(d.outline() for d in self.digits)]


def _pose_hand(canvas_size: tuple[int, int], ident: Identity, aspect: str, pose: Pose) -> _Posed:
    side = aspect.split()[1]
    dorsal = aspect.startswith("dorsal")
    shape = ident.shapes[side]
    mirror = (side == "left") != (not dorsal)
    frame = _Frame(canvas_size, pose, mirror, pivot=(0.0, shape.palm_height * 0.9))
    return _Posed(frame, shape, _pose_digits(shape, pose), _palm_outline(shape), dorsal)


def _draw_hand(canvas: Image.Image, ident: Identity, aspect: str, posed: _Posed, pose: Pose, accessory: bool,
               rng: np.random.Generator) -> None:
    """Draw the posed hand (arm, digits, palm, details, marks, accessory) on ``canvas``."""
    f, shape, digits = posed.frame, posed.shape, posed.digits
    draw = ImageDraw.Draw(canvas)
    outline = _scale(ident.skin, 0.62)
    _draw_silhouette(draw, f, posed.silhouette(), outline, f.px(0.018))
    _draw_arm(draw, f, shape, ident.skin, pose)
    if not posed.dorsal:
        for dg in digits:
            _draw_nail(draw, f, dg, ident, under=True)
    for dg in [digits[0], *digits[:0:-1]]:
        draw.polygon(f(dg.outline()), fill=ident.skin, outline=outline, width=f.px(0.01))
    draw.polygon(f(posed.palm), fill=ident.skin)
    if posed.dorsal:
        _draw_dorsal_details(draw, f, ident, shape, digits)
    else:
        _draw_palmar_details(draw, f, ident, shape, digits)
    _draw_marks(draw, f, ident, shape, digits, aspect)
    if accessory:
        _draw_accessory(draw, f, shape, digits, rng)


def _draw_shadow(canvas: Image.Image, posed: _Posed, bg: Colour, small: tuple[int, int],
                 rng: np.random.Generator) -> None:
    """A soft shadow of the hand on the background, offset down and sideways."""
    ratio = small[0] / canvas.size[0]
    mask = Image.new("L", small, 0)
    mdraw = ImageDraw.Draw(mask)
    shift = np.array([rng.uniform(-0.06, 0.06), rng.uniform(-0.08, -0.01)])
    for poly in posed.silhouette():
        mdraw.polygon([(x * ratio, y * ratio) for x, y in posed.frame(poly + shift)], fill=200)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1.0, small[0] / 90)))
    if mask.size != canvas.size:
        mask = mask.resize(canvas.size, Image.BILINEAR)
    canvas.paste(_scale(bg, rng.uniform(0.7, 0.86)), (0, 0), mask)


def _background(rng: np.random.Generator) -> Colour:
    hue = rng.uniform(80, 255, size=3)
    return _mix((255, 255, 255), hue, rng.uniform(0.0, 0.4))


def _apply_camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Lighting gradient, brightness, colour cast, gamma, sensor noise and blur."""
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * np.float32(math.sin(phi))
            + np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * np.float32(math.cos(phi)))
    light = 1.0 + np.float32(rng.uniform(0.0, 0.55)) * ramp
    gains = (np.exp(rng.normal(0, 0.05, size=3)) * rng.uniform(0.8, 1.1)).astype(np.float32)
    arr *= light[..., None]
    arr *= gains
    np.clip(arr, 0, 255, out=arr)
    gamma = math.exp(rng.uniform(-0.3, 0.3))
    lut = ((np.arange(256, dtype=np.float32) / 255) ** gamma * 255).astype(np.float32)
    arr = lut[arr.astype(np.uint8)]
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(0, 5))
    arr += 0.5
    np.clip(arr, 0, 255, out=arr)
    out = Image.fromarray(arr.astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * max(1, w / 320)))
    return out


def render_image(ident: Identity, aspect: str, size: tuple[int, int], rng: np.random.Generator,
                 accessory: bool = False) -> Image.Image:
    """One photograph of ``ident``'s hand from ``aspect``, with fresh nuisance variables from ``rng``."""
    w, h = size
    ss = 2 if w * h <= 800 * 600 else 1  # supersampling for smooth edges
    canvas_size = (w * ss, h * ss)
    pose = _random_pose(rng)
    bg = _background(rng)
    canvas = Image.new("RGB", canvas_size, bg)
    posed = _pose_hand(canvas_size, ident, aspect, pose)
    _draw_shadow(canvas, posed, bg, size, rng)
    _draw_hand(canvas, ident, aspect, posed, pose, accessory, rng)
    if ss > 1:
        canvas = canvas.resize(size, Image.BOX)
    return _apply_camera(canvas, rng)


def encode_jpeg(img: Image.Image, rng: np.random.Generator) -> bytes:
    """JPEG bytes at a random quality (deterministic for a given image and rng state)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)), optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------------


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


class _Renderer:
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


def _prepare_out(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty output without ``force`` (with it, only Hands/ and HandInfo.csv are replaced,
    once the new ones are complete)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise HandCLIPError(f"output {str(out_dir)!r} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise HandCLIPError(
                f"output folder {str(out_dir)!r} is not empty; choose an empty or new folder, or pass "
                "--force to replace its Hands/ and HandInfo.csv"
            )
    out_dir.mkdir(parents=True, exist_ok=True)


def default_workers() -> int:
    """Usable CPUs (at most 8)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


def generate_dataset(
    out_dir: str | Path,
    subjects: int = 40,
    images_per_aspect: int = 6,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    force: bool = False,
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
    _prepare_out(out, force)
    identities = [make_identity(seed, i, sid, images_per_aspect) for i, sid in enumerate(ids)]
    jobs = plan_images(identities, seed)

    hands_dir = out / "Hands"
    partial = out / ".Hands.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    render = _Renderer(identities, size, seed, partial)
    n_workers = default_workers() if workers is None else max(1, workers)
    try:
        _run_jobs(render, jobs, n_workers, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # Swap in the complete new set; the old one (with --force) is removed only now.
    csv_path = out / "HandInfo.csv"
    csv_tmp = out / ".HandInfo.csv.partial"
    csv_tmp.write_text(csv_text(identities, jobs), encoding="utf-8")
    old = out / ".Hands.old"
    shutil.rmtree(old, ignore_errors=True)
    if hands_dir.exists():
        hands_dir.rename(old)
    partial.rename(hands_dir)
    csv_tmp.replace(csv_path)
    shutil.rmtree(old, ignore_errors=True)
    return SynthSummary(out, csv_path, len(identities), len(jobs), sum(j.accessory for j in jobs),
                        time.perf_counter() - start)


def _run_jobs(render: _Renderer, jobs: Sequence[ImageJob], workers: int,
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
    with ProcessPoolExecutor(workers) as pool:
        try:
            for done, _ in enumerate(pool.map(render, jobs, chunksize=8), 1):
                if progress:
                    progress(done, total)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# --------------------------------------------------------------------------------------------------
# Contact sheet for the README
# --------------------------------------------------------------------------------------------------


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
