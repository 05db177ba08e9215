"""Networks of the plain CAM baseline: a ViT classifier with a 1x1-conv CAM head, and a ViT
segmentation network with a linear (1x1 conv) head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.common.training import normalize
from methods.common.vit import create_vit, patch_grid, tokens_to_map


def resize_to_patch_multiple(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Bilinear resize so both sides are multiples of the patch size (at least one patch)."""
    H, W = images.shape[-2:]
    h, w = max(patch, round(H / patch) * patch), max(patch, round(W / patch) * patch)
    if (h, w) == (H, W):
        return images
    return F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)


class ViTCamClassifier(nn.Module):
    """CAM = conv1x1(patch tokens) (Zhou et al. 2016 with the classifier as a 1x1 conv);
    logits = global average pooling of the CAM, so logits and CAM share weights exactly."""

    def __init__(self, backbone: str, img_size: int, num_classes: int, pretrained: str | None = None) -> None:
        super().__init__()
        self.encoder = create_vit(backbone, img_size, pretrained=pretrained)
        self.head = nn.Conv2d(self.encoder.embed_dim, num_classes, kernel_size=1, bias=False)

    @property
    def patch(self) -> int:
        return self.encoder.patch_embed.patch_size[0]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], sides multiples of the patch -> (B, D, h, w)."""
        tokens = self.encoder.forward_features(normalize(images))
        return tokens_to_map(tokens[:, self.encoder.num_prefix_tokens :], patch_grid(self.encoder, images))

    def forward_cam(self, images: torch.Tensor) -> torch.Tensor:
        """Raw class activation maps (B, C, h, w)."""
        return self.head(self.forward_features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image-level logits (B, C)."""
        return self.forward_cam(images).mean(dim=(2, 3))


class ViTLinearSegmenter(nn.Module):
    """Patch tokens -> 1x1 conv to C + 1 classes -> bilinear upsampling to the input size."""

    def __init__(self, backbone: str, img_size: int, num_classes: int, pretrained: str | None = None) -> None:
        super().__init__()
        self.encoder = create_vit(backbone, img_size, pretrained=pretrained)
        self.head = nn.Conv2d(self.encoder.embed_dim, num_classes + 1, kernel_size=1)

    @property
    def patch(self) -> int:
        return self.encoder.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        x = resize_to_patch_multiple(images, self.patch)
        tokens = self.encoder.forward_features(normalize(x))
        fmap = tokens_to_map(tokens[:, self.encoder.num_prefix_tokens :], patch_grid(self.encoder, x))
        return F.interpolate(self.head(fmap), size=size, mode="bilinear", align_corners=False)
