"""Confident-region labels from CAMs, and which pixel pairs they relate (IRN, Sec. 3-4).

IRN (Ahn, Cho, Kwak, CVPR 2019) learns from the *confident* parts of the CAMs only:

    label(x) = argmax_c M_c(x) + 1   if max_c M_c(x) >= fg_threshold   (confident foreground)
               0                     if max_c M_c(x) <  bg_threshold   (confident background)
               255                   otherwise                         (ignored)

with ``M`` the present-class CAMs in [0, 1] (absent classes are zero and never win).
Constants (source: the IRN paper, Sec. 4 / implementation details, and the brief of issue 14):
``fg_threshold = 0.30``, ``bg_threshold = 0.05``. The paper also refines both confident areas
with a dense CRF; that is :func:`confident_labels_crf` (optional, ``IRNConfig.label_crf``).

Pairs (paper, Sec. 3.1): ``P = {(x_i, x_j) : ||x_i - x_j||_2 < gamma, x_i != x_j}`` on the
stride-4 feature grid, split into ``P+_fg`` (same foreground class), ``P+_bg`` (both
background) and ``P-`` (different labels); a pair with an ignored pixel is in none of them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import IGNORE_INDEX, CRFParams

FG_THRESHOLD = 0.30  # IRN paper, implementation details: confident foreground CAM score
BG_THRESHOLD = 0.05  # IRN paper, implementation details: confident background CAM score


def confident_labels(cams: torch.Tensor, fg_threshold: float = FG_THRESHOLD, bg_threshold: float = BG_THRESHOLD) -> torch.Tensor:
    """(C, H, W) CAMs in [0, 1] (zero for absent classes) -> (H, W) uint8 in {0..C, 255}.

    Raises ``ValueError`` when ``bg_threshold > fg_threshold`` (the bands would overlap)."""
    if bg_threshold > fg_threshold:
        raise ValueError(f"confident_labels: bg_threshold {bg_threshold} > fg_threshold {fg_threshold}")
    top, arg = cams.max(0) if cams.shape[0] else (torch.zeros(cams.shape[1:]), torch.zeros(cams.shape[1:], dtype=torch.long))
    out = torch.full(cams.shape[1:], IGNORE_INDEX, dtype=torch.uint8)
    out[top >= fg_threshold] = (arg[top >= fg_threshold] + 1).to(torch.uint8)
    out[top < bg_threshold] = 0
    return out


def confident_labels_crf(
    image: np.ndarray, cams: np.ndarray, fg_threshold: float = FG_THRESHOLD, bg_threshold: float = BG_THRESHOLD,
    params: CRFParams | None = None,
) -> np.ndarray:
    """As :func:`confident_labels`, each confident area refined by a dense CRF (IRN paper: "refined
    by dCRF"; how the two are combined is not spelled out there, so this is our reading).

    ``image`` (H, W, 3) uint8, ``cams`` (C, H, W) float in [0, 1]. The foreground pass takes the
    hard map ``argmax([fg_threshold, M_1..M_C])``, the background pass
    ``argmax([bg_threshold, M_1..M_C])``, each CRF-refined (label unary, ``gt_prob`` 0.7); a pixel
    is class c where the foreground pass says c, background where the background pass says
    background, else 255. Without the CRF this reduces exactly to :func:`confident_labels`.
    Returns (H, W) uint8.
    """
    from methods.common.crf import dense_crf_labels

    params = params or CRFParams()
    present = np.flatnonzero(cams.reshape(cams.shape[0], -1).max(1) > 0)
    if present.size == 0:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    classes = np.concatenate([[0], present + 1])

    def refined(threshold: float) -> np.ndarray:
        stack = np.concatenate([np.full((1,) + cams.shape[1:], threshold, np.float32), cams[present]])
        return classes[dense_crf_labels(image, stack.argmax(0), len(classes), params)]

    fg, bg = refined(fg_threshold), refined(bg_threshold)
    out = np.full(cams.shape[1:], IGNORE_INDEX, dtype=np.uint8)
    out[bg == 0] = 0
    out[fg > 0] = fg[fg > 0]
    return out


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) int64 labels -> (B, h, w) by nearest neighbour (labels cannot be averaged)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def shift(x: torch.Tensor, dy: int, dx: int, fill: float = 0) -> torch.Tensor:
    """``out[..., y, x] = x[..., y + dy, x + dx]`` on the last two dims, ``fill`` outside."""
    H, W = x.shape[-2:]
    out = torch.full_like(x, fill)
    ys, yd = slice(max(0, dy), min(H, H + dy)), slice(max(0, -dy), min(H, H - dy))
    xs, xd = slice(max(0, dx), min(W, W + dx)), slice(max(0, -dx), min(W, W - dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def pair_sets(labels: torch.Tensor, offsets: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Membership of each pair ``(x, x + offset_k)`` in P+_fg, P+_bg, P- (paper, Sec. 3.1).

    ``labels`` (B, h, w) int64 in {0..C, 255} on the feature grid. Returns three bool tensors
    (B, K, h, w); index ``[b, k, y, x]`` is the pair ``((y, x), (y + dy_k, x + dx_k))``. Pairs
    leaving the grid or touching a 255 pixel are in none of the sets."""
    sets = [], [], []
    valid_i = labels != IGNORE_INDEX
    for dy, dx in offsets:
        other = shift(labels, dy, dx, fill=IGNORE_INDEX)
        valid = valid_i & (other != IGNORE_INDEX)
        same = valid & (labels == other)
        sets[0].append(same & (labels > 0))
        sets[1].append(same & (labels == 0))
        sets[2].append(valid & (labels != other))
    return tuple(torch.stack(s, 1) for s in sets)  # type: ignore[return-value]
