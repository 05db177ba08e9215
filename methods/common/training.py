"""Training utilities shared by the methods: seeded augmentation, batch iteration,
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

from methods.base import IGNORE_INDEX, SampleSource, to_tensor_image

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


@dataclass
class CropAugment:
    """Random rescale, crop (pad with ``fill``), horizontal flip: the common WSSS recipe.

    ``scale_range`` multiplies the image's size; ``crop`` is the square output side. Masks
    are resized with nearest neighbour and padded with 255 (ignored).
    """

    crop: int
    scale_range: tuple[float, float] = (0.7, 1.3)
    flip: bool = True

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """image (3, H, W) in [0, 1], mask (H, W) int64 or None ->
        (crop image, crop mask, valid (crop, crop) bool: pixels inside the image)."""
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand((), generator=gen).item()
        h, w = image.shape[1:]
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        if mask is not None:
            mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        ph, pw = max(0, self.crop - nh), max(0, self.crop - nw)
        valid = torch.ones(nh, nw, dtype=torch.bool)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            valid = F.pad(valid, (0, pw, 0, ph), value=False)
            if mask is not None:
                mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
        H, W = image.shape[1:]
        top = int(torch.randint(0, H - self.crop + 1, (), generator=gen))
        left = int(torch.randint(0, W - self.crop + 1, (), generator=gen))
        sl = (slice(top, top + self.crop), slice(left, left + self.crop))
        image, valid = image[:, sl[0], sl[1]], valid[sl]
        mask = mask[sl] if mask is not None else None
        if self.flip and torch.rand((), generator=gen).item() < 0.5:
            image, valid = image.flip(-1), valid.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return image, mask, valid


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, crop, crop) in [0, 1]
    labels: torch.Tensor  # (B, C) multi-hot
    masks: torch.Tensor | None  # (B, crop, crop) int64, 255 = ignore / padding
    valid: torch.Tensor  # (B, crop, crop) bool, False on padding
    indices: list[int]


def iterate_batches(
    source: SampleSource,
    batch_size: int,
    augment: CropAugment,
    gen: torch.Generator,
    with_masks: bool = False,
    drop_last: bool = True,
) -> Iterator[Batch]:
    """One epoch over ``source`` in a seeded random order, augmented."""
    order = torch.randperm(len(source), generator=gen).tolist()
    stop = len(order) - (len(order) % batch_size if drop_last and len(order) >= batch_size else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        imgs, masks, valids, labels = [], [], [], []
        for i in idx:
            sample = source[i]
            mask = torch.from_numpy(sample.mask.astype(np.int64)) if with_masks and sample.mask is not None else None
            img, mask, valid = augment(to_tensor_image(sample.image), mask, gen)
            imgs.append(img)
            masks.append(mask)
            valids.append(valid)
            labels.append(torch.from_numpy(np.asarray(sample.labels, dtype=np.float32)))
        yield Batch(
            images=torch.stack(imgs),
            labels=torch.stack(labels),
            masks=torch.stack(masks) if with_masks else None,
            valid=torch.stack(valids),
            indices=idx,
        )


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
