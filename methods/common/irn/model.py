"""The inter-pixel relation network: a ResNet backbone with two branches (IRN, Sec. 3.2-3.3).

Backbone: torchvision's ResNet-50 (``arch="resnet50"``; random init unless ``pretrained`` names
a local ImageNet checkpoint with torchvision / timm key names), or ``arch="tiny"`` (a
one-basic-block-per-stage ResNet, channels 64 (stem) / 16/32/64/128, for the synthetic data). Its five
levels are the stem (conv1 + max-pool, stride 4) and layer1..layer4 (strides 4, 8, 16, 32).

* Boundary branch: each level -> 1x1 conv to ``edge_dim`` channels + GroupNorm + ReLU,
  bilinearly resized to the stride-4 grid, concatenated, 1x1 conv -> 1 channel, sigmoid:
  ``B`` (B, 1, h, w) in [0, 1].
* Displacement branch: each level -> 1x1 conv to ``disp_dim`` channels + GroupNorm + ReLU,
  resized to the stride-4 grid, concatenated, 1x1 conv + GroupNorm + ReLU, 1x1 conv -> 2:
  ``D`` (B, 2, h, w), (dy, dx) in grid pixels.

Simplifications, stated: the paper's displacement branch fuses the levels top-down and its
backbone keeps the last stage at stride 16; both branches here are the same flat
"resize and concatenate" design on the standard stride-32 ResNet (README).
``h = ceil(H / 4)``, ``w = ceil(W / 4)`` (conv1 and the max-pool each halve, rounding up).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from methods.common.deeplab import load_backbone
from methods.common.training import normalize

ARCHS = ("resnet50", "tiny")


def _backbone(arch: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The ResNet for ``arch`` and the channels of its five levels."""
    if arch == "resnet50":
        from torchvision.models import resnet50

        return resnet50(weights=None), (64, 256, 512, 1024, 2048)
    if arch == "tiny":
        from timm.models.resnet import BasicBlock, ResNet

        # timm's plain stem has 64 channels whatever stem_width says for deep stems.
        net = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], channels=(16, 32, 64, 128), num_classes=0, global_pool="")
        return net, (64, 16, 32, 64, 128)
    raise ValueError(f"IRN: unknown arch {arch!r}; known: {', '.join(ARCHS)}")


def _reduce(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), nn.GroupNorm(min(4, out_dim), out_dim), nn.ReLU(inplace=True))


class IRNet(nn.Module):
    """``forward(images)`` with images (B, 3, H, W) in [0, 1] -> ``(boundary, displacement)``:
    (B, 1, h, w) in [0, 1] and (B, 2, h, w) on the stride-4 grid."""

    def __init__(self, arch: str = "tiny", pretrained: str | None = None, edge_dim: int = 32, disp_dim: int = 64,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone, dims = _backbone(arch)
        if pretrained:
            load_backbone(self.backbone, Path(pretrained))
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        self.edge_levels = nn.ModuleList(_reduce(d, edge_dim) for d in dims)
        self.edge_out = nn.Conv2d(edge_dim * len(dims), 1, 1)
        self.disp_levels = nn.ModuleList(_reduce(d, disp_dim) for d in dims)
        self.disp_out = nn.Sequential(_reduce(disp_dim * len(dims), disp_dim), nn.Conv2d(disp_dim, 2, 1))

    def train(self, mode: bool = True) -> "IRNet":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen ImageNet statistics
        return self

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five backbone levels for images in [0, 1] (ImageNet-normalised here)."""
        b = self.backbone
        x = b.conv1(normalize(images))
        act = b.relu if hasattr(b, "relu") else b.act1  # torchvision / timm naming
        x = b.maxpool(act(b.bn1(x)))
        out = [x]
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            out.append(x)
        if self.freeze_backbone:
            out = [o.detach() for o in out]
        return out

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.levels(images)
        size = levels[0].shape[-2:]

        def fuse(reducers: nn.ModuleList) -> torch.Tensor:
            parts = [r(x) for r, x in zip(reducers, levels)]
            return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=False) if p.shape[-2:] != size else p for p in parts], 1)

        boundary = torch.sigmoid(self.edge_out(fuse(self.edge_levels)))
        displacement = self.disp_out(fuse(self.disp_levels))
        return boundary, displacement
