"""Training augmentations of the two WeakTr stages, seeded from the sample's torch generator
(same seed -> same crops). Both are ``augment`` callables of ``methods/common/data.py``:
``(image (3, H, W) uint8, mask | None, gen) -> (image float, mask, valid)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from methods.common.training import IMAGENET_MEAN, IMAGENET_STD, ResizedImage, ResizedMask, random_window, to_float


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _coin(gen: torch.Generator, p: float = 0.5) -> bool:
    return float(torch.rand((), generator=gen)) < p


_GREY = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def photometric_distortion(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """mmseg-style PhotoMetricDistortion on (3, H, W) in [0, 1]: random brightness (+-32/255),
    contrast (x 0.5-1.5, before or after saturation) and saturation (x 0.5-1.5, as a blend with
    the grey image), each with probability 0.5. The hue jitter of mmseg is left out.
    Works in place on ``image`` (the caller's own float copy) and returns it."""
    if _coin(gen):
        image.add_(_uniform(gen, -32 / 255, 32 / 255))
    contrast_first = _coin(gen)
    alpha_c = _uniform(gen, 0.5, 1.5) if _coin(gen) else None
    if contrast_first and alpha_c is not None:
        image.mul_(alpha_c)
    if _coin(gen):
        grey = (image * _GREY).sum(0, keepdim=True)
        saturation = _uniform(gen, 0.5, 1.5)
        image.mul_(saturation).add_(grey, alpha=1.0 - saturation)  # grey + s * (image - grey)
    if not contrast_first and alpha_c is not None:
        image.mul_(alpha_c)
    return image.clamp_(0.0, 1.0)


def _dominant_ratio(counts: np.ndarray) -> tuple[float, int]:
    """(largest class share, number of classes) of a crop's per-class pixel counts (ignore
    excluded, :meth:`ResizedMask.class_counts`)."""
    counts = counts[counts > 0]
    if counts.size == 0:
        return 1.0, 0
    return float(counts.max()) / float(counts.sum()), int(counts.size)


@dataclass
class SegAugment:
    """Retraining augmentation (METHODS.md Stage 2 recipe, the mmseg pipeline of the authors'
    config): resize so the short side is ``base_size`` (0 keeps the native size), random
    rescale by ``scale_range``, random crop (pad 255) whose window is redrawn up to 10 times
    while one class covers ``cat_max_ratio`` or more of it (the rescale is drawn once, as mmseg
    does), horizontal flip, photometric distortion. uint8 until the crop is cut."""

    crop: int
    base_size: int = 0
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        h, w = image.shape[-2:]
        base = self.base_size / min(h, w) if self.base_size else 1.0
        scale = base * _uniform(gen, *self.scale_range)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        resized_image = ResizedImage(image, size, self.crop)
        resized = ResizedMask(mask, size, self.crop) if mask is not None else None
        for _ in range(10):
            rows, cols = random_window(resized_image.shape, self.crop, gen)
            if resized is None or self.cat_max_ratio >= 1.0:
                break
            ratio, n = _dominant_ratio(resized.class_counts(rows, cols))  # counted, not cut: most windows are redrawn
            if n > 1 and ratio < self.cat_max_ratio:
                break
        out_mask = resized.window(rows, cols) if resized is not None else None
        out_img, valid = resized_image.window(rows, cols)  # only the accepted window is resized
        if _coin(gen):
            out_img, valid = out_img.flip(-1), valid.flip(-1)
            out_mask = out_mask.flip(-1) if out_mask is not None else None
        out = to_float(out_img)
        if self.photometric:
            out = photometric_distortion(out, gen)
        return out, out_mask, valid


def posterize_any_bits(img, bits_to_keep: int, **_):
    """PIL posterize keeping ``bits_to_keep`` most significant bits, 0 included (all black).

    ``rand-m9-mstd0.5-inc1`` draws magnitude 10 in about 2 % of posterize ops, which keeps 0
    bits. The Pillow of the authors' environment posterized that to black; Pillow >= 11
    raises ValueError instead (a crash a few hundred images into a WeakTr CAM epoch). This
    restores the old result for the transform of this module only (timm is not patched)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _rand_augment_ops(transform) -> list:
    """The ``AugmentOp`` objects of the RandAugment step(s) inside a timm transform."""
    steps = getattr(transform, "transforms", [transform])
    return [op for step in steps for op in getattr(step, "ops", [])]


@dataclass
class TimmCamAugment:
    """The CAM stage's DeiT recipe (METHODS.md): timm RandomResizedCrop + flip + RandAugment
    ``rand-m9-mstd0.5-inc1`` + RandomErasing 0.25 (pixel mode), bicubic. Returns images already
    ImageNet-normalised (erasing happens in normalised space, as in timm).

    timm and torchvision draw from Python's ``random``, numpy's global RNG (RandAugment picks
    its ops with ``np.random.choice``) and torch's global RNG, so each sample seeds all three
    from ``gen`` inside a saved / restored state: the same sample gets the same ops whatever
    process, worker or resumed run draws it, with no side effect on the global streams."""

    crop: int
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    _tf: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from timm.data import create_transform

        self._tf = create_transform(
            self.crop, is_training=True, auto_augment=self.auto_augment, interpolation="bicubic",
            re_prob=self.re_prob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
        for op in _rand_augment_ops(self._tf):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        from PIL import Image

        seed = int(torch.randint(0, 2**62, (), generator=gen))
        pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding (slow per sample)
                out = self._tf(pil)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
        return out, None, torch.ones(self.crop, self.crop, dtype=torch.bool)
