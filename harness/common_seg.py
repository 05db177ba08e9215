"""The common segmentation recipe: one harness-owned segmentation network, trained the same
way on any method's pseudo masks, so that a comparison of methods measures their pseudo-mask
quality and not their (different) segmentation recipes.

With the eval option ``common_segmentation`` set (``true`` for the defaults below, or a table
of :class:`CommonSegConfig` fields), the runner's ``train_seg`` stage trains this network on
the trial's pseudo masks instead of calling ``method.train_seg`` (also for methods whose
segmentation is fused into ``train_cam``, such as AFA), and the ``segment`` stage evaluates
it instead of ``method.segment``. The method's own networks are untouched; the common
segmenter's weights are checkpointed separately (``checkpoints/common_seg.pt``), and its cost
is logged as ``params_common_seg`` / ``gmacs_common_seg``.

Everything that could differ between methods is fixed here: architecture, input size,
augmentation (random rescale, crop, flip), optimiser (AdamW, linear warm-up then cosine),
epochs, batch size, loss (cross-entropy, 255 ignored), test protocol (single scale; multi-scale
+ flip with ``test_scales``, softmax averaged) and dense-CRF parameters. Randomness comes from
the trial seed, so method A's seed s and method B's seed s see the same batches in the same
order with the same augmentation draws.

Precision options (``bf16``, ``channels_last``, ``compile``; all off by default): the fields of
:class:`methods.common.precision.PrecisionOptions`, set in the ``[eval.common_segmentation]``
table like any other field (a bare ``bf16=true`` override reaches the methods, not this table).

Architectures:

* ``deeplab_lite_<vit>`` (default ``deeplab_lite_vit_synth``): a ViT from
  :mod:`methods.common.vit` (``vit_synth``, ``deit_tiny``, ``deit_small``, ``vit_small``) with
  a DeepLab-style ASPP head on the patch grid (1x1 and dilated 3x3 branches, concatenated,
  fused, classified, bilinearly upsampled);
* ``deeplab_v2_r101`` / ``deeplab_v2_r50`` / ``deeplab_v2_small``: DeepLab-V2 from
  :mod:`methods.common.deeplab` (the segmenter most CAM-based WSSS papers train).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import CRFParams, DatasetInfo, SampleSource, StageContext
from methods.common.precision import Precision, PrecisionOptions

CHECKPOINT = "common_seg"  # checkpoints/common_seg.pt in the trial directory


@dataclass
class CommonSegConfig(PrecisionOptions):
    """The shared recipe. Defaults are the fast synthetic recipe; suites for real data set
    a bigger backbone and input size (see benchmarks/same-backbone-voc-mini.toml)."""

    arch: str = "deeplab_lite_vit_synth"
    pretrained: str | None = None  # local ImageNet checkpoint of the backbone
    crop: int = 96
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0  # e.g. 0.1 with a pretrained backbone
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    scale_range: tuple[float, ...] = (0.7, 1.3)
    test_scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    aspp_rates: tuple[int, ...] = (1, 2, 3)  # dilations of the ViT head, in patches
    head_dim: int = 128
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 80.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def common_seg_config(eval_settings: dict[str, Any]) -> CommonSegConfig | None:
    """The recipe a trial's eval settings ask for, or None (the method's own segmenter).

    ``eval.common_segmentation`` may be False / True / a dict of CommonSegConfig fields
    (a suite's ``[eval.common_segmentation]`` table) / a string "true" / "false".
    """
    value = eval_settings.get("common_segmentation")
    if value is None or value is False:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("", "false", "0", "no", "off", "none"):
            return None
        if value.strip().lower() in ("true", "1", "yes", "on"):
            return CommonSegConfig()
    if value is True:
        return CommonSegConfig()
    if isinstance(value, dict):
        from harness.config import build_method_config

        config = build_method_config(CommonSegConfig, value, "eval.common_segmentation")
        check_arch(config.arch)
        return config
    from harness.errors import ConfigError

    raise ConfigError(f"eval option `common_segmentation` must be true, false or a table of {', '.join(f.name for f in dataclasses.fields(CommonSegConfig))}; got {value!r}.")


class ASPPLite(nn.Module):
    """DeepLab-style atrous pyramid on a (B, D, h, w) feature map: a 1x1 branch and one 3x3
    branch per dilation rate (> 1), plus image pooling; concatenated, fused by a 1x1 conv."""

    def __init__(self, in_dim: int, dim: int, rates: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()

        def block(kernel: int, dilation: int) -> nn.Sequential:
            pad = dilation * (kernel // 2)
            return nn.Sequential(nn.Conv2d(in_dim, dim, kernel, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([block(1, 1)] + [block(3, r) for r in rates if r > 1])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(nn.Conv2d(dim * (len(self.branches) + 1), dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                                  nn.Dropout2d(0.1))
        self.classifier = nn.Conv2d(dim, num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.classifier(self.fuse(torch.cat([b(x) for b in self.branches] + [pooled], dim=1)))


class ViTDeepLabLite(nn.Module):
    """ViT encoder + :class:`ASPPLite` on the patch grid, logits upsampled to the input."""

    def __init__(self, vit_arch: str, img_size: int, num_outputs: int, rates: tuple[int, ...], dim: int, pretrained: str | None) -> None:
        super().__init__()
        from methods.common.vit import create_vit

        self.encoder = create_vit(vit_arch, img_size, pretrained=pretrained)
        self.head = ASPPLite(self.encoder.embed_dim, dim, rates, num_outputs)
        self.patch = self.encoder.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from methods.common.training import normalize
        from methods.common.vit import pad_to_multiple, patch_grid, tokens_to_map

        padded, (H, W) = pad_to_multiple(normalize(images), self.patch)
        tokens = self.encoder.forward_features(padded)
        fmap = tokens_to_map(tokens[:, self.encoder.num_prefix_tokens:], patch_grid(self.encoder, padded))
        logits = F.interpolate(self.head(fmap), size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :H, :W]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.encoder.parameters()), "head": list(self.head.parameters())}


class DeepLabV2Wrapper(nn.Module):
    """methods.common.deeplab.DeepLabV2 taking images in [0, 1]."""

    def __init__(self, arch: str, num_outputs: int, pretrained: str | None) -> None:
        super().__init__()
        from methods.common.deeplab import DeepLabV2

        self.net = DeepLabV2(num_outputs, arch, pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from methods.common.training import normalize

        return self.net(normalize(images))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.net.backbone.parameters()), "head": list(self.net.classifier.parameters())}


def known_archs() -> list[str]:
    from methods.common.deeplab import SEG_ARCHS
    from methods.common.vit import VIT_ARCHS

    return sorted(["deeplab_lite_" + k for k in VIT_ARCHS] + [{"small": "deeplab_v2_small"}.get(k, k) for k in SEG_ARCHS])


def check_arch(arch: str) -> None:
    """A ConfigError naming the valid architectures (with the closest) for an unknown one."""
    from harness.errors import ConfigError, suggest

    valid = known_archs()
    if arch not in valid:
        raise ConfigError(f"eval.common_segmentation: unknown arch {arch!r}.{suggest(arch, valid)} Valid: {', '.join(valid)}.")


def build_network(config: CommonSegConfig, num_classes: int) -> nn.Module:
    """The network named by ``config.arch`` with ``num_classes + 1`` outputs."""
    check_arch(config.arch)
    arch = config.arch
    if arch.startswith("deeplab_lite_"):
        return ViTDeepLabLite(arch[len("deeplab_lite_"):], config.crop, num_classes + 1, tuple(config.aspp_rates), config.head_dim,
                              config.pretrained)
    return DeepLabV2Wrapper({"deeplab_v2_small": "small"}.get(arch, arch), num_classes + 1, config.pretrained)


class CommonSegmenter:
    """Train on pseudo masks, segment, report cost: the part of the Method interface the
    runner's train_seg / segment stages use."""

    def __init__(self, config: CommonSegConfig, dataset: DatasetInfo, device: torch.device) -> None:
        self.config = config
        self.dataset = dataset
        self.device = device
        self.precision = Precision.of(config, device)  # bf16 / channels_last / compile fields
        self.net = self.precision.module(build_network(config, dataset.num_classes).to(device))
        self.net.eval()

    # -- training ----------------------------------------------------------------------------
    def train(self, source: SampleSource, ctx: StageContext) -> None:
        from methods.common.data import batches_per_epoch
        from methods.common.loop import ResumableLoop
        from methods.common.training import CropAugment, set_lr, warmup_cosine_lr

        cfg = self.config
        augment = CropAugment(cfg.crop, tuple(cfg.scale_range), flip=True)
        groups = self.net.param_groups()
        optimizer = torch.optim.AdamW(
            [{"params": groups["backbone"], "lr_scale": cfg.backbone_lr_scale}, {"params": groups["head"], "lr_scale": 1.0}],
            lr=cfg.lr, weight_decay=cfg.weight_decay)
        per_epoch = batches_per_epoch(len(source), cfg.batch_size)
        total = max(1, per_epoch * cfg.epochs)
        self.net.train()
        forward = self.precision.train_forward(self.net)
        loop = ResumableLoop(ctx, "common_seg", {"net": self.net}, {"optimizer": optimizer}, total)
        # ctx.stream_seed(7): the same stream for every method at a given seed
        for step, batch in loop.batches(source, cfg.batch_size, augment, ctx.stream_seed(7), with_masks=True):
            set_lr(optimizer, warmup_cosine_lr(cfg.lr, step, total, cfg.warmup_epochs * per_epoch))
            logits = self.precision.forward(forward, batch.images_on(self.device))  # float32 logits
            loss = F.cross_entropy(logits, batch.masks.to(self.device), ignore_index=255)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ctx.progress(step + 1, total)
            if (step + 1) % per_epoch == 0:
                ctx.log_metric("common_seg_loss", loss.detach(), step // per_epoch)
        self.net.eval()

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, images: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
        """Logits (B, C + 1, H, W); multi-scale + flip returns log of averaged softmax."""
        self.net.eval()
        if not multiscale:
            return self.precision.forward(self.net, images)
        size = images.shape[-2:]
        probs = torch.zeros(images.shape[0], self.dataset.num_classes + 1, *size, device=images.device)
        for scale in self.config.test_scales:
            scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else images
            for flipped, view in enumerate((scaled, scaled.flip(-1))):
                out = F.interpolate(self.precision.forward(self.net, view), size=size, mode="bilinear", align_corners=False).softmax(1)
                probs += out.flip(-1) if flipped else out
        return torch.log(probs / (2 * len(self.config.test_scales)) + 1e-8)

    def crf_params(self) -> CRFParams:
        c = self.config
        return CRFParams(c.crf_gaussian_sxy, c.crf_gaussian_compat, c.crf_bilateral_sxy, c.crf_bilateral_srgb, c.crf_bilateral_compat)

    # -- state and cost ----------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {CHECKPOINT: self.net}

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "net": self.net.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.net.eval()

    def cost_metrics(self) -> dict[str, float]:
        """``params_common_seg`` and ``gmacs_common_seg`` (one forward at the crop size)."""
        from harness.profiling import count_macs, count_params

        inputs = (torch.zeros(1, 3, self.config.crop, self.config.crop, device=self.device),)
        return {f"params_{CHECKPOINT}": float(count_params(self.net)), f"gmacs_{CHECKPOINT}": count_macs(self.net, inputs) / 1e9}
