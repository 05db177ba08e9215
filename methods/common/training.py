"""Training utilities shared by the methods: seeded augmentation (uint8 until the crop),
learning-rate schedules, normalisation and CAM post-processing helpers.

Everything here draws randomness from an explicit ``torch.Generator`` so the same trial
seed gives the same batches, bit for bit, on CPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global RNGs (weight init, dropout, drop-path) seeded from
    ``seed``, restoring the caller's RNG state afterwards (CUDA's too on a CUDA device)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of a uint8 (3, H, W) image to
    ``size``, staying in uint8 (torch's channels-last uint8 kernel: no float round trip)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = image[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].contiguous()


def nearest_source_index(n_in: int, n_out: int) -> np.ndarray:
    """(n_out,) int64: the input index each output index copies under torch's ``"nearest"``
    interpolation (``F.interpolate(..., mode="nearest")``, no scale factor given):
    ``min(floor(i * s), n_in - 1)`` with ``s = float32(n_in) / float32(n_out)`` and the
    product in float32, as its CPU kernel computes it (tests check equality on many sizes)."""
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)


class ResizedMask:
    """A uint8 (H, W) label mask as if nearest-resized to ``size`` (the pixels of
    ``F.interpolate(mask[None, None], size, mode="nearest")``) and padded bottom / right with
    255 to at least ``crop`` x ``crop``, whose windows are gathered from the source on demand.

    A random crop (and WeakTr's ``cat_max_ratio`` retries) reads a few crop-sized windows, so
    the whole resized mask (several times the source's pixels at large scales) is never
    built; each window is the same pixels as slicing the resized, padded mask (tests check
    equality on many sizes)."""

    def __init__(self, mask: torch.Tensor, size: tuple[int, int], crop: int) -> None:
        h, w = mask.shape
        # One extra row and column of 255 stand for the padding: padded indices point there.
        self._source = np.pad(mask.numpy(), ((0, 1), (0, 1)), constant_values=IGNORE_INDEX)
        self._rows = np.concatenate([nearest_source_index(h, size[0]), np.full(max(0, crop - size[0]), h)])
        self._cols = np.concatenate([nearest_source_index(w, size[1]), np.full(max(0, crop - size[1]), w)])

    @property
    def shape(self) -> tuple[int, int]:
        """(H', W'): the resized, padded size."""
        return len(self._rows), len(self._cols)

    def window(self, rows: slice, cols: slice) -> torch.Tensor:
        """The (rows, cols) window, uint8, C-contiguous (``take`` keeps C order; ``a[r][:, c]``
        would return a column-major array)."""
        return torch.from_numpy(self._source.take(self._rows[rows], 0).take(self._cols[cols], 1))


def pad_to(image: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (bottom / right) a uint8 (3, H, W) image with 0 to at least ``crop`` x ``crop``;
    also returns ``valid`` (H', W') bool, False on the padding (a mask pads with 255:
    :class:`ResizedMask`)."""
    h, w = image.shape[-2:]
    ph, pw = max(0, crop - h), max(0, crop - w)
    valid = torch.ones(h, w, dtype=torch.bool)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        valid = F.pad(valid, (0, pw, 0, ph), value=False)
    return image, valid


def random_window(shape: tuple[int, int], crop: int, gen: torch.Generator) -> tuple[slice, slice]:
    """A uniformly drawn ``crop`` x ``crop`` window inside an (H, W) >= crop area."""
    H, W = shape
    top = int(torch.randint(0, H - crop + 1, (), generator=gen))
    left = int(torch.randint(0, W - crop + 1, (), generator=gen))
    return slice(top, top + crop), slice(left, left + crop)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 in [0, 1]: the one conversion of the data path."""
    return image.float().div_(255.0)


@dataclass
class CropAugment:
    """Random rescale, crop (pad with ``fill``), horizontal flip: the common WSSS recipe.

    ``scale_range`` multiplies the image's size; ``crop`` is the square output side. Masks
    are resized with nearest neighbour and padded with 255 (ignored). Works on uint8 until
    the crop is cut (see ``methods/common/data.py`` for the augment contract).
    """

    crop: int
    scale_range: tuple[float, float] = (0.7, 1.3)
    flip: bool = True

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """image (3, H, W) uint8, mask (H, W) uint8 or None ->
        (crop image float in [0, 1], crop mask, valid (crop, crop) bool: pixels inside the image)."""
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand((), generator=gen).item()
        h, w = image.shape[1:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image, valid = pad_to(resize_uint8(image, size), self.crop)
        rows, cols = random_window(tuple(image.shape[1:]), self.crop, gen)
        image, valid = image[:, rows, cols], valid[rows, cols]
        mask = ResizedMask(mask, size, self.crop).window(rows, cols) if mask is not None else None
        if self.flip and torch.rand((), generator=gen).item() < 0.5:
            image, valid = image.flip(-1), valid.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return to_float(image), mask, valid


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9, min_lr: float = 0.0) -> float:
    """Polynomial decay: ``(base - min) * (1 - step/total)^power + min``."""
    frac = min(step, total) / max(1, total)
    return (base_lr - min_lr) * (1.0 - frac) ** power + min_lr


def warmup_cosine_lr(base_lr: float, step: int, total: int, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, frac)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group.get('lr_scale', 1)``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def minmax_per_class(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, C, H, W) -> each map scaled to [0, 1] by its own min and max."""
    flat = cams.flatten(2)
    lo = flat.min(-1, keepdim=True).values[..., None]
    hi = flat.max(-1, keepdim=True).values[..., None]
    return (cams - lo) / (hi - lo + eps)


def max_normalize(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, C, H, W) non-negative -> divided by each map's max (the usual CAM scaling)."""
    return cams / (cams.flatten(2).max(-1).values[..., None, None] + eps)


def mask_absent(cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Zero the maps of classes absent from ``labels`` (B, C)."""
    return cams * (labels[:, :, None, None] > 0).to(cams.dtype)


def threshold_masks(cams: torch.Tensor, labels: torch.Tensor, bg_threshold: float) -> torch.Tensor:
    """Seed masks: argmax over [constant background plane t, present-class CAMs].

    Returns (B, H, W) int64 with 0 = background, c + 1 = class c.
    """
    cams = mask_absent(cams, labels)
    bg = torch.full_like(cams[:, :1], bg_threshold)
    return torch.cat([bg, cams], dim=1).argmax(1)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) to ``size`` (align_corners=False)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
