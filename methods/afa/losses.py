"""AFA's losses (paper Eqs. 5, 11, 12; METHODS.md "Affinity loss", "Seg loss", "L_reg")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import IGNORE_INDEX


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 11: multi-label soft-margin loss, mean over the C classes and the batch."""
    return F.multilabel_soft_margin_loss(logits, labels)


def affinity_loss(affinity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5 as in the code (L1-style on the sigmoid affinity, not BCE):

        0.5 * sum_{pos} (1 - a) / (n_pos + 1) + 0.5 * sum_{neg} a / (n_neg + 1)

    affinity (B, N, N) in [0, 1]; target (B, N, N) in {0, 1, 255} (255 ignored).
    (The paper's Eq. 5 has the two terms' roles written the other way round and plain
    1/N normalisers; the code's version is the one that trains.)"""
    pos = (target == 1).to(affinity.dtype)
    neg = (target == 0).to(affinity.dtype)
    pos_loss = (pos * (1.0 - affinity)).sum() / (pos.sum() + 1.0)
    neg_loss = (neg * affinity).sum() / (neg.sum() + 1.0)
    return 0.5 * pos_loss + 0.5 * neg_loss


def balanced_seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """METHODS.md seg loss: ``0.5 * (CE over background pixels + CE over foreground pixels)``,
    each a mean over its own pixels (255 ignored). logits (B, K, H, W), target (B, H, W).
    A part with no pixels contributes 0 (the code's mean over an empty set would be NaN)."""
    ce = F.cross_entropy(logits, target.clamp(max=logits.shape[1] - 1), reduction="none")
    valid = target != IGNORE_INDEX
    bg = (valid & (target == 0)).to(ce.dtype)
    fg = (valid & (target > 0)).to(ce.dtype)
    bg_loss = (ce * bg).sum() / bg.sum().clamp(min=1.0)
    fg_loss = (ce * fg).sum() / fg.sum().clamp(min=1.0)
    return 0.5 * (bg_loss + fg_loss)


# The authors' DenseEnergyLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5):
# the raw energy is multiplied by 1e-7 inside the loss, then by lambda_3 = 0.01 in Eq. 12.
LREG_ENERGY_SCALE = 1e-7
LREG_GRID_SCALE = 0.5  # the authors evaluate the energy at half the crop's resolution


def bilateral_kernel(image: torch.Tensor, sigma_rgb: float, sigma_xy: float, pixel_size: tuple[float, float]) -> torch.Tensor:
    """Dense Gaussian kernel of Tang et al.'s CRF loss on one image (3, h, w) in [0, 255]:
    ``W_ij = exp(-|p_i - p_j|^2 / (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_rgb^2))`` with
    positions in crop pixels (``pixel_size`` = (dy, dx) crop pixels per grid pixel).
    Returns (N, N), N = h*w, diagonal included (``W_ii = 1``: the authors' permutohedral
    filter also returns each pixel's own contribution)."""
    _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=image.dtype),
        torch.arange(w, device=image.device, dtype=image.dtype),
        indexing="ij",
    )
    feats = torch.cat(
        [
            torch.stack([ys * (pixel_size[0] / sigma_xy), xs * (pixel_size[1] / sigma_xy)]).flatten(1),
            image.flatten(1) / sigma_rgb,
        ]
    ).t()  # (N, 5): scaled so the exponent is -|f_i - f_j|^2 / 2
    # Exponents below -80 (weights < 2e-35, nothing next to W_ii = 1) are clamped there:
    # exp producing float32 denormals runs ~20x slower on CPU.
    return torch.cdist(feats, feats).pow_(2).mul_(-0.5).clamp_(min=-80.0).exp_()


def lreg_grid(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The grid L_reg is evaluated on: half the crop (the authors' ``scale_factor=0.5``),
    made coarser if needed so the long side is at most ``max_side`` (the dense kernel is
    (h*w)^2 floats per image). ``round`` of each side times the scale, at least 1."""
    H, W = size
    scale = min(LREG_GRID_SCALE, max_side / max(H, W))
    return max(1, round(H * scale)), max(1, round(W * scale))


def dense_energy_loss(
    images: torch.Tensor,
    probs: torch.Tensor,
    valid: torch.Tensor,
    target: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    max_side: int = 64,
) -> torch.Tensor:
    """L_reg of the paper's Eq. 12: the dense-CRF loss of Tang et al. (ECCV 2018) on the scale
    of the authors' code (their ``DenseEnergyLoss`` with weight 1e-7, sigma_rgb 15, sigma_xy
    100, at half resolution), so that ``lreg_weight = 0.01`` is the paper's lambda_3:

        L_reg = 1e-7 / B * sum_b [ - r_b^2 * sum_k sum_{i, j} G_i S_ki W_ij S_kj ]

    * i, j: pixels of the grid (:func:`lreg_grid`: half the crop, as the authors; coarser
      only when its long side exceeds ``max_side``), pairs i = j included;
    * S (K, N): ``probs`` (softmax of the crop-sized logits) averaged onto the grid (area;
      = the authors' bilinear at exactly half size), zero outside the image box;
    * W: :func:`bilateral_kernel`, positions in crop pixels (sigma_xy 100 = the authors' 50 at
      half size), RGB in [0, 255] (sigma_rgb 15), images subsampled onto the grid (nearest,
      as the authors);
    * G_i = 1 - max_k S_ki where ``target`` (the segmentation target, nearest onto the grid)
      is a label, 1 where it is 255 (the authors' gate: confident labelled pixels drop out);
    * r_b = grid cell area in half-crop pixels (1 on the authors' grid): a coarser grid sums
      over r times fewer pixels on each side of the pair, so the sum is scaled by r^2 to stay
      on the authors' scale (exact for a piecewise-constant image and S);
    * the gradient is the authors' hand-written one, ``dL/dS_ki = -2e-7 / B * r^2 * G_i *
      (W S_k)_i`` (G held constant; Tang's ``-S^T W S`` with the constant ``sum W`` dropped,
      hence L_reg <= 0).

    Approximations and cost: the authors filter with a permutohedral lattice (approximately
    this Gaussian); here the kernel is exact and dense, an (N, N) matrix per image (N =
    grid pixels: 48 x 48 -> 21 MiB, 64 x 64 -> 64 MiB) and ~2 K N^2 MACs forward.

    images (B, 3, H, W) in [0, 1]; probs (B, K, H, W) probabilities (differentiable); valid
    (B, H, W) bool (the image box); target (B, H, W) long labels with 255 = ignored.
    Returns a scalar (<= 0)."""
    B, _, H, W = images.shape
    grid = lreg_grid((H, W), max_side)
    if tuple(probs.shape[-2:]) != (H, W):
        raise ValueError(f"dense_energy_loss: probs are {tuple(probs.shape[-2:])}, the images {(H, W)}")
    small_img = F.interpolate(images * 255.0, size=grid, mode="nearest")
    small_probs = F.interpolate(probs, size=grid, mode="area")
    small_valid = F.interpolate(valid[:, None].float(), size=grid, mode="nearest")[:, 0]
    small_target = F.interpolate(target[:, None].float(), size=grid, mode="nearest")[:, 0]
    pixel_size = (H / grid[0], W / grid[1])
    r = (pixel_size[0] / 2.0) * (pixel_size[1] / 2.0)  # grid cell area in half-crop pixels
    total = probs.new_zeros(())
    for b in range(B):
        kernel = bilateral_kernel(small_img[b], sigma_rgb, sigma_xy, pixel_size)
        s = (small_probs[b] * small_valid[b]).flatten(1)  # (K, N), zero outside the box
        with torch.no_grad():
            gate = torch.where(small_target[b] == IGNORE_INDEX, 1.0, 1.0 - small_probs[b].max(0).values).flatten()
            fixed = s @ kernel  # (K, N) = W S_k, constant for the gradient
        # value -sum G S (W S); gradient -2 G (W S): the authors' backward (G, W S constant).
        energy = 2.0 * (gate * s * fixed).sum() - (gate * s.detach() * fixed).sum()
        total = total - r * r * energy
    return total * (LREG_ENERGY_SCALE / B)
