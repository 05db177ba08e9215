"""``synthetic``: a small VOC-like dataset generated from a seed, the embedded default.

Why it exists: it lets every method run end to end on a 2-core CPU in minutes with no
download, while still being *hard in the ways WSSS methods are designed for*, so plain CAM is
clearly imperfect and the methods' refinements have something to fix:

(a) **Small discriminative part.** ``bird`` and ``fish`` share one generic body (an ellipse in
    a mottled "fur" texture from the same distribution) and differ only by a small part: the
    bird's yellow head with an eye, the fish's striped pink tail fin (about 10-15 % of the
    object). The same fur body also appears alone in the background as an unlabelled
    distractor (``distractor_prob``), so the body carries no class evidence and a classifier's
    CAM covers the part, not the object.
(b) **Class-correlated context.** ``boat`` sits on a band of water and ``car`` on a band of
    road (``context_prob``); the band also appears without its class (``context_alone_prob``)
    and is always background in the ground truth. A classifier uses the band as evidence, so
    the CAM leaks into it.

The other classes (``disc``, ``bar``, ``cross``, ``ring``) have a distinct shape and texture
each. Every object is jittered in size, aspect, colour and rotation; images hold 1 to
``max_objects`` distinct classes that may occlude each other (each keeps at least 55 % of its
area visible and, for bird and fish, most of its part); the background is textured value
noise with small clutter shapes. Ground truth: 0 background, ``c + 1`` class ``c``; every
pixel is labelled (no 255 border: the synthetic GT is exact).

Generation is deterministic: sample ``i`` of a split is drawn from its own
``numpy.random.Generator`` seeded with ``(seed, split, i)``, so it does not depend on the
other samples or on ``num_train`` / ``num_val``. The result is cached under
``cache_dir/synthetic-<hash of options>/`` as PNGs plus ``index.json`` and regenerated when
anything is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from harness.datasets.base import (
    Dataset,
    Split,
    check_mask,
    labels_from_counts,
    png_bytes,
    read_image,
    read_mask,
    register_dataset,
)
from harness.errors import ConfigError, DataError
from harness.files import atomic_write_bytes
from methods.base import DatasetInfo, Sample

GENERATOR_VERSION = 1  # bump whenever the drawing changes, so old caches are not reused
SPLIT_CODES = {"train": 0, "val": 1}
REFERENCE_SIZE = 96.0  # sizes below are in pixels at this image size and scale with it
MIN_VISIBLE = 0.55  # an occluded object keeps at least this fraction of its pixels
MIN_PART_VISIBLE = 0.75  # ... and of its discriminative part
MAX_TRIES = 25  # placements tried before an object is dropped

Colour = np.ndarray  # (3,) float32 RGB in 0..255
Rng = np.random.Generator


# -- drawing primitives --------------------------------------------------------------------


@dataclass(frozen=True)
class Canvas:
    """Pixel-centre coordinates of a square image, shared by every shape of one image."""

    size: int
    ys: np.ndarray
    xs: np.ndarray

    @classmethod
    def square(cls, size: int) -> "Canvas":
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        return cls(size, ys, xs)

    @property
    def scale(self) -> float:
        return self.size / REFERENCE_SIZE

    def local(self, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates (u along the object's axis, v across it) around (cx, cy): shapes and
        textures drawn in them rotate with the object."""
        dx, dy = self.xs - cx, self.ys - cy
        cos, sin = math.cos(angle), math.sin(angle)
        return dx * cos + dy * sin, -dx * sin + dy * cos


@dataclass
class Layer:
    """One painted thing: where it is, its colours, and (bird, fish) its small part."""

    cls: int  # 0-based class index; -1 for background things
    mask: np.ndarray  # bool (H, W)
    rgb: np.ndarray  # float32 (H, W, 3), meaningful where mask
    part: np.ndarray | None = None  # bool (H, W) subset of mask


@dataclass
class Band:
    """A context band (water, road) along the bottom of the image; always GT background."""

    kind: str
    top: float  # mean y of its upper edge
    layer: Layer


def value_noise(rng: Rng, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells+1)^2 grid, bilinearly interpolated."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    pos = np.linspace(0.0, cells, size, endpoint=False, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    frac = pos - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def mix(t: np.ndarray, a: Colour, b: Colour) -> np.ndarray:
    """Per-pixel blend: colour ``a`` where t = 1, ``b`` where t = 0."""
    t = t[..., None]
    return t * a + (1.0 - t) * b


def wave(coord: np.ndarray, period: float, phase: float, sharp: float = 3.0) -> np.ndarray:
    """Stripes in [0, 1] across ``coord`` (sharpened sine)."""
    return np.clip(0.5 + sharp * 0.5 * np.sin(coord * (2 * math.pi / period) + phase), 0.0, 1.0)


def palette(rng: Rng, *bases: tuple[int, int, int], sd: float = 14.0) -> list[Colour]:
    """Jittered copies of base colours with one shared brightness factor."""
    gain = rng.uniform(0.82, 1.15)
    return [
        np.clip((np.array(base, np.float32) + rng.normal(0, sd, 3)) * gain, 0, 255).astype(np.float32)
        for base in bases
    ]


def ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def random_centre(rng: Rng, canvas: Canvas, radius: float, inside: float = 0.7) -> tuple[float, float]:
    """A centre that keeps an object of this radius inside the image (its central
    ``inside`` fraction; 1.0 = all of it)."""
    margin = min(inside * radius, canvas.size / 2 - 1)
    return rng.uniform(margin, canvas.size - margin), rng.uniform(margin, canvas.size - margin)


# -- textures ------------------------------------------------------------------------------


def fur(rng: Rng, canvas: Canvas) -> np.ndarray:
    """The generic mottled texture shared by bird bodies, fish bodies and distractors."""
    n = canvas.size
    t = 0.65 * value_noise(rng, n, max(2, n // 7)) + 0.35 * value_noise(rng, n, max(3, n // 3))
    dark, light = palette(rng, (112, 96, 78), (176, 158, 128), sd=10.0)
    return mix(t, light, dark)


def body_axes(rng: Rng, canvas: Canvas) -> tuple[float, float]:
    """Semi-axes of the shared generic body (same distribution for bird, fish, distractor)."""
    return rng.uniform(15, 21) * canvas.scale, rng.uniform(9, 12) * canvas.scale


def generic_body(
    rng: Rng, canvas: Canvas, axes: tuple[float, float], cx: float, cy: float, angle: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared ellipse body in fur: (mask, rgb, u, v) with (u, v) its local coordinates."""
    u, v = canvas.local(cx, cy, angle)
    return ellipse(u, v, *axes), fur(rng, canvas), u, v


# -- classes -------------------------------------------------------------------------------

Painter = Callable[[Rng, Canvas, "Band | None"], Layer]


def paint_bird(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """Generic body + small yellow head with a dark eye at the front end (the part)."""
    s = canvas.scale
    axes = body_axes(rng, canvas)
    a = axes[0]
    r = rng.uniform(5.0, 6.5) * s
    cx, cy = random_centre(rng, canvas, 0.88 * a + r, inside=1.0)  # the head must be in view
    angle = rng.uniform(0, 2 * math.pi)
    body, rgb, _, _ = generic_body(rng, canvas, axes, cx, cy, angle)
    hx, hy = cx + 0.88 * a * math.cos(angle), cy + 0.88 * a * math.sin(angle)
    hu, hv = canvas.local(hx, hy, angle)
    head = ellipse(hu, hv, r, r)
    eye = ellipse(hu - 0.35 * r, hv - 0.25 * r, 0.32 * r, 0.32 * r)
    yellow, black = palette(rng, (240, 205, 40), (25, 20, 15))
    rgb = np.where(head[..., None], np.where(eye[..., None], black, yellow), rgb)
    return Layer(-1, body | head, rgb, head)


def paint_fish(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """Generic body + small pink striped tail fin at the back end (the part)."""
    s = canvas.scale
    axes = body_axes(rng, canvas)
    a = axes[0]
    length, half = rng.uniform(7, 10) * s, rng.uniform(6, 8) * s
    cx, cy = random_centre(rng, canvas, 0.85 * a + length, inside=1.0)  # the tail must be in view
    angle = rng.uniform(0, 2 * math.pi)
    body, rgb, u, v = generic_body(rng, canvas, axes, cx, cy, angle)
    start = -0.85 * a
    depth = (start - u) / length  # 0 at the body, 1 at the fin's end
    tail = (depth >= 0) & (depth <= 1) & (np.abs(v) <= half * depth)
    pink, light = palette(rng, (225, 50, 150), (250, 160, 215))
    rgb = np.where(tail[..., None], mix(wave(u, 3.0 * s, 0.0), pink, light), rgb)
    return Layer(-1, body | tail, rgb, tail & ~body)


def paint_disc(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """A slightly elliptic disc with concentric blue-white rings."""
    s = canvas.scale
    r = rng.uniform(10, 17) * s
    cx, cy = random_centre(rng, canvas, r)
    u, v = canvas.local(cx, cy, rng.uniform(0, math.pi))
    aspect = rng.uniform(0.8, 1.0)
    blue, white = palette(rng, (50, 130, 215), (225, 238, 250))
    t = wave(np.hypot(u, v / aspect), rng.uniform(4.0, 6.0) * s, rng.uniform(0, 2 * math.pi))
    return Layer(-1, ellipse(u, v, r, r * aspect), mix(t, blue, white))


def paint_bar(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """A long rotated bar with red stripes running along its axis."""
    s = canvas.scale
    half_len, half_w = rng.uniform(16, 26) * s, rng.uniform(4.0, 6.0) * s
    cx, cy = random_centre(rng, canvas, half_len)
    u, v = canvas.local(cx, cy, rng.uniform(0, math.pi))
    red, salmon = palette(rng, (200, 45, 45), (250, 175, 150))
    t = wave(v, rng.uniform(3.0, 4.5) * s, rng.uniform(0, 2 * math.pi))
    return Layer(-1, (np.abs(u) <= half_len) & (np.abs(v) <= half_w), mix(t, red, salmon))


def paint_boat(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """Plank hull with a white sail; on water its hull straddles the waterline."""
    s = canvas.scale
    width, depth = rng.uniform(26, 36) * s, rng.uniform(7, 10) * s
    sail_h, sail_w = rng.uniform(14, 20) * s, rng.uniform(10, 15) * s
    cx = rng.uniform(0.4 * width, canvas.size - 0.4 * width)
    if band is not None:
        deck = band.top - rng.uniform(0.2, 0.6) * depth
    else:
        deck = rng.uniform(sail_h + 2 * s, canvas.size - depth - 2 * s)
    u, v = canvas.local(cx, deck, rng.uniform(-0.12, 0.12))
    hull = (v >= 0) & (v <= depth) & (np.abs(u) <= 0.5 * width * (1 - 0.35 * v / depth))
    mast = -0.25 * width
    sail = (v < 0) & (v >= -sail_h) & (u >= mast) & (u - mast <= sail_w * (v + sail_h) / sail_h)
    brown, tan, white = palette(rng, (105, 62, 30), (150, 100, 55), (242, 240, 232))
    rgb = np.where(sail[..., None], white, mix(wave(v, 2.5 * s, 0.0), brown, tan))
    return Layer(-1, hull | sail, rgb)


def paint_car(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """Orange body, pale cabin window, two black wheels; on a road its wheels touch it."""
    s = canvas.scale
    length, height = rng.uniform(26, 34) * s, rng.uniform(8, 11) * s
    wheel = rng.uniform(3.5, 4.5) * s
    cx = rng.uniform(0.45 * length, canvas.size - 0.45 * length)
    if band is not None:
        wheel_y = band.top + rng.uniform(0.3, 0.7) * (canvas.size - band.top)
    else:
        wheel_y = rng.uniform(2 * height, canvas.size - wheel - 2 * s)
    cy = wheel_y - 0.5 * height
    u, v = canvas.local(cx, cy, 0.0)
    body = (np.abs(u) <= 0.5 * length) & (np.abs(v) <= 0.5 * height)
    cabin = (np.abs(u + 0.05 * length) <= 0.25 * length) & (v < -0.5 * height) & (v >= -1.2 * height)
    wheels = ellipse(np.abs(u) - 0.3 * length, v - 0.5 * height, wheel, wheel)
    orange, glass, black = palette(rng, (225, 95, 30), (200, 228, 240), (20, 20, 22))
    rgb = np.where(wheels[..., None], black, np.where(cabin[..., None], glass, orange))
    return Layer(-1, body | cabin | wheels, rgb)


def paint_cross(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """A plus sign with a green checkerboard."""
    s = canvas.scale
    arm, half_w = rng.uniform(11, 16) * s, rng.uniform(3.5, 5.0) * s
    cx, cy = random_centre(rng, canvas, arm)
    u, v = canvas.local(cx, cy, rng.uniform(0, math.pi / 2))
    mask = ((np.abs(u) <= arm) & (np.abs(v) <= half_w)) | ((np.abs(v) <= arm) & (np.abs(u) <= half_w))
    period = rng.uniform(3.5, 5.0) * s
    t = (np.floor(u / period) + np.floor(v / period)) % 2
    green, dark = palette(rng, (70, 180, 80), (20, 75, 35))
    return Layer(-1, mask, mix(t, green, dark))


def paint_ring(rng: Rng, canvas: Canvas, band: Band | None) -> Layer:
    """An annulus with purple dots on lilac."""
    s = canvas.scale
    outer = rng.uniform(10, 15) * s
    cx, cy = random_centre(rng, canvas, outer)
    u, v = canvas.local(cx, cy, rng.uniform(0, math.pi))
    r = np.hypot(u, v)
    mask = (r <= outer) & (r >= outer * rng.uniform(0.45, 0.6))
    period = rng.uniform(4.0, 5.0) * s
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
    dots = (du**2 + dv**2 <= (0.3 * period) ** 2).astype(np.float32)
    purple, lilac = palette(rng, (130, 50, 175), (225, 200, 240))
    return Layer(-1, mask, mix(dots, purple, lilac))


@dataclass(frozen=True)
class ClassSpec:
    """A synthetic class: its painter, its context band (if any), whether it has a part."""

    name: str
    paint: Painter
    context: str | None = None
    has_part: bool = False


# Order matters: the first ``num_classes`` are used, and the default 5 cover both failure
# modes (bird + fish: small part; boat: context).
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("bird", paint_bird, has_part=True),
    ClassSpec("boat", paint_boat, context="water"),
    ClassSpec("disc", paint_disc),
    ClassSpec("bar", paint_bar),
    ClassSpec("fish", paint_fish, has_part=True),
    ClassSpec("car", paint_car, context="road"),
    ClassSpec("cross", paint_cross),
    ClassSpec("ring", paint_ring),
)


# -- background ----------------------------------------------------------------------------


def paint_background(rng: Rng, canvas: Canvas) -> np.ndarray:
    """Smooth two-colour value noise in muted colours, with finer grain on top."""
    n = canvas.size
    grey_a, grey_b = rng.uniform(80, 190, 2)
    a = np.clip(grey_a + rng.normal(0, 28, 3), 0, 255).astype(np.float32)
    b = np.clip(grey_b + rng.normal(0, 28, 3), 0, 255).astype(np.float32)
    rgb = mix(value_noise(rng, n, int(rng.integers(2, 6))), a, b)
    return rgb + (value_noise(rng, n, max(4, n // 4)) - 0.5)[..., None] * 30.0


def paint_band(rng: Rng, canvas: Canvas, kind: str) -> Band:
    """Water (blue ripples, wavy edge) or road (asphalt, dashed line) along the bottom."""
    s, n = canvas.scale, canvas.size
    height = rng.uniform(0.3, 0.42) * n
    top = n - height
    if kind == "water":
        edge = top + 2.0 * s * np.sin(canvas.xs * (2 * math.pi / (rng.uniform(18, 30) * s)) + rng.uniform(0, 6.3))
        ripple = wave(canvas.ys + 1.5 * s * np.sin(canvas.xs * 0.35 / s + rng.uniform(0, 6.3)), 4.0 * s, 0.0, 1.5)
        deep, light = palette(rng, (35, 85, 160), (95, 160, 215))
        rgb = mix(ripple, light, deep)
    else:
        edge = np.full_like(canvas.ys, top)
        grain = value_noise(rng, n, max(4, n // 3))
        asphalt, pale = palette(rng, (62, 62, 68), (100, 100, 106), sd=6.0)
        rgb = mix(grain, pale, asphalt)
        middle = top + 0.5 * height
        dash = (np.abs(canvas.ys - middle) <= 1.2 * s) & (np.mod(canvas.xs + rng.uniform(0, 14), 14 * s) < 8 * s)
        rgb = np.where(dash[..., None], np.float32([235, 205, 60]), rgb)
    return Band(kind, float(top), Layer(-1, canvas.ys >= edge, rgb.astype(np.float32)))


def paint_clutter(rng: Rng, canvas: Canvas) -> Layer:
    """A small muted blob (ellipse, square or triangle): visual noise with no class."""
    s = canvas.scale
    size = rng.uniform(3, 9) * s
    cx, cy = random_centre(rng, canvas, 0.0)
    u, v = canvas.local(cx, cy, rng.uniform(0, math.pi))
    shape = int(rng.integers(3))
    if shape == 0:
        mask = ellipse(u, v, size, size * rng.uniform(0.4, 1.0))
    elif shape == 1:
        mask = (np.abs(u) <= size) & (np.abs(v) <= size * rng.uniform(0.4, 1.0))
    else:
        mask = (v >= -size) & (v <= size) & (np.abs(u) <= (size - v) * 0.6)
    colour = np.clip(rng.uniform(60, 200) + rng.normal(0, 35, 3), 0, 255).astype(np.float32)
    return Layer(-1, mask, np.broadcast_to(colour, (*mask.shape, 3)))


def paint_distractor(rng: Rng, canvas: Canvas) -> Layer:
    """The generic fur body with no part: what makes the body non-discriminative."""
    axes = body_axes(rng, canvas)
    cx, cy = random_centre(rng, canvas, axes[0])
    body, rgb, _, _ = generic_body(rng, canvas, axes, cx, cy, rng.uniform(0, 2 * math.pi))
    return Layer(-1, body, rgb)


# -- scene composition ---------------------------------------------------------------------


@dataclass
class GeneratedSample:
    """One generated image with its GT and what tests and docs need to know about it."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8, 0 background, c + 1 class c
    part: np.ndarray  # (H, W) bool, visible small discriminative parts (bird head, fish tail)
    meta: dict[str, Any] = field(default_factory=dict)


def generate_sample(options: dict[str, Any], split: str, index: int) -> GeneratedSample:
    """Draw sample ``index`` of ``split``; depends only on (options, split, index)."""
    rng = np.random.default_rng([int(options["seed"]), SPLIT_CODES[split], index])
    canvas = Canvas.square(int(options["image_size"]))
    specs = CLASSES[: int(options["num_classes"])]
    chosen = choose_classes(rng, index, len(specs), int(options["max_objects"]))
    band = choose_band(rng, canvas, [specs[c] for c in chosen], specs, options)
    objects = place_objects(rng, canvas, chosen, specs, band)
    background = [paint_clutter(rng, canvas) for _ in range(int(rng.integers(2, 6)))]
    distractors = place_distractors(rng, canvas, objects, float(options["distractor_prob"]))
    layers = ([band.layer] if band else []) + background + distractors + objects
    image, mask, part = composite(paint_background(rng, canvas), layers, rng, float(options["noise"]))
    meta = {
        "context": band.kind if band else None,
        "distractors": len(distractors),
        "objects": [object_meta(layer, specs[layer.cls].name, mask, part) for layer in objects],
    }
    return GeneratedSample(image, mask, part, meta)


def object_meta(layer: Layer, name: str, mask: np.ndarray, part: np.ndarray) -> dict[str, Any]:
    """Visible pixels of an object and of its part (None for classes without one)."""
    visible = mask == layer.cls + 1
    part_pixels = int((part & visible).sum()) if layer.part is not None else None
    return {"class": name, "pixels": int(visible.sum()), "part_pixels": part_pixels}


def choose_classes(rng: Rng, index: int, num_classes: int, max_objects: int) -> list[int]:
    """1..max_objects distinct classes; the first cycles through all classes so that every
    class occurs in every split of at least ``num_classes`` images. Returned in paint order."""
    most = min(max_objects, num_classes)
    weights = np.arange(most, 0, -1, dtype=np.float64)  # fewer objects are more likely
    count = int(rng.choice(np.arange(1, most + 1), p=weights / weights.sum()))
    primary = index % num_classes
    others = [c for c in range(num_classes) if c != primary]
    chosen = [primary] + [int(c) for c in rng.choice(others, size=count - 1, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def choose_band(
    rng: Rng, canvas: Canvas, present: list[ClassSpec], specs: tuple[ClassSpec, ...], options: dict[str, Any]
) -> Band | None:
    """The context band of a present context class (with ``context_prob``), else, with
    ``context_alone_prob``, the band of any context class of the dataset (maybe absent)."""
    wanted = [spec.context for spec in present if spec.context]
    if wanted and rng.random() < float(options["context_prob"]):
        return paint_band(rng, canvas, wanted[0])
    kinds = sorted({spec.context for spec in specs if spec.context})
    if kinds and rng.random() < float(options["context_alone_prob"]):
        return paint_band(rng, canvas, kinds[int(rng.integers(len(kinds)))])
    return None


def place_objects(
    rng: Rng, canvas: Canvas, chosen: list[int], specs: tuple[ClassSpec, ...], band: Band | None
) -> list[Layer]:
    """Paint the chosen classes in order, retrying positions until no object (or part) is
    hidden too much by the ones after it; an object that never fits is dropped."""
    placed: list[Layer] = []
    min_pixels = 40 * canvas.scale**2
    for c in chosen:
        spec = specs[c]
        on = band if band is not None and band.kind == spec.context else None
        for _ in range(MAX_TRIES):
            layer = spec.paint(rng, canvas, on)
            layer.cls = c
            if layer.mask.sum() >= min_pixels and keeps_visible(placed, layer):
                placed.append(layer)
                break
    return placed


def keeps_visible(placed: list[Layer], new: Layer) -> bool:
    """Whether every placed object stays visible enough once ``new`` is painted on top."""
    cover = new.mask.copy()
    for layer in reversed(placed):
        visible = layer.mask & ~cover
        if visible.sum() < MIN_VISIBLE * layer.mask.sum():
            return False
        if layer.part is not None and (layer.part & visible).sum() < MIN_PART_VISIBLE * layer.part.sum():
            return False
        cover |= layer.mask
    return True


def place_distractors(rng: Rng, canvas: Canvas, objects: list[Layer], probability: float) -> list[Layer]:
    """At most one fur distractor, placed where it overlaps the objects little (it is painted
    under them; overlapping fur would make the object boundary invisible)."""
    if rng.random() >= probability:
        return []
    occupied = np.zeros((canvas.size, canvas.size), dtype=bool)
    for layer in objects:
        occupied |= layer.mask
    for _ in range(10):
        layer = paint_distractor(rng, canvas)
        if (layer.mask & occupied).sum() <= 0.1 * layer.mask.sum():
            return [layer]
    return []


def composite(
    background: np.ndarray, layers: list[Layer], rng: Rng, noise: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint layers in order (later on top), add sensor noise, quantise; build GT and parts."""
    rgb = background.astype(np.float32)
    size = rgb.shape[0]
    mask = np.zeros((size, size), dtype=np.uint8)
    part = np.zeros((size, size), dtype=bool)
    for layer in layers:
        rgb[layer.mask] = layer.rgb[layer.mask]
        mask[layer.mask] = layer.cls + 1  # background layers have cls -1 -> 0
        part[layer.mask] = False
        if layer.part is not None:
            part |= layer.part
    if noise > 0:
        rgb += rng.normal(0.0, noise, rgb.shape).astype(np.float32)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return image, mask, part


# -- the dataset ---------------------------------------------------------------------------


@register_dataset
class SyntheticDataset(Dataset):
    """Generated VOC-like data (see the module docstring); ``root`` is ignored."""

    name: ClassVar[str] = "synthetic"
    split_names: ClassVar[tuple[str, ...]] = ("train", "val")
    default_options: ClassVar[dict[str, Any]] = {
        "seed": 0,
        "num_classes": 5,
        "image_size": 96,
        "num_train": 160,
        "num_val": 48,
        "max_objects": 3,
        "context_prob": 0.9,  # P(band | its class present)
        "context_alone_prob": 0.25,  # P(some band | no band drawn for a present class)
        "distractor_prob": 0.6,  # P(a part-less fur body in the background)
        "noise": 5.0,  # std of Gaussian pixel noise (0..255 scale)
    }

    def _validate_options(self) -> None:
        o = self.options
        _in_range("num_classes", o["num_classes"], 1, len(CLASSES))
        _in_range("image_size", o["image_size"], 48, 1024)
        _in_range("num_train", o["num_train"], 1, 1_000_000)
        _in_range("num_val", o["num_val"], 1, 1_000_000)
        _in_range("max_objects", o["max_objects"], 1, 4)
        for key in ("context_prob", "context_alone_prob", "distractor_prob"):
            _in_range(key, o[key], 0.0, 1.0)
        _in_range("noise", o["noise"], 0.0, 100.0)

    def _build_info(self) -> DatasetInfo:
        names = tuple(spec.name for spec in CLASSES[: self.options["num_classes"]])
        return DatasetInfo(self.name, names, input_size=self.options["image_size"])

    def default_splits(self) -> dict[str, str]:
        return {"train": "train", "cam_eval": "train", "val": "val"}

    @property
    def directory(self) -> Path:
        """The cache folder of these options: ``cache_dir/synthetic-<hash>``."""
        return self.cache_dir / f"synthetic-{options_hash(self.options)}"

    def _make_split(self, name: str) -> Split:
        index = ensure_generated(self.directory, self.options)
        source = str(self.directory / "index.json")
        return Split(self.name, name, list(index["splits"][name]), self._read, source)

    def _read(self, sample_id: str) -> Sample:
        image_path = self.directory / "images" / f"{sample_id}.png"
        mask_path = self.directory / "masks" / f"{sample_id}.png"
        image = read_image(image_path)
        mask = read_mask(mask_path)
        counts = check_mask(mask, image.shape, self.info.num_classes, mask_path)
        return Sample(sample_id, image, labels_from_counts(counts, self.info.num_classes), mask)


def _in_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f'Option "{key}" of dataset "synthetic" must be in [{low}, {high}], got {value!r}.')


def options_hash(options: dict[str, Any]) -> str:
    """A short stable hash of the generator version and options (the cache key)."""
    text = json.dumps({"version": GENERATOR_VERSION, **options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_generated(directory: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The cache's index, generating the whole cache first if it is absent or incomplete.

    Generation writes to a private temporary folder that is renamed into place, so a
    concurrent reader never sees half a dataset and two concurrent generators agree.
    """
    index = _load_complete(directory)
    if index is not None:
        return index
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_dataset(tmp, options)
        if directory.exists() and _load_complete(directory) is None:
            shutil.rmtree(directory, ignore_errors=True)  # a stale, damaged cache
        try:
            os.rename(tmp, directory)
        except OSError:
            pass  # another process finished first; its copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index = _load_complete(directory)
    if index is None:
        raise DataError(f"Could not create the synthetic dataset cache at {directory}.")
    return index


def _load_complete(directory: Path) -> dict[str, Any] | None:
    """The index of a complete cache, or None when anything is missing or unreadable."""
    try:
        index = json.loads((directory / "index.json").read_text())
        ids = [i for ids in index["splits"].values() for i in ids]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for sample_id in ids:
        for folder in ("images", "masks"):
            if not (directory / folder / f"{sample_id}.png").is_file():
                return None
    return index


def write_dataset(directory: Path, options: dict[str, Any]) -> None:
    """Generate every sample of every split into ``directory`` (index.json last)."""
    (directory / "images").mkdir(parents=True)
    (directory / "masks").mkdir()
    splits: dict[str, list[str]] = {}
    samples: dict[str, Any] = {}
    for split, count in (("train", options["num_train"]), ("val", options["num_val"])):
        splits[split] = []
        for i in range(int(count)):
            sample_id = f"{split}_{i:05d}"
            generated = generate_sample(options, split, i)
            (directory / "images" / f"{sample_id}.png").write_bytes(png_bytes(generated.image))
            (directory / "masks" / f"{sample_id}.png").write_bytes(png_bytes(generated.mask))
            splits[split].append(sample_id)
            samples[sample_id] = generated.meta
    names = [spec.name for spec in CLASSES[: options["num_classes"]]]
    index = {
        "version": GENERATOR_VERSION,
        "options": options,
        "class_names": names,
        "splits": splits,
        "samples": samples,
    }
    atomic_write_bytes(directory / "index.json", json.dumps(index, indent=1).encode())
