"""Hand geometry in hand coordinates (palm one unit wide, wrist at y = 0, fingers towards +y) and poses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from handclip.data.synthetic.traits import Colour, HandShape, Mark

Point = tuple[float, float]


Array = np.ndarray


SLEEVES: tuple[Colour, ...] = (
    (30, 40, 90), (20, 20, 20), (200, 200, 205), (120, 30, 30), (60, 110, 60), (160, 140, 110), (90, 90, 100),
)


def unit(angle_deg: float) -> Array:
    """Direction at ``angle_deg`` from +y towards +x."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a), math.cos(a)])


def normal(d: Array) -> Array:
    """``d`` turned 90 degrees clockwise (towards +x when ``d`` is +y)."""
    return np.array([d[1], -d[0]])


def capsule(base: Array, d: Array, length: float, w0: float, w1: float, n_arc: int = 10) -> Array:
    """A finger: a tapered band from ``base`` along ``d`` with a round tip."""
    n = normal(d)
    tip = base + d * (length - w1 / 2)
    arc = [tip + (n * math.cos(t) + d * math.sin(t)) * (w1 / 2) for t in np.linspace(0, math.pi, n_arc)]
    return np.array([base + n * w0 / 2, *arc, base - n * w0 / 2])


def ellipse(centre: Array, d: Array, half_len: float, half_wid: float, n: int = 18) -> Array:
    """An ellipse with its long axis along ``d``."""
    nrm = normal(d)
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return centre + np.outer(np.cos(t) * half_len, d) + np.outer(np.sin(t) * half_wid, nrm)


def curve(points: Sequence[Sequence[float]], n: int = 12) -> Array:
    """A smooth open curve: a quadratic Bezier for three control points, Chaikin-rounded otherwise."""
    pts = np.asarray(points, dtype=float)
    if len(pts) == 3:
        t = np.linspace(0, 1, n)[:, None]
        return (1 - t) ** 2 * pts[0] + 2 * (1 - t) * t * pts[1] + t**2 * pts[2]
    return chaikin(pts, 2, closed=False)


def chaikin(points: Array, iterations: int, closed: bool = True) -> Array:
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
        return self.base + self.d * (v * self.length) + normal(self.d) * (u * self.width)

    @property
    def tip_width(self) -> float:
        return self.width * 0.86

    def outline(self) -> Array:
        return capsule(self.base, self.d, self.length, self.width, self.tip_width)


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


def random_pose(rng: np.random.Generator) -> Pose:
    spread = rng.uniform(0.0, 1.0)
    step = 4 + 9 * spread
    return Pose(
        angle=float(rng.uniform(-12, 12)),
        scale=float(rng.uniform(0.9, 1.05)),
        shift=(float(rng.uniform(-0.09, 0.09)), float(rng.uniform(-0.07, 0.07))),
        finger_angles=tuple(float((i - 1.3) * step + rng.normal(0, 2.5)) for i in range(4)),
        thumb_angle=float(-rng.uniform(28, 62)),
        curl=tuple(float(rng.uniform(0.94, 1.0)) for _ in range(5)),
        sleeve=SLEEVES[int(rng.integers(len(SLEEVES)))] if rng.random() < 0.55 else None,
        sleeve_start=float(rng.uniform(-0.55, -0.2)),
    )


def pose_digits(shape: HandShape, pose: Pose) -> list[Digit]:
    """Thumb then index..little, posed."""
    h = shape.palm_height
    thumb_base = np.array([-0.36, h * shape.thumb_base])
    digits = [Digit(thumb_base, unit(pose.thumb_angle), shape.lengths[0] * pose.curl[0] + 0.12, shape.widths[0])]
    for i in range(4):
        x = -0.5 + (i + 0.5) / 4
        base = np.array([x * 0.96, h - 0.1 - shape.base_drop[i]])
        length = shape.lengths[i + 1] * pose.curl[i + 1] + 0.1
        digits.append(Digit(base, unit(pose.finger_angles[i]), length, shape.widths[i + 1]))
    return digits


def palm_outline(shape: HandShape) -> Array:
    """The palm (with the thenar bulge at the thumb side and the wrist), rounded."""
    h, ww = shape.palm_height, shape.wrist_width
    ctrl = np.array([
        (-ww / 2, -0.05), (-0.5, h * 0.2), (-0.56, h * shape.thumb_base + 0.05), (-0.5, h * 0.7),
        (-0.48, h - 0.02), (-0.2, h), (0.2, h), (0.48, h - 0.1 - shape.base_drop[3] / 2),
        (0.5, h * 0.55), (0.45, h * 0.2), (ww / 2, -0.05),
    ])
    return chaikin(ctrl, 3)


def palm_point(shape: HandShape, u: float, v: float) -> Array:
    return np.array([u * (shape.wrist_width + (1 - shape.wrist_width) * min(1.0, 2 * v)), v * shape.palm_height])


def mark_centre(shape: HandShape, digits: list[Digit], mark: Mark) -> Array:
    if mark.part < 0:
        return palm_point(shape, mark.u, mark.v)
    return digits[mark.part].at(mark.u * 0.6, 0.15 + mark.v * 0.6)
