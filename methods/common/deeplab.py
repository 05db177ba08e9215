"""DeepLab-V2 (Chen et al., TPAMI 2017) segmenters on timm ResNets.

DeepLab-V2 = a ResNet whose last two stages are dilated (2 and 4) so the output stride is 8,
followed by ASPP-V2: four parallel 3x3 convolutions with dilation rates 6, 12, 18, 24, each
predicting the C + 1 class scores directly, summed. This is the segmenter most CAM-based WSSS
papers (IRN, ReCAM, AD-CAM) train on their pseudo masks.

Differences from the Caffe original, stated: timm's ResNet is the PyTorch variant (stride on
the 3x3 conv, not the first 1x1), and logits are upsampled bilinearly to the label size for the
loss instead of downsampling the labels. ``"small"`` swaps the ResNet-101 for a half-width
ResNet-10 (timm ``ResNet``: one basic block per stage, channels 32/64/128/256, tiered stem;
1.2M parameters, 0.2 GMACs at 96 px with the same dilation and head) for fast synthetic runs.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from methods.common.weights import resolve as resolve_weights

# Segmenter architectures: short name -> timm model name, or keyword arguments of timm's ResNet.
SEG_ARCHS: dict[str, str | dict] = {
    "deeplab_v2_r101": "resnet101",
    "deeplab_v2_r50": "resnet50",
    "small": dict(
        block=BasicBlock, layers=[1, 1, 1, 1], channels=(32, 64, 128, 256), stem_type="deep_tiered",
        stem_width=16, avg_down=True,
    ),  # fmt: skip
}
ASPP_RATES = (6, 12, 18, 24)


def create_backbone(arch: str) -> ResNet:
    """The dilated ResNet (output stride 8, no classifier, no pooling) for ``arch``."""
    spec = SEG_ARCHS[arch]
    if isinstance(spec, str):
        return timm.create_model(spec, pretrained=False, output_stride=8, num_classes=0, global_pool="")
    return ResNet(**spec, output_stride=8, num_classes=0, global_pool="")


class ASPPV2(nn.Module):
    """DeepLab-V2 ASPP: sum over rates r of Conv3x3(dilation=r)(x), each to ``num_classes``.
    Weights ~ N(0, 0.01), biases 0 (the DeepLab-V2 initialisation)."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = ASPP_RATES) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([conv(x) for conv in self.convs]).sum(0)


class DeepLabV2(nn.Module):
    """Dilated ResNet (output stride 8) + :class:`ASPPV2`. ``forward`` takes normalised images
    and returns logits (B, num_classes, H, W) at the input size (bilinear upsampling)."""

    def __init__(
        self,
        num_classes: int,
        arch: str = "small",
        pretrained: str | Path | None = None,
        rates: tuple[int, ...] = ASPP_RATES,
    ) -> None:
        super().__init__()
        if arch not in SEG_ARCHS:
            raise ValueError(f"unknown segmenter {arch!r}; known: {sorted(SEG_ARCHS)}")
        self.arch = arch
        self.backbone = create_backbone(arch)
        path = resolve_weights(None if pretrained is None else str(pretrained), arch)  # path / "auto" / name / none
        if path is not None:
            load_backbone(self.backbone, path)
        self.classifier = ASPPV2(self.backbone.num_features, num_classes, rates)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at output stride 8."""
        return self.classifier(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.forward_logits(x), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def freeze_bn(self) -> None:
        """Put the backbone's BatchNorms in eval mode with frozen affine parameters (DeepLab-V2
        trains with small batches and frozen ImageNet statistics). Call after ``train()``."""
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """backbone / head weights / head biases: DeepLab-V2 uses lr x1 / x10 / x20."""
        head_w = [c.weight for c in self.classifier.convs]
        head_b = [c.bias for c in self.classifier.convs]
        return {"backbone": list(self.backbone.parameters()), "head_weight": head_w, "head_bias": head_b}


def load_backbone(backbone: nn.Module, path: Path) -> None:
    """Load an ImageNet ResNet checkpoint (timm/torchvision names) into the backbone, ignoring
    the classifier ``fc`` on both sides; anything else missing or unexpected is an error.
    Shared by the DeepLab-V2 segmenter and IRN's backbone."""
    if not path.is_file():
        raise FileNotFoundError(f"ResNet checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the ResNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
