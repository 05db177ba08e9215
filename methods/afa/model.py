"""AFA's network: a transformer backbone (MiT, or the common timm ViT/DeiT), the GMP
classifier whose weights give the CAM, the affinity head on the last blocks' raw attention
scores, and the SegFormer all-MLP segmentation head. One network, trained end to end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.common.mit import MIT_ARCHS, create_mit
from methods.common.vit import VIT_ARCHS, create_vit, run_blocks, tokens_to_map


@dataclass
class BackboneOutput:
    features: list[torch.Tensor]  # multi-level maps (B, C_i, h_i, w_i); the last one is the CAM level
    scores: torch.Tensor  # (B, M, N, N) attention maps of the last blocks over the last level's N tokens


class MiTBackbone(nn.Module):
    """MiT encoder; affinity source = raw q k^T of the last ``affinity_blocks`` stage-4 blocks
    (METHODS.md: 2 blocks x 8 heads = 16 maps for MiT-B1)."""

    def __init__(self, arch: str, pretrained: str | None, drop_path_rate: float, affinity_blocks: int, softmax: bool) -> None:
        super().__init__()
        self.encoder = create_mit(arch, drop_path_rate=drop_path_rate, pretrained=pretrained)
        spec = self.encoder.arch
        if affinity_blocks > spec.depths[3]:
            raise ValueError(f"{arch} has {spec.depths[3]} stage-4 blocks, fewer than affinity_blocks={affinity_blocks}")
        self.capture = [(4, spec.depths[3] - affinity_blocks + j) for j in range(affinity_blocks)]
        self.channels = list(spec.embed_dims)
        self.num_maps = affinity_blocks * spec.num_heads[3]
        self.softmax = softmax
        self.size_multiple = 1  # any input size works (padded convolutions)

    def forward(self, images: torch.Tensor, with_scores: bool = True) -> BackboneOutput:
        out = self.encoder(images, capture=self.capture if with_scores else ())
        if not with_scores:
            return BackboneOutput(out.features, images.new_zeros(0))
        scores = torch.cat([out.scores[key] for key in self.capture], dim=1)
        if self.softmax:
            head_dim = self.channels[3] // (self.num_maps // len(self.capture))
            scores = (scores * head_dim**-0.5).softmax(-1)
        return BackboneOutput(out.features, scores)


class ViTBackbone(nn.Module):
    """timm ViT/DeiT (``methods.common.vit``): one feature level (the final patch tokens), the
    affinity from the last ``affinity_blocks`` blocks' attention over patch tokens (prefix
    tokens dropped): raw q k^T scores by default, post-softmax weights with ``softmax``."""

    def __init__(self, arch: str, img_size: int, pretrained: str | None, drop_path_rate: float, affinity_blocks: int, softmax: bool) -> None:
        super().__init__()
        self.vit = create_vit(arch, img_size=img_size, drop_path_rate=drop_path_rate, pretrained=pretrained)
        depth = len(self.vit.blocks)
        if affinity_blocks > depth:
            raise ValueError(f"{arch} has {depth} blocks, fewer than affinity_blocks={affinity_blocks}")
        self.capture = list(range(depth - affinity_blocks, depth))
        self.channels = [self.vit.embed_dim]
        self.num_maps = affinity_blocks * self.vit.blocks[0].attn.num_heads
        self.softmax = softmax
        self.size_multiple = self.vit.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor, with_scores: bool = True) -> BackboneOutput:
        p = self.size_multiple
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        out = run_blocks(self.vit, images, capture=self.capture if with_scores else (), capture_scores=not self.softmax)
        prefix = self.vit.num_prefix_tokens
        features = [tokens_to_map(out.tokens[:, prefix:], grid)]
        if not with_scores:
            return BackboneOutput(features, images.new_zeros(0))
        maps = out.attentions if self.softmax else out.scores
        scores = torch.cat([maps[i][:, :, prefix:, prefix:] for i in self.capture], dim=1)
        return BackboneOutput(features, scores)


def create_backbone(arch: str, img_size: int, pretrained: str | None, drop_path_rate: float, affinity_blocks: int, softmax: bool) -> nn.Module:
    """MiT (``mit_*``) or timm ViT (``vit_synth``, ``deit_small``, ...) by name."""
    if arch in MIT_ARCHS:
        return MiTBackbone(arch, pretrained, drop_path_rate, affinity_blocks, softmax)
    if arch in VIT_ARCHS:
        return ViTBackbone(arch, img_size, pretrained, drop_path_rate, affinity_blocks, softmax)
    raise ValueError(f"unknown backbone {arch!r}; known: {sorted(MIT_ARCHS) + sorted(VIT_ARCHS)}")


class LinearEmbed(nn.Module):
    """Per-pixel linear projection of a map (the SegFormer head's "MLP"): (B, C, h, w) -> (B, E, h, w)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, -1, h, w)


class SegFormerHead(nn.Module):
    """SegFormer all-MLP decoder (METHODS.md): per level a linear embedding to ``embed_dim``,
    upsampled (bilinear) to the first level's resolution, concatenated, fused by a 1x1 conv
    (no bias) + BatchNorm + ReLU, Dropout2d, and a 1x1 classifier to ``num_classes`` (incl.
    background). Output stride = that of the first level (4 for MiT)."""

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(LinearEmbed(c, embed_dim) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        maps = [
            F.interpolate(embed(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else embed(f)
            for embed, f in zip(self.embeds, features)
        ]
        # Highest level first, as in SegFormer (the order only permutes the fuse weights).
        return self.pred(self.dropout(self.fuse(torch.cat(maps[::-1], dim=1))))


@dataclass
class AFAOutput:
    logits: torch.Tensor  # (B, C) classification (GMP + 1x1 classifier)
    cam: torch.Tensor  # (B, C, h, w) raw CAM (classifier weights on the last level), before ReLU
    seg: torch.Tensor | None  # (B, C + 1, H_s, W_s) segmentation logits at the decoder's stride
    affinity: torch.Tensor | None  # (B, N, N) predicted affinity in (0, 1)
    grid: tuple[int, int]  # (h, w) of the last level (the affinity's token grid)


class AFANet(nn.Module):
    """Backbone + GMP classifier + affinity head + SegFormer head (AFA, Fig. 3)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        img_size: int,
        pretrained: str | None = None,
        drop_path_rate: float = 0.1,
        affinity_blocks: int = 2,
        affinity_softmax: bool = False,
        decoder_dim: int = 256,
        decoder_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, img_size, pretrained, drop_path_rate, affinity_blocks, affinity_softmax)
        self.num_classes = num_classes
        # Eq. 2 / METHODS.md: 1x1 conv, no bias, on the global max pool of the last level.
        self.classifier = nn.Conv2d(self.backbone.channels[-1], num_classes, 1, bias=False)
        # Eq. 3: A = sigmoid(conv1x1(S + S^T)) over the stacked attention maps (with bias).
        self.affinity_proj = nn.Conv2d(self.backbone.num_maps, 1, 1, bias=True)
        self.decoder = SegFormerHead(self.backbone.channels, decoder_dim, num_classes + 1, decoder_dropout)

    def fit_size(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (bilinear) to a multiple of the backbone's patch size when it needs one."""
        m = self.backbone.size_multiple
        H, W = images.shape[-2:]
        size = (max(m, round(H / m) * m), max(m, round(W / m) * m))
        if m == 1 or size == (H, W):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def affinity(self, scores: torch.Tensor) -> torch.Tensor:
        """Eq. 3: symmetrise each map, 1x1 conv over the maps, sigmoid -> (B, N, N)."""
        return torch.sigmoid(self.affinity_proj(scores + scores.transpose(-2, -1)))[:, 0]

    def forward(self, images: torch.Tensor, seg: bool = True, affinity: bool = True) -> AFAOutput:
        """images: ImageNet-normalised (B, 3, H, W)."""
        images = self.fit_size(images)
        out = self.backbone(images, with_scores=affinity)
        last = out.features[-1]
        cam = F.conv2d(last, self.classifier.weight)
        logits = self.classifier(F.adaptive_max_pool2d(last, 1)).flatten(1)
        return AFAOutput(
            logits=logits,
            cam=cam,
            seg=self.decoder(out.features) if seg else None,
            affinity=self.affinity(out.scores) if affinity else None,
            grid=tuple(last.shape[-2:]),
        )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups of the authors' optimiser: backbone weights, backbone norms
        (names containing "norm": weight decay 0), classifier + affinity head, decoder."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "backbone_norm": [], "heads": [], "decoder": []}
        for name, param in self.backbone.named_parameters():
            groups["backbone_norm" if "norm" in name else "backbone"].append(param)
        groups["heads"] = list(self.classifier.parameters()) + list(self.affinity_proj.parameters())
        groups["decoder"] = list(self.decoder.parameters())
        return groups
