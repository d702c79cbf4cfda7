"""Drawing one photograph of a posed hand: silhouette, skin, details, marks, shadow, camera effects, JPEG."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from handclip.data.synthetic.geometry import (
    Array,
    Digit,
    Point,
    Pose,
    curve,
    ellipse,
    mark_centre,
    normal,
    palm_outline,
    pose_digits,
    random_pose,
)
from handclip.data.synthetic.traits import Colour, HandShape, Identity, mix, scale


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
        draw.polygon(f(sleeve), fill=pose.sleeve, outline=scale(pose.sleeve, 0.7), width=f.px(0.012))


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
        draw.polygon(f(ellipse(centre, dg.d, half_len, w * 0.36)), fill=ident.nail)
        return
    centre = dg.at(0, 1.0) - dg.d * (half_len + w * 0.1)
    draw.polygon(f(ellipse(centre, dg.d, half_len, w * 0.34)), fill=ident.nail, outline=scale(ident.skin, 0.75))
    if not ident.nail_polish:
        tip = centre + dg.d * half_len * 0.75
        draw.polygon(f(ellipse(tip, dg.d, half_len * 0.22, w * 0.3)), fill=(246, 240, 232))


def _draw_dorsal_details(draw: ImageDraw.ImageDraw, f: _Frame, ident: Identity, shape: HandShape,
                         digits: list[Digit]) -> None:
    skin = ident.skin
    wrinkle, lw = scale(skin, 0.72), f.px(0.011)
    for vx0, vx1, bend in shape.veins:
        vein = curve([(vx0 * shape.wrist_width, 0.05), ((vx0 + vx1) / 2 + bend, shape.palm_height * 0.5),
                       (vx1, shape.palm_height * 0.85)])
        draw.line(f(vein), fill=mix(skin, (90, 110, 150), 0.22), width=f.px(0.02))
    for k, dg in enumerate(digits):
        if k > 0:  # knuckle bump on the palm just below the finger base
            bump = ellipse(dg.at(0, 0.1), dg.d, dg.width * 0.22, dg.width * 0.3)
            draw.polygon(f(bump), fill=scale(skin, 1.07))
        joints = ((0.55, 3),) if k == 0 else ((0.5, 3), (0.78, 1))
        for v, lines in joints:
            for j in range(lines):
                c = dg.at(0, v + 0.025 * j)
                arc = [c - normal(dg.d) * dg.width * 0.28, c + dg.d * 0.018, c + normal(dg.d) * dg.width * 0.28]
                draw.line(f(curve(arc, 6)), fill=wrinkle, width=lw)
        _draw_nail(draw, f, dg, ident, under=False)


def _draw_palmar_details(draw: ImageDraw.ImageDraw, f: _Frame, ident: Identity, shape: HandShape,
                         digits: list[Digit]) -> None:
    light = mix(ident.skin, (250, 200, 185), 0.12)
    crease, lw = scale(ident.skin, 0.66), f.px(0.014)
    h, c = shape.palm_height, shape.creases
    draw.polygon(f(ellipse(np.array([0.05, h * 0.5]), np.array([0.0, 1.0]), h * 0.38, 0.36, 24)), fill=light)
    for dg in digits:
        for v in ((0.42,) if dg is digits[0] else (0.32, 0.62)):
            draw.line(f(np.array([dg.at(-0.42, v), dg.at(0.42, v)])), fill=crease, width=lw)
    lines = (
        [(0.5, h * (0.8 + c[0])), (0.1, h * (0.72 + c[1])), (-0.22, h * (0.9 + c[2]))],  # heart
        [(-0.5, h * (0.66 + c[3])), (-0.05, h * (0.55 + c[4])), (0.36, h * (0.5 + c[5]))],  # head
        [(-0.47, h * (0.68 + c[3])), (-0.18 + c[6], h * 0.35), (-0.1 + c[7], h * 0.03)],  # life
    )
    for pts in lines:
        draw.line(f(curve(pts, 14)), fill=crease, width=lw)


def _draw_marks(draw: ImageDraw.ImageDraw, f: _Frame, ident: Identity, shape: HandShape, digits: list[Digit],
                aspect: str) -> None:
    for mark in ident.marks[aspect]:
        centre = mark_centre(shape, digits, mark)
        colour = scale(mix(ident.skin, (110, 70, 45), 0.4), mark.darkness) if mark.kind == "mole" else (
            scale(ident.skin, mark.darkness))
        squash = 0.7 if mark.kind == "patch" else 0.9
        draw.polygon(f(ellipse(centre, np.array([0.6, 0.8]), mark.radius, mark.radius * squash, 16)), fill=colour)


def _draw_accessory(draw: ImageDraw.ImageDraw, f: _Frame, shape: HandShape, digits: list[Digit],
                    rng: np.random.Generator) -> None:
    metal = (212, 175, 55) if rng.random() < 0.5 else (196, 198, 206)
    if rng.random() < 0.6:  # a ring on the ring (or middle) finger
        dg = digits[3 if rng.random() < 0.7 else 2]
        band = np.array([dg.at(-0.56, 0.2), dg.at(0.56, 0.2), dg.at(0.56, 0.28), dg.at(-0.56, 0.28)])
        draw.polygon(f(band), fill=metal, outline=scale(metal, 0.6), width=f.px(0.008))
    else:  # a bracelet at the wrist
        ww = shape.wrist_width * 0.58
        band = np.array([(-ww, -0.05), (ww, -0.05), (ww * 1.02, -0.17), (-ww * 1.02, -0.17)])
        draw.polygon(f(band), fill=metal, outline=scale(metal, 0.6), width=f.px(0.01))


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
    return _Posed(frame, shape, pose_digits(shape, pose), palm_outline(shape), dorsal)


def _draw_hand(canvas: Image.Image, ident: Identity, aspect: str, posed: _Posed, pose: Pose, accessory: bool,
               rng: np.random.Generator) -> None:
    """Draw the posed hand (arm, digits, palm, details, marks, accessory) on ``canvas``."""
    f, shape, digits = posed.frame, posed.shape, posed.digits
    draw = ImageDraw.Draw(canvas)
    outline = scale(ident.skin, 0.62)
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
    canvas.paste(scale(bg, rng.uniform(0.7, 0.86)), (0, 0), mask)


def _background(rng: np.random.Generator) -> Colour:
    hue = rng.uniform(80, 255, size=3)
    return mix((255, 255, 255), hue, rng.uniform(0.0, 0.4))


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
    pose = random_pose(rng)
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
