"""IRN inference: image + CAMs -> pseudo mask via the boundary map and the random walk.

    B = boundary branch of the image (stride-4 grid)
    M_c = CAM of each present class, resized (bilinear) to the grid
    M*_c = T^t vec(M_c * (1 - B))                        (random_walk.py)
    mask = argmax([bg, M*_1 / m, ..., M*_K / m]) at image size, m = max of all M*

Single scale, no flip (the authors also average the boundary map of the flipped image; README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.common.irn.config import IRNConfig
from methods.common.irn.model import IRNet
from methods.common.irn.random_walk import random_walk, walk_to_mask


@torch.no_grad()
def irn_masks(model: IRNet, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, config: IRNConfig) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1], cams (B, C, H, W) in [0, 1], labels (B, C) multi-hot ->
    pseudo masks (B, H, W) int64 in {0..C} (the walk leaves no pixel unsure)."""
    model.eval()
    boundary, _ = model(images)
    H, W = images.shape[-2:]
    out = []
    for b in range(images.shape[0]):
        classes = torch.nonzero(labels[b] > 0).flatten()
        seeds = F.interpolate(cams[b : b + 1, classes], size=boundary.shape[-2:], mode="bilinear", align_corners=False)[0]
        walked = random_walk(boundary[b, 0], seeds, config.walk_radius, config.beta, config.steps)
        out.append(walk_to_mask(walked, classes, (H, W), config.sem_bg_threshold))
    return torch.stack(out)
