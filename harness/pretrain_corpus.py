"""The synthetic pretraining corpus: single-object classification images, generated from
options + seed, whose classes are separate from the WSSS classes of ``synthetic``.

Why: every method in the papers starts from an ImageNet backbone whose attention already groups
an object's parts. This corpus plays ImageNet's role for the tiny synthetic backbones
(``pretrained = "synthetic"``, :mod:`harness.pretrain`): many classes that are told apart by
an object's *whole shape* and its *texture*, not by position. Colours are drawn around a
per-class hue (``hue_jitter``) that many classes share: a weak cue that makes the object stand
out from the muted background early in training (the tiny transformers learn this corpus
slowly: in 150-step trials they stayed near chance with or without the cue; the cue's effect at
the full recipe was not measured), but never enough to name the class.

Classes (``num_classes`` of them, in this order):

* shape x texture: :data:`SHAPES` (triangle, square, star, crescent, slab, arc) crossed with
  :data:`TEXTURES` (stripes along the object's axis, checker, dots, mottled noise): 24 classes;
* part classes (``part_classes``): one generic mottled ellipse body shared by all of them plus
  one distinct small part (:data:`PARTS`): round knob, triangular fin, square block, ring.

None of them is a WSSS class (the WSSS data's disc / bar / cross / ring / bird / fish / boat /
car are not drawn); the drawing primitives (canvas, value noise, palettes, background, clutter,
compositing) are those of :mod:`harness.datasets.synthetic`, imported, so its generated data
is unchanged.

Determinism and balance: image ``i`` is class ``i % num_classes`` (so the counts differ by at
most one: 10 images of 4 classes are 3, 3, 2, 2) and is drawn from its own
``numpy.random.Generator`` seeded with ``(seed, i)``; it depends on nothing else. The corpus is
generated in memory (about 3 ms per 64 px image: 1792 images in 5 s) and never written to disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from harness.datasets.synthetic import (
    Canvas,
    Layer,
    composite,
    ellipse,
    fur,
    mix,
    paint_background,
    paint_clutter,
    palette,
    random_centre,
    value_noise,
    wave,
)
from methods.base import Sample

CORPUS_VERSION = 1  # bump whenever the drawing changes, so cached checkpoints are not reused

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "image_size": 64,  # px; the backbones are fine-tuned at 96 (ViT position embeddings resampled)
    "shapes": 6,  # how many of SHAPES (1..6) ...
    "textures": 4,  # ... crossed with how many of TEXTURES (1..4)
    "per_class": 64,  # images per class
    "part_classes": 4,  # how many of PARTS (0..4) add a class each
    "clutter": 3,  # at most this many small background blobs per image
    "noise": 4.0,  # sensor noise sd (grey levels)
    "hue_jitter": 0.3,  # radians around the class hue (pi: colour carries no class at all)
}

Rng = np.random.Generator


# -- shapes: (rng, canvas, u, v, radius) -> bool mask in the object's local coordinates ------


def _polygon(u: np.ndarray, v: np.ndarray, radius: float, sides: int) -> np.ndarray:
    """Regular polygon of circumradius ``radius`` centred at u = v = 0 (one vertex on +u)."""
    inside = np.ones(u.shape, dtype=bool)
    apothem = radius * math.cos(math.pi / sides)
    for k in range(sides):
        angle = math.pi / sides + 2 * math.pi * k / sides  # edge normals sit between vertices
        inside &= u * math.cos(angle) + v * math.sin(angle) <= apothem
    return inside


def shape_triangle(rng: Rng, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return _polygon(u, v, 1.15 * r, 3)


def shape_square(rng: Rng, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return _polygon(u, v, r, 4)


def shape_star(rng: Rng, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Five-pointed star: radius oscillating between 0.45 r and r with the polar angle."""
    angle = np.arctan2(v, u)
    rim = r * (0.45 + 0.55 * np.abs(np.cos(2.5 * angle)) ** 2)
    return np.hypot(u, v) <= rim


def shape_crescent(rng: Rng, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """A disc minus a shifted disc."""
    return ellipse(u, v, r, r) & ~ellipse(u - rng.uniform(0.45, 0.6) * r, v, 0.85 * r, 0.85 * r)


def shape_slab(rng: Rng, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """A long thin ellipse (aspect about 3:1)."""
    return ellipse(u, v, 1.3 * r, rng.uniform(0.35, 0.45) * r)


def shape_arc(rng: Rng, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """A thick open ring (a 'C'): an annulus with a wedge cut out on +u."""
    radius = np.hypot(u, v)
    open_side = (u > 0) & (np.abs(v) < 0.45 * u + 0.15 * r)
    return (radius <= r) & (radius >= 0.55 * r) & ~open_side


SHAPES: dict[str, Callable[[Rng, np.ndarray, np.ndarray, float], np.ndarray]] = {
    "triangle": shape_triangle, "square": shape_square, "star": shape_star,
    "crescent": shape_crescent, "slab": shape_slab, "arc": shape_arc,
}


# -- textures: (rng, canvas, u, v) -> t in [0, 1] blending the object's two colours ----------


def texture_stripes(rng: Rng, canvas: Canvas, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return wave(v, rng.uniform(3.5, 5.0) * canvas.scale, rng.uniform(0, 2 * math.pi))


def texture_checker(rng: Rng, canvas: Canvas, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    period = rng.uniform(4.0, 5.5) * canvas.scale
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def texture_dots(rng: Rng, canvas: Canvas, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    period = rng.uniform(4.5, 6.0) * canvas.scale
    du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
    return (du**2 + dv**2 <= (0.3 * period) ** 2).astype(np.float32)


def texture_mottled(rng: Rng, canvas: Canvas, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    n = canvas.size
    return np.clip(1.6 * (value_noise(rng, n, max(3, n // 5)) - 0.5) + 0.5, 0.0, 1.0)


TEXTURES: dict[str, Callable[[Rng, Canvas, np.ndarray, np.ndarray], np.ndarray]] = {
    "stripes": texture_stripes, "checker": texture_checker, "dots": texture_dots, "mottled": texture_mottled,
}

PARTS = ("knob", "fin", "block", "loop")


@dataclass(frozen=True)
class CorpusClass:
    """One corpus class: a shape with a texture, or the generic body with a part."""

    name: str
    shape: str = ""
    texture: str = ""
    part: str = ""


def corpus_classes(options: dict[str, Any]) -> list[CorpusClass]:
    """The classes of a corpus, in label order (shape x texture first, then part classes)."""
    shapes, textures = list(SHAPES)[: int(options["shapes"])], list(TEXTURES)[: int(options["textures"])]
    out = [CorpusClass(f"{s}-{t}", shape=s, texture=t) for s in shapes for t in textures]
    out += [CorpusClass(f"body-{p}", part=p) for p in PARTS[: int(options["part_classes"])]]
    return out


def resolve_options(options: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULTS` updated with ``options``. Errors: ValueError naming an unknown key or
    a value out of range."""
    merged = dict(DEFAULTS)
    for key, value in (options or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown pretraining corpus option {key!r}; known: {', '.join(DEFAULTS)}")
        merged[key] = type(DEFAULTS[key])(value)
    if not 32 <= merged["image_size"] <= 256:
        raise ValueError(f"corpus image_size must be in 32..256 px, got {merged['image_size']}")
    if (merged["per_class"] < 1 or not 0 <= merged["part_classes"] <= len(PARTS) or merged["clutter"] < 0
            or not 1 <= merged["shapes"] <= len(SHAPES) or not 1 <= merged["textures"] <= len(TEXTURES)):
        raise ValueError(f"corpus options out of range: per_class >= 1, shapes in 1..{len(SHAPES)}, textures in "
                         f"1..{len(TEXTURES)}, part_classes in 0..{len(PARTS)}, clutter >= 0 (got {merged})")
    return merged


def options_digest(options: dict[str, Any]) -> str:
    """A short stable hash of the resolved options and the corpus version."""
    text = json.dumps({"version": CORPUS_VERSION, **resolve_options(options)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _two_colours(rng: Rng, label: int, hue_jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Two saturated colours with a clear brightness gap (the texture stays visible) around
    the class's hue (golden-angle steps, so neighbouring labels differ most), jittered by up
    to ``hue_jitter`` radians. Hues repeat across the classes, so colour alone does not name
    the class, but it makes the whole object stand out from the background from the start."""
    hue = (label * 2.39996 + rng.uniform(-hue_jitter, hue_jitter)) % (2 * math.pi)
    base = np.array([math.cos(hue), math.cos(hue - 2.1), math.cos(hue + 2.1)], np.float32)
    dark = np.clip(70 + 55 * base + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
    light = np.clip(190 + 55 * np.roll(base, int(rng.integers(3))) + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
    return dark, light


def _part_mask(part: str, canvas: Canvas, u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """The small part at the body's +u end (about 10-15 % of the object)."""
    s = canvas.scale
    pu = u - 0.95 * a
    if part == "knob":
        return ellipse(pu, v, 5.0 * s, 5.0 * s)
    if part == "fin":
        depth = pu / (9.0 * s)
        return (depth >= 0) & (depth <= 1) & (np.abs(v) <= 6.5 * s * depth)
    if part == "block":
        return (np.abs(pu - 2.0 * s) <= 4.5 * s) & (np.abs(v) <= 4.5 * s)
    radius = np.hypot(pu - 3.0 * s, v)
    return (radius <= 5.5 * s) & (radius >= 2.8 * s)


def paint_object(rng: Rng, canvas: Canvas, spec: CorpusClass, label: int, hue_jitter: float) -> Layer:
    """One object of class ``spec`` at a random place, size and rotation (fully in view)."""
    s = canvas.scale
    angle = rng.uniform(0, 2 * math.pi)
    if spec.part:
        a, b = rng.uniform(18, 23) * s, rng.uniform(10, 13) * s
        cx, cy = random_centre(rng, canvas, a + 11 * s, inside=1.0)
        u, v = canvas.local(cx, cy, angle)
        body = ellipse(u, v, a, b)
        part = _part_mask(spec.part, canvas, u, v, a, b) & ~body
        dark, light = _two_colours(rng, label, hue_jitter)
        rgb = np.where(part[..., None], mix(np.ones(u.shape, np.float32), dark, light), fur(rng, canvas))
        return Layer(-1, body | part, rgb.astype(np.float32), part)
    r = rng.uniform(18, 27) * s
    cx, cy = random_centre(rng, canvas, r, inside=0.9)
    u, v = canvas.local(cx, cy, angle)
    mask = SHAPES[spec.shape](rng, u, v, r)
    dark, light = _two_colours(rng, label, hue_jitter)
    rgb = mix(TEXTURES[spec.texture](rng, canvas, u, v), light, dark)
    return Layer(-1, mask, rgb.astype(np.float32))


def generate_image(options: dict[str, Any], index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Image ``index`` of the corpus: (image (S, S, 3) uint8, object mask (S, S) bool, label).
    Depends only on (resolved options, index)."""
    classes = corpus_classes(options)
    label = index % len(classes)
    rng = np.random.default_rng([int(options["seed"]), index])
    canvas = Canvas.square(int(options["image_size"]))
    clutter = [paint_clutter(rng, canvas) for _ in range(int(rng.integers(0, int(options["clutter"]) + 1)))]
    obj = paint_object(rng, canvas, classes[label], label, float(options["hue_jitter"]))
    obj = Layer(label, obj.mask, obj.rgb, obj.part)
    image, mask, _ = composite(paint_background(rng, canvas), clutter + [obj], rng, float(options["noise"]))
    return image, mask > 0, label


class PretrainCorpus:
    """The corpus as a :class:`methods.base.SampleSource` (one-hot ``labels`` of length
    ``num_classes``; ``mask`` is the object's pixels, 1, else 0), generated once in memory."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = resolve_options(options)
        self.classes = corpus_classes(self.options)
        n = len(self.classes) * int(self.options["per_class"])
        drawn = [generate_image(self.options, i) for i in range(n)]
        self.images = np.stack([d[0] for d in drawn])  # (N, S, S, 3) uint8
        self.masks = np.stack([d[1] for d in drawn]).astype(np.uint8)  # (N, S, S) {0, 1}
        self.targets = np.array([d[2] for d in drawn], dtype=np.int64)  # (N,)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Sample:
        labels = np.zeros(self.num_classes, np.float32)
        labels[self.targets[index]] = 1.0
        return Sample(f"pretrain-{index:05d}", self.images[index], labels, self.masks[index])
