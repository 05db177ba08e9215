"""Training augmentations of the two WeakTr stages, seeded from the stage's torch generator
(same seed -> same crops). Both are drop-in ``augment`` callables for
``methods.common.training.iterate_batches``: ``(image (3, H, W) in [0, 1], mask | None, gen)
-> (image, mask, valid)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import IGNORE_INDEX, to_uint8_image
from methods.common.training import IMAGENET_MEAN, IMAGENET_STD, CropAugment


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _coin(gen: torch.Generator, p: float = 0.5) -> bool:
    return float(torch.rand((), generator=gen)) < p


def photometric_distortion(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """mmseg-style PhotoMetricDistortion on (3, H, W) in [0, 1]: random brightness (+-32/255),
    contrast (x 0.5-1.5, before or after saturation) and saturation (x 0.5-1.5, as a blend with
    the grey image), each with probability 0.5. The hue jitter of mmseg is left out."""
    if _coin(gen):
        image = image + _uniform(gen, -32 / 255, 32 / 255)
    contrast_first = _coin(gen)
    alpha_c = _uniform(gen, 0.5, 1.5) if _coin(gen) else None
    if contrast_first and alpha_c is not None:
        image = image * alpha_c
    if _coin(gen):
        grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        image = grey + _uniform(gen, 0.5, 1.5) * (image - grey)
    if not contrast_first and alpha_c is not None:
        image = image * alpha_c
    return image.clamp(0.0, 1.0)


def _dominant_ratio(mask: torch.Tensor) -> tuple[float, int]:
    """(largest class share, number of classes) over the non-ignored pixels of a crop."""
    counts = torch.bincount(mask[mask != IGNORE_INDEX].flatten())
    counts = counts[counts > 0]
    if counts.numel() == 0:
        return 1.0, 0
    return float(counts.max()) / float(counts.sum()), int(counts.numel())


@dataclass
class SegAugment:
    """Retraining augmentation (METHODS.md Stage 2 recipe): resize so the short side is
    ``base_size`` (0 keeps the native size), random rescale by ``scale_range``, random crop
    (pad 255) retried up to 10 times while one class covers more than ``cat_max_ratio`` of it,
    horizontal flip, photometric distortion. A retry also redraws the scale (mmseg keeps it)."""

    crop: int
    base_size: int = 0
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    _crop: CropAugment = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._crop = CropAugment(self.crop, tuple(self.scale_range))

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if self.base_size:
            h, w = image.shape[-2:]
            s = self.base_size / min(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            if mask is not None:
                mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        for _ in range(10):
            out_img, out_mask, valid = self._crop(image, mask, gen)
            if out_mask is None or self.cat_max_ratio >= 1.0:
                break
            ratio, n = _dominant_ratio(out_mask)
            if n > 1 and ratio < self.cat_max_ratio:
                break
        if self.photometric:
            out_img = photometric_distortion(out_img, gen)
        return out_img, out_mask, valid


@dataclass
class TimmCamAugment:
    """The CAM stage's DeiT recipe (METHODS.md): timm RandomResizedCrop + flip + RandAugment
    ``rand-m9-mstd0.5-inc1`` + RandomErasing 0.25 (pixel mode), bicubic. Returns images already
    ImageNet-normalised (erasing happens in normalised space, as in timm).

    timm and torchvision draw from Python's ``random`` and torch's global RNG, so each sample
    seeds both from ``gen`` inside a saved/restored state: deterministic, no global side effect."""

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

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        from PIL import Image

        seed = int(torch.randint(0, 2**62, (), generator=gen))
        pil = Image.fromarray(np.ascontiguousarray(to_uint8_image(image)))
        state = random.getstate()
        try:
            random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = self._tf(pil)
        finally:
            random.setstate(state)
        return out, None, torch.ones(self.crop, self.crop, dtype=torch.bool)
