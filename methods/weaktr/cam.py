"""WeakTr CAM pieces (paper Sec. 3.1, Eqs. 1-2, 6-7, 18; METHODS.md Stage 1) and the
multi-scale + flip CAM inference.

Conventions: C classes, grid (h, w), N = h * w patches, T = C + N tokens, class tokens first.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from methods.common.training import mask_absent, minmax_per_class, resize_to


def split_attention(fused: torch.Tensor, num_classes: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused map (B, T, T) -> cross-attention (B, C, h, w) (class-token rows, patch columns)
    and patch-attention (B, N, N) (paper Sec. 3.1.2: both are slices of the same map)."""
    C = num_classes
    B = fused.shape[0]
    cross = fused[:, :C, C:].reshape(B, C, grid[0], grid[1])
    patch = fused[:, C:, C:]
    return cross, patch


def fine_cam(coarse_cam: torch.Tensor, cross_attention: torch.Tensor, patch_attention: torch.Tensor) -> torch.Tensor:
    """Eq. 6 (code form): ``fine[c, i] = sum_j PA[i, j] * (CA[c, j] * ReLU(coarse)[c, j])``.

    ``coarse_cam`` (B, C, h, w) is used through ReLU and *detached* (the code's choice, so the
    fine-CAM loss trains only the fusion); ``cross_attention`` (B, C, h, w); ``patch_attention``
    (B, N, N). Returns (B, C, h, w)."""
    B, C, h, w = coarse_cam.shape
    cams = (cross_attention * F.relu(coarse_cam.detach())).flatten(2)  # (B, C, N)
    fine = torch.einsum("bij,bcj->bci", patch_attention.to(cams.dtype), cams)
    return fine.reshape(B, C, h, w)


def gap_logits(cam: torch.Tensor) -> torch.Tensor:
    """Global average pooling (B, C, h, w) -> class logits (B, C) (coarse and fine CAM logits)."""
    return cam.mean(dim=(-2, -1))


def class_token_logits(class_tokens: torch.Tensor) -> torch.Tensor:
    """Output class tokens (B, C, D) -> logits (B, C): the mean over the embedding dim (code)."""
    return class_tokens.mean(dim=-1)


def weaktr_loss(
    cls_logits: torch.Tensor, coarse_logits: torch.Tensor, fine_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 7 with Eq. 18: ``L = L_fine + L_cls + L_coarse``, each the multilabel soft-margin
    loss against the multi-hot labels (B, C), weight 1 each. Returns (loss, parts)."""
    parts = {
        "cls": F.multilabel_soft_margin_loss(cls_logits.float(), labels),
        "coarse": F.multilabel_soft_margin_loss(coarse_logits.float(), labels),
        "fine": F.multilabel_soft_margin_loss(fine_logits.float(), labels),
    }
    total = parts["cls"] + parts["coarse"] + parts["fine"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def scaled_size(size: tuple[int, int], scale: float, multiple: int) -> tuple[int, int]:
    """``size * scale`` rounded to the nearest multiple of the patch size (at least one patch).

    The authors' code lets the patch-embedding conv drop the remainder pixels instead; resizing
    to a multiple keeps the CAM aligned with the image."""
    return tuple(max(multiple, int(round(s * scale / multiple)) * multiple) for s in size)  # type: ignore[return-value]


@torch.no_grad()
def multiscale_cams(
    cam_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    patch_size: int,
) -> torch.Tensor:
    """CAM inference (METHODS.md "CAM inference"): for every scale (and its horizontal flip),
    ``cam_fn`` maps resized images (B, 3, h', w') to a non-negative CAM (B, C, h'/p, w'/p); it is
    resized bilinearly to the image, masked by the labels and flipped back; the views are summed
    and each present class is min-max normalised. Returns (B, C, H, W) in [0, 1], zero where absent.
    """
    H, W = images.shape[-2:]
    total = None
    for scale in scales:
        resized = resize_to(images, scaled_size((H, W), scale, patch_size))
        views = [(resized, False)] + ([(resized.flip(-1), True)] if flip else [])
        for view, flipped in views:
            cam = mask_absent(resize_to(cam_fn(view).float(), (H, W)), labels)
            cam = cam.flip(-1) if flipped else cam
            total = cam if total is None else total + cam
    return mask_absent(minmax_per_class(total), labels).clamp_(0.0, 1.0)
