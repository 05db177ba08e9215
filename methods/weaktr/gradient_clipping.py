"""The gradient-clipping loss of WeakTr's online retraining (paper Sec. 3.2, Eqs. 9-17;
METHODS.md Stage 2, in the authors'-code form).

Per batch: per-pixel cross-entropy L (B, H, W), 0 at ignored pixels. g = mean(L) over all
pixels. If g > tau nothing is clipped. Otherwise the batch-averaged, detached L is averaged
in S x S patches (local means lambda_i, Eq. 10); the threshold is max(lambda_i, g) (Eq. 14,
with g = lambda_global of Eq. 11 since patches are equal-sized); pixels whose loss exceeds
their patch's threshold get no gradient (Eq. 17). The clipped map is mean-reduced over all
pixels, as the code does (ignored pixels count as zeros in every mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.base import IGNORE_INDEX


def check_patch_size(height: int, width: int, patch_size: int) -> None:
    """Raise a clear error unless both sides are multiples of the clipping patch size S."""
    if patch_size <= 0 or height % patch_size or width % patch_size:
        raise ValueError(
            f"gradient clipping needs the crop size to be a multiple of the clipping patch size "
            f"S={patch_size}, got a {height}x{width} crop; choose S dividing the crop "
            f"(e.g. crop 480 with S 120, crop 96 with S 48 or 24)"
        )


def clip_thresholds(loss_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Eqs. 10-14: (B, H, W) per-pixel loss -> (H, W) threshold ``max(local mean, global mean)``.

    The local mean of each S x S patch is taken over the batch-averaged loss (one threshold map
    shared by the batch, as the code does); the result is detached."""
    B, H, W = loss_map.shape
    check_patch_size(H, W, patch_size)
    loss = loss_map.detach().float()
    global_mean = loss.mean()
    local = F.avg_pool2d(loss.mean(dim=0, keepdim=True)[None], kernel_size=patch_size)[0, 0]  # (H/S, W/S)
    local = torch.maximum(local, global_mean)
    return local.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)


@dataclass
class ClippedLoss:
    """The loss to back-propagate and what happened (for logging)."""

    loss: torch.Tensor  # scalar
    global_mean: float  # g, the un-clipped mean loss
    clipped: bool  # whether g <= tau, i.e. clipping was active
    clipped_fraction: float  # fraction of pixels that got no gradient


def clip_loss_map(loss_map: torch.Tensor, tau: float, patch_size: int) -> ClippedLoss:
    """Eq. 17 on a per-pixel loss map (B, H, W): ``mean(min(L, threshold))`` when g <= tau, else
    ``mean(L)``. Pixels with L > threshold contribute a constant (zero gradient); L equal to the
    threshold keeps its gradient (the mask of Eq. 14 is 1 for ``<=``)."""
    B, H, W = loss_map.shape
    check_patch_size(H, W, patch_size)
    global_mean = float(loss_map.detach().float().mean())
    if global_mean > tau:
        return ClippedLoss(loss_map.mean(), global_mean, False, 0.0)
    threshold = clip_thresholds(loss_map, patch_size).to(loss_map.dtype)
    # min(L, t) written so that the gradient is 1 where L <= t (ties included, Eq. 14) and 0 where L > t.
    clipped = torch.where(loss_map <= threshold, loss_map, threshold)
    fraction = float((loss_map.detach() > threshold).float().mean())
    return ClippedLoss(clipped.mean(), global_mean, True, fraction)


def gradient_clipping_loss(
    logits: torch.Tensor, target: torch.Tensor, tau: float, patch_size: int, ignore_index: int = IGNORE_INDEX
) -> ClippedLoss:
    """Eqs. 9-17: logits (B, K, H, W), target (B, H, W) int64 with ``ignore_index`` -> the
    gradient-clipped cross-entropy."""
    check_patch_size(logits.shape[-2], logits.shape[-1], patch_size)
    loss_map = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return clip_loss_map(loss_map, tau, patch_size)
