"""Training utilities shared by the methods: seeded augmentation (uint8 until the crop),
learning-rate schedules, normalisation and CAM post-processing helpers.

Everything here draws randomness from an explicit ``torch.Generator`` so the same trial
seed gives the same batches, bit for bit, on CPU.
"""

from __future__ import annotations

import contextlib
import functools
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
    return _interpolate_cl(_channels_last(image), size)[0].contiguous()


def _channels_last(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, 3, H, W) over (H, W, 3) memory: a view for decoded files, which are
    (H, W, 3). Its batch stride is the whole image: with a batch of 1, torch also takes the
    stride-3 batch of ``image[None].contiguous(memory_format=torch.channels_last)`` as
    channels-last, but its uint8 kernel then runs 2-3x slower (same pixels)."""
    return image.permute(1, 2, 0).contiguous()[None].permute(0, 3, 1, 2)


def _interpolate_cl(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, h, w) channels-last uint8 -> (1, 3, *size) channels-last: the kernel of
    :func:`resize_uint8` (a no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def nearest_source_index(n_in: int, n_out: int) -> np.ndarray:
    """(n_out,) int64: the input index each output index copies under torch's ``"nearest"``
    interpolation (``F.interpolate(..., mode="nearest")``, no scale factor given):
    ``min(floor(i * s), n_in - 1)`` with ``s = float32(n_in) / float32(n_out)`` and the
    product in float32, as its CPU kernel computes it (tests check equality on many sizes)."""
    scale = np.float32(n_in) / np.float32(n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)


def _bilinear_source_span(start: int, stop: int, n_in: int, n_out: int) -> tuple[int, int]:
    """``[lo, hi)``: the input indices that bilinear resizing ``n_in -> n_out``
    (align_corners=False, no antialias: two taps per output) reads for outputs
    ``start .. stop - 1``, with two spare indices each side against float rounding."""
    scale = n_in / n_out
    lo = math.floor((start + 0.5) * scale - 0.5) - 2
    hi = math.floor((stop - 0.5) * scale - 0.5) + 4  # last output's first tap, its second, two spare
    return max(0, lo), min(n_in, max(hi, lo + 1))


@functools.lru_cache(maxsize=None)
def windowed_resize_is_exact() -> bool:
    """Whether this torch's uint8 bilinear kernel is separable the way :class:`ResizedImage`
    relies on (one call gives the pixels of a horizontal-only call then a vertical-only
    call), checked once per process on a random image scaled up and down. Where it is not
    (another torch, or a CPU without the vectorised kernel), ResizedImage resizes the whole
    image instead: slower, same pixels."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 37, 53), generator=gen, dtype=torch.uint8)
    return all(
        torch.equal(resize_uint8(image, size), resize_uint8(resize_uint8(image, (37, size[1])), size))
        for size in ((71, 29), (23, 97))
    )


class ResizedImage:
    """A uint8 (3, H, W) image as if resized to ``size`` by :func:`resize_uint8` and padded
    bottom / right with 0 to at least ``crop`` x ``crop``, whose windows are computed from the
    source on demand: the same pixels, bit for bit, as slicing the resized, padded image
    (tests check equality on many sizes), for a fraction of the work at large scales.

    Why it is exact: torch's uint8 bilinear kernel is separable, a horizontal pass into a
    uint8 buffer, then a vertical pass (two calls, one per axis, give the same pixels as one;
    tested). Each row of the horizontal pass depends on that source row only, and each
    column of the vertical pass on that column only. So a window needs the horizontal pass
    over the source rows its rows read (:func:`_bilinear_source_span`), kept to its columns,
    and the vertical pass over those columns; rows outside the span are never read and stay
    0. The vertical pass still runs the whole height (its weights depend on it), but only
    ``crop`` columns wide instead of the whole resized width. Where that separability does
    not hold (:func:`windowed_resize_is_exact`), the whole image is resized and cut."""

    def __init__(self, image: torch.Tensor, size: tuple[int, int], crop: int) -> None:
        self.image, self.size = image, size
        self.shape = (max(size[0], crop), max(size[1], crop))  # the resized, padded (H', W')

    def window(self, rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The (rows, cols) window: image uint8 (3, r, c), and ``valid`` bool (r, c), False on
        the padding."""
        H, W = self.size
        r0, r1, c0, c1 = rows.start, min(rows.stop, H), cols.start, min(cols.stop, W)
        if windowed_resize_is_exact():
            band = self._resized_part(r0, r1, c0, c1)
        else:
            band = resize_uint8(self.image, self.size)[:, r0:r1, c0:c1].contiguous()
        shape = (rows.stop - r0, cols.stop - c0)
        if band.shape[1:] == shape:
            return band, torch.ones(shape, dtype=torch.bool)
        out, valid = band.new_zeros(3, *shape), torch.zeros(shape, dtype=torch.bool)
        out[:, : r1 - r0, : c1 - c0] = band
        valid[: r1 - r0, : c1 - c0] = True
        return out, valid

    def _resized_part(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Rows r0..r1-1, columns c0..c1-1 of the resized image (all inside it), (3, r, c)."""
        (h, _), (H, W) = self.image.shape[-2:], self.size
        src = _channels_last(self.image)
        lo, hi = _bilinear_source_span(r0, r1, h, H) if H != h else (r0, r1)
        band = _interpolate_cl(src[:, :, lo:hi], (hi - lo, W))[:, :, :, c0:c1]  # horizontal pass
        if H != h:
            tall = torch.zeros(1, h, c1 - c0, 3, dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last
            tall[:, :, lo:hi] = band
            band = _interpolate_cl(tall, (H, c1 - c0))[:, :, r0:r1]  # vertical pass
        # (H, W, 3) -> (3, H, W) memory: numpy's transposing copy is about twice torch's for uint8.
        return torch.from_numpy(np.ascontiguousarray(band[0].numpy()))


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
        self._count_dtype = np.float32 if crop * crop < 2**24 else np.float64  # integer sums stay exact

    @property
    def shape(self) -> tuple[int, int]:
        """(H', W'): the resized, padded size."""
        return len(self._rows), len(self._cols)

    def window(self, rows: slice, cols: slice) -> torch.Tensor:
        """The (rows, cols) window, uint8, C-contiguous (``take`` keeps C order; ``a[r][:, c]``
        would return a column-major array)."""
        return torch.from_numpy(self._source.take(self._rows[rows], 0).take(self._cols[cols], 1))

    def class_counts(self, rows: slice, cols: slice) -> np.ndarray:
        """(255,) int64: the pixels of each class 0..254 in the (rows, cols) window (255:
        ignore and padding, not counted), the counts of ``np.bincount(window)``, without
        building the window. The index maps are non-decreasing, so the window reads one
        block of source pixels, each standing for (window rows mapped to its row) x (window
        columns mapped to its column) pixels: per class, 0/1 plane @ column multiplicities
        @ row multiplicities (sums of integers <= crop^2, exact in the float type chosen)."""
        classes, planes = self._class_planes
        r, c = self._rows[rows], self._cols[cols]
        r0, r1, c0, c1 = r[0], r[-1] + 1, c[0], c[-1] + 1
        row_mult = np.bincount(r - r0, minlength=r1 - r0).astype(self._count_dtype)
        col_mult = np.bincount(c - c0, minlength=c1 - c0).astype(self._count_dtype)
        counts = np.zeros(IGNORE_INDEX, np.int64)
        counts[classes] = (planes[:, r0:r1, c0:c1] @ col_mult) @ row_mult
        return counts

    @functools.cached_property
    def _class_planes(self) -> tuple[np.ndarray, np.ndarray]:
        """(K,) the classes present in the source (255 left out) and (K, H + 1, W + 1) their 0/1
        planes, built on the first count."""
        present = np.flatnonzero(np.bincount(self._source.ravel(), minlength=IGNORE_INDEX + 1)[:IGNORE_INDEX])
        return present, (self._source[None] == present[:, None, None].astype(np.uint8)).astype(self._count_dtype)


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
    """Random rescale, crop (pad with 0), horizontal flip: the common WSSS recipe.

    ``scale_range`` multiplies the image's size; ``crop`` is the square output side. Masks
    are resized with nearest neighbour and padded with 255 (ignored). uint8 throughout: the
    training step scales the batch to [0, 1] on its device (``Batch.images_on``; see
    ``methods/common/data.py`` for the augment contract).
    """

    crop: int
    scale_range: tuple[float, float] = (0.7, 1.3)
    flip: bool = True

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """image (3, H, W) uint8, mask (H, W) uint8 or None ->
        (crop image uint8, crop mask, valid (crop, crop) bool: pixels inside the image)."""
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand((), generator=gen).item()
        h, w = image.shape[1:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        resized = ResizedImage(image, size, self.crop)
        rows, cols = random_window(resized.shape, self.crop, gen)
        image, valid = resized.window(rows, cols)
        mask = ResizedMask(mask, size, self.crop).window(rows, cols) if mask is not None else None
        if self.flip and torch.rand((), generator=gen).item() < 0.5:
            image, valid = image.flip(-1), valid.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return image, mask, valid


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
