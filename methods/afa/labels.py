"""AFA's labels: pseudo labels from CAMs with two background thresholds, affinity labels,
random-walk propagation with the learned affinity, and the PAR-refined variants of both.

Label conventions: 0 background, ``c + 1`` foreground class ``c``, 255 ignored.

On CUDA the training step's labels make no per-image host round trips: boolean maps are
applied with ``masked_fill`` (indexing with a boolean map waits for the device to count its
True entries), and the per-image class lists and image boxes are read from one copy of the
labels / valid maps to the host per call, not from the device image by image.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from methods.afa.par import PAR, PARKernel
from methods.base import IGNORE_INDEX


def cam_label(cams: torch.Tensor, labels: torch.Tensor, bg_high: float, bg_low: float) -> torch.Tensor:
    """Eq. 4 (no refinement): ``argmax_c M + 1`` where ``max_c M > bg_high``, 0 where
    ``max_c M <= bg_low``, 255 in between. cams (B, C, H, W) in [0, 1] -> (B, H, W).
    Absent classes are masked first; ties at a threshold go to the lower label (code)."""
    value, index = (cams * (labels[:, :, None, None] > 0)).max(1)
    return (index + 1).masked_fill_(value <= bg_high, IGNORE_INDEX).masked_fill_(value <= bg_low, 0)


def combine_high_low(label_high: torch.Tensor, label_low: torch.Tensor) -> torch.Tensor:
    """The two-threshold rule on two label maps (from the high and the low background
    score): the high map's foreground is kept; background in both -> 0; background in the
    high map only (foreground for the low one) -> 255 (uncertain)."""
    background = label_high == 0
    return label_high.masked_fill(background, IGNORE_INDEX).masked_fill_(background & (label_low == 0), 0)


def valid_box(valid: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the bounding box of a (H, W) bool mask (the image part
    of an augmented crop, a rectangle); the whole map if nothing is valid."""
    rows = torch.nonzero(valid.any(1)).flatten()
    cols = torch.nonzero(valid.any(0)).flatten()
    if rows.numel() == 0:
        return 0, valid.shape[0], 0, valid.shape[1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


Box = tuple[int, int, int, int]


class RefineGuide:
    """What PAR needs per image of a batch, computed once and shared by every map refined on
    it (both background scores of a branch): the PAR kernels of the images at 1 /
    ``downscale`` (bilinear, ``align_corners=False``, as the authors' code), for two regions,
    each built on first use:

    * ``"crop"``: the whole (padded) crop, one batched kernel (the authors' CAM branch,
      ``refine_cams_with_bkg_v2``);
    * ``"box"``: the valid image box of each image, cropped first (the authors' random-walk
      branch, ``refine_cams_with_cls_label``).

    images (B, 3, H, W) in [0, 1]; valid (B, H, W) bool or None (whole image: both regions
    are the same kernels). Sizes: ``max(1, side // downscale)``."""

    def __init__(self, par: PAR, images: torch.Tensor, valid: torch.Tensor | None, downscale: int = 2) -> None:
        self.par, self.images, self.valid, self.downscale = par, images, valid, max(1, int(downscale))
        self._regions: dict[str, list[tuple[Box, PARKernel]]] = {}

    def _small(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        size = (max(1, h // self.downscale), max(1, w // self.downscale))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def region(self, name: str) -> list[tuple[Box, PARKernel]]:
        """Per image: (top, bottom, left, right) of the region in crop pixels, its kernel."""
        if name not in ("crop", "box"):
            raise ValueError(f"PAR region must be 'crop' or 'box', not {name!r}")
        if name == "box" and self.valid is None:
            name = "crop"
        if name not in self._regions:
            B, _, H, W = self.images.shape
            if name == "crop":
                batch = self.par.prepare(self._small(self.images))
                kernels = [PARKernel(batch.values[b : b + 1], batch.structure, batch.size) for b in range(B)]
                self._regions[name] = [((0, H, 0, W), k) for k in kernels]
            else:
                out = []
                valid = self.valid.cpu()  # one copy to the host, not one wait per image
                for b in range(B):
                    box = valid_box(valid[b])
                    if box == (0, H, 0, W):  # the box is the whole crop: same kernel
                        out.append(self.region("crop")[b])
                        continue
                    top, bottom, left, right = box
                    box_image = self.images[b : b + 1, :, top:bottom, left:right]
                    out.append((box, self.par.prepare(self._small(box_image))))
                self._regions[name] = out
        return self._regions[name]


def refine_guide(par: PAR, images: torch.Tensor, valid: torch.Tensor | None, downscale: int = 2) -> RefineGuide:
    """A :class:`RefineGuide` (kernels built lazily, per region)."""
    return RefineGuide(par, images, valid, downscale)


def par_refine_argmax(
    par: PAR,
    regions: Sequence[tuple[Box, PARKernel]],
    scores: Sequence[torch.Tensor],
    keys: torch.Tensor,
    softmax: bool,
    resize_first: bool,
) -> list[torch.Tensor]:
    """PAR-refined arg-max labels over the kept channels, one image at a time, in its region.

    ``scores``: maps (B, K, H, W) over [background, classes] sharing the images (e.g. one
    per background score); ``regions``: per image, its (top, bottom, left, right) and PAR
    kernel (:meth:`RefineGuide.region`); keys (B, K) bool: the channels to keep (background
    + present classes). Per image and map: cut the region, keep the channels, then

    * ``resize_first`` (the authors' CAM branch): resize to the kernel's size (bilinear,
      ``align_corners=False``), optionally softmax over the kept channels;
    * else (the authors' random-walk branch): hand the region-sized maps to PAR, which
      resizes them itself (bilinear, ``align_corners=True``, :func:`methods.afa.par.resize_masks`);

    PAR (all maps of an image in one call), resize back to the region (bilinear,
    ``align_corners=False``), argmax -> channel index. Returns one (B, H, W) label per map,
    255 outside the region."""
    B, _, H, W = scores[0].shape
    device = scores[0].device
    outs = [torch.full((B, H, W), IGNORE_INDEX, dtype=torch.long, device=device) for _ in scores]
    keys = keys.cpu()  # one copy to the host, not one wait per image
    for b, ((top, bottom, left, right), kernel) in enumerate(regions):
        kept = torch.nonzero(keys[b]).flatten().to(device)
        maps = [s[b : b + 1, kept, top:bottom, left:right] for s in scores]
        if resize_first:
            maps = [F.interpolate(m, size=kernel.size, mode="bilinear", align_corners=False) for m in maps]
        if softmax:
            maps = [m.softmax(1) for m in maps]
        refined = par.apply(kernel, torch.cat(maps, 1))
        refined = F.interpolate(refined, size=(bottom - top, right - left), mode="bilinear", align_corners=False)
        for out, part in zip(outs, refined[0].split(len(kept))):
            out[b, top:bottom, left:right] = kept[part.argmax(0)]
    return outs


def with_background(cams: torch.Tensor, labels: torch.Tensor, bg_score: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cams (B, C, H, W), labels (B, C) -> (constant background plane + cams (B, 1 + C, H, W),
    keys (B, 1 + C) bool: background and the present classes)."""
    bg = torch.full_like(cams[:, :1], bg_score)
    keys = torch.cat([torch.ones_like(labels[:, :1]), labels], 1) > 0
    return torch.cat([bg, cams], 1), keys


def refined_cam_label(
    par: PAR,
    images: torch.Tensor,
    cams: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    bg_high: float,
    bg_low: float,
    downscale: int = 2,
    guide: RefineGuide | None = None,
    region: str = "crop",
) -> torch.Tensor:
    """The PAR-refined CAM pseudo label (code: ``refine_cams_with_bkg_v2``): for each of the
    two background scores, [bg plane, CAMs] resized to 1 / ``downscale``, softmax over the
    kept channels (bg + present classes), PAR, resized back, argmax; combined with
    :func:`combine_high_low`; then 255 outside the valid box. cams (B, C, H, W) in [0, 1].

    ``region="crop"`` (authors): PAR runs on the whole (padded) crop, so a class whose CAM
    lies outside the box can spread into it before the box is cut out; ``"box"``: on the
    valid box only (this implementation's earlier behaviour, kept as an option). ``guide``
    (from :func:`refine_guide`) is built here when not given."""
    guide = guide or refine_guide(par, images, valid, downscale)
    high, keys = with_background(cams, labels, bg_high)
    low, _ = with_background(cams, labels, bg_low)
    label_high, label_low = par_refine_argmax(par, guide.region(region), [high, low], keys, softmax=True, resize_first=True)
    label = combine_high_low(label_high, label_low)
    if valid is not None:
        label.masked_fill_(~valid, IGNORE_INDEX)
    return label


def radius_mask(h: int, w: int, radius: int, device: torch.device | None = None) -> torch.Tensor:
    """(N, N) bool, N = h*w: True where the two tokens are within Chebyshev distance
    ``radius`` (the square local window of the affinity loss and the random walk)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return (dy <= radius) & (dx <= radius)


def affinity_label(label: torch.Tensor, grid: tuple[int, int], radius: int) -> torch.Tensor:
    """Pseudo affinity label Y_aff (Sec. 3.3): label (B, H, W) -> nearest-downsampled to
    ``grid`` (h, w) -> (B, N, N) long: 1 if the two tokens share a label (background pairs
    included), 0 if they differ, 255 if either token is 255 or the pair lies outside the
    square window of ``radius``."""
    small = F.interpolate(label[:, None].float(), size=grid, mode="nearest")[:, 0].long().flatten(1)
    same = (small[:, :, None] == small[:, None, :]).long()
    ignored = (small == IGNORE_INDEX)
    ignored = ignored[:, :, None] | ignored[:, None, :] | ~radius_mask(*grid, radius, label.device)[None]
    return same.masked_fill(ignored, IGNORE_INDEX)


def transition_matrix(affinity: torch.Tensor, mask: torch.Tensor, alpha: float = 2.0, eps: float = 0.1) -> torch.Tensor:
    """Eq. 6 as in the code: ``A' = (A * mask)^alpha``, normalised per column,
    ``T = A' / (sum_i A'_ij + eps)``. affinity (B, N, N) in [0, 1], mask (N, N) bool.
    (The paper writes a row normalisation D^-1 A^alpha; the predicted affinity is symmetric,
    and the code divides by the column sums with a +0.1 damping.)"""
    a = affinity.masked_fill(~mask[None], 0.0).pow(alpha)
    return a / (a.sum(dim=1, keepdim=True) + eps)


def random_walk(
    cams: torch.Tensor, affinity: torch.Tensor, labels: torch.Tensor, bg_score: float, mask: torch.Tensor,
    alpha: float = 2.0, eps: float = 0.1,
) -> torch.Tensor:
    """Eq. 7, one propagation step (code: ``propagte_aff_cam_with_bkg``).

    cams (B, C, h, w) on the affinity grid, affinity (B, N, N), labels (B, C). The CAMs get
    a constant background plane ``bg_score``, a softmax over [bg, present classes] (absent
    classes are 0), and are propagated ``vec(M) @ T`` with :func:`transition_matrix`.
    Returns (B, 1 + C, h, w), zero on absent classes."""
    B, C, h, w = cams.shape
    scores, keys = with_background(cams, labels, bg_score)
    probs = scores.flatten(2).masked_fill(~keys[:, :, None], float("-inf")).softmax(1)
    walked = probs @ transition_matrix(affinity, mask, alpha, eps)
    return walked.masked_fill(~keys[:, :, None], 0.0).reshape(B, C + 1, h, w)


def random_walk_label(
    par: PAR,
    images: torch.Tensor,
    cams: torch.Tensor,
    affinity: torch.Tensor,
    grid: tuple[int, int],
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    bg_high: float,
    bg_low: float,
    radius: int,
    alpha: float = 2.0,
    eps: float = 0.1,
    downscale: int = 2,
    guide: RefineGuide | None = None,
) -> torch.Tensor:
    """The random-walk + PAR pseudo label (the segmentation target after the switch).

    cams (B, C, H, W) in [0, 1] at image size; affinity (B, N, N) on ``grid``. For each
    background score (high, low): resize the CAMs to the grid (bilinear,
    ``align_corners=False``), :func:`random_walk`, resize back to the crop (same rule), then
    per image on its valid box (code: ``refine_cams_with_cls_label``): PAR with the box's
    kernel at 1 / ``downscale``, the box-sized maps resized to it by PAR itself (bilinear,
    ``align_corners=True``), no softmax, back to the box (``align_corners=False``), argmax;
    combine with :func:`combine_high_low`; 255 outside the box."""
    guide = guide or refine_guide(par, images, valid, downscale)
    size = cams.shape[-2:]
    small = F.interpolate(cams, size=grid, mode="bilinear", align_corners=False)
    mask = radius_mask(*grid, radius, cams.device)
    keys = torch.cat([torch.ones_like(labels[:, :1]), labels], 1) > 0
    walked = [
        F.interpolate(random_walk(small, affinity, labels, bg, mask, alpha, eps), size=size, mode="bilinear", align_corners=False)
        for bg in (bg_high, bg_low)
    ]
    label_high, label_low = par_refine_argmax(par, guide.region("box"), walked, keys, softmax=False, resize_first=False)
    label = combine_high_low(label_high, label_low)
    if valid is not None:
        label.masked_fill_(~valid, IGNORE_INDEX)
    return label
