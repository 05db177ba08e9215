"""Displacement-field losses (IRN, Sec. 3.3).

The displacement branch predicts ``D`` (2, h, w): for every pixel, the vector (in stride-4 grid
pixels, order (dy, dx)) from the pixel to the centroid of its instance, so that
``x + D(x)`` is the same point for all pixels of an instance. For a pair of pixels of one
instance this gives ``D(x_j) - D(x_i) = x_i - x_j``. IRN supervises the pair difference
``delta(i, j) = D(x_j) - D(x_i)`` with ``delta_hat(i, j) = x_i - x_j`` on the same-class
foreground pairs (a proxy for "same instance": pairs are local, radius 10) and with 0 on the
background pairs (paper, Eqs. 4-5), L1 norm of the 2-vector:

    L_D_fg = mean_{P+_fg} || delta(i, j) - delta_hat(i, j) ||_1
    L_D_bg = mean_{P+_bg} || delta(i, j) ||_1

The total training loss is ``L = L_B + L_D_fg + L_D_bg`` (paper, Eq. 6; equal weights).
"""

from __future__ import annotations

import torch

from methods.common.irn.labels import shift


def pair_differences(disp: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """``delta(i, j) = D(x_j) - D(x_i)`` with ``j = i + offset_k``.

    ``disp`` (B, 2, h, w) -> (B, K, 2, h, w); pairs leaving the grid hold garbage (mask them)."""
    return torch.stack([shift(disp, dy, dx) - disp for dy, dx in offsets], 1)


def displacement_losses(
    disp: torch.Tensor, offsets: list[tuple[int, int]], pos_fg: torch.Tensor, pos_bg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_D_fg, L_D_bg)`` of the module docstring. ``disp`` (B, 2, h, w) in grid pixels; the
    sets (B, K, h, w) bool from :func:`methods.common.irn.labels.pair_sets`. 0-d tensors; an
    empty set gives 0."""
    delta = pair_differences(disp, offsets)  # (B, K, 2, h, w)
    target = -torch.tensor(offsets, dtype=disp.dtype, device=disp.device)  # x_i - x_j = -offset
    fg_err = (delta - target[None, :, :, None, None]).abs().sum(2)
    bg_err = delta.abs().sum(2)
    fg = (fg_err * pos_fg).sum() / pos_fg.sum().clamp(min=1)
    bg = (bg_err * pos_bg).sum() / pos_bg.sum().clamp(min=1)
    return fg, bg
