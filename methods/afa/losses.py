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


def bilateral_kernel(image: torch.Tensor, sigma_rgb: float, sigma_xy: float, pixel_size: float) -> torch.Tensor:
    """Dense Gaussian kernel of Tang et al.'s CRF loss on one image (3, h, w) in [0, 255]:
    ``W_ij = exp(-|p_i - p_j|^2 / (2 sigma_xy^2) - |I_i - I_j|^2 / (2 sigma_rgb^2))`` with
    positions in original-image pixels (``pixel_size`` original pixels per grid pixel).
    Returns (N, N), N = h*w, with a zero diagonal (no self pairs)."""
    _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=image.dtype),
        torch.arange(w, device=image.device, dtype=image.dtype),
        indexing="ij",
    )
    feats = torch.cat(
        [
            torch.stack([ys, xs]).flatten(1) * (pixel_size / sigma_xy),
            image.flatten(1) / sigma_rgb,
        ]
    ).t()  # (N, 5): scaled so the exponent is -|f_i - f_j|^2 / 2
    kernel = torch.cdist(feats, feats).pow_(2).mul_(-0.5).exp_()
    return kernel.fill_diagonal_(0.0)


def dense_energy_loss(
    images: torch.Tensor,
    probs: torch.Tensor,
    valid: torch.Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    max_side: int = 64,
) -> torch.Tensor:
    """L_reg (paper Eq. 12, the dense-CRF relaxation of Tang et al., ECCV 2018):

        E(S) = sum_k sum_{i != j} W_ij S_ki (1 - S_kj)  over pixel pairs inside the image box,
        L_reg = mean over images of E(S) / sum_{i != j} W_ij

    i.e. the kernel-weighted probability that two pixels disagree, in [0, 1] (Tang's
    ``-S^T W S`` drops the constant ``sum W`` and has the same gradient). Approximation, and
    the cost of it: the authors filter with a permutohedral lattice at half resolution; here
    the kernel is exact but dense, on images, probabilities and box downsampled (bilinear /
    nearest) so the long side is at most ``max_side`` (N <= max_side^2 pixels, an (N, N)
    kernel per image: 64 -> 4096 pixels, 64 MiB, ~0.35 GMAC per image for 21 classes).
    The normalisation by the kernel mass (resolution-independent, unlike the authors' raw
    sum times a small constant) means ``lreg_weight`` is not on the authors' scale.

    images (B, 3, H, W) in [0, 1]; probs (B, K, h, w) softmax probabilities (differentiable;
    any resolution, e.g. the decoder's stride 4); valid (B, H, W) bool (the image box).
    """
    B, _, H, W = images.shape
    scale = min(1.0, max_side / max(H, W))
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    small_img = F.interpolate(images * 255.0, size=size, mode="bilinear", align_corners=False)
    small_probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    small_valid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0
    pixel_size = H / size[0]
    total = probs.new_zeros(())
    for b in range(B):
        kernel = bilateral_kernel(small_img[b], sigma_rgb, sigma_xy, pixel_size)
        roi = small_valid[b].flatten().to(kernel.dtype)
        kernel = kernel * roi[:, None] * roi[None, :]
        s = small_probs[b].flatten(1)  # (K, N)
        agree = ((s @ kernel) * s).sum()  # sum_ij W_ij sum_k S_ki S_kj
        mass = kernel.sum()
        total = total + (mass - agree) / mass.clamp(min=1e-8)
    return total / B
