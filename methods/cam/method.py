"""``cam``: the plain ViT CAM baseline every WSSS method improves on.

Stages: a ViT multi-label classifier whose CAM is a 1x1 conv on the patch tokens (trained
with the multilabel soft-margin loss); CAMs max-normalised per class (multi-scale + flip
optional); pseudo masks by a background threshold (+ dense CRF optional); a ViT
segmentation network with a linear head trained with cross-entropy on the pseudo masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import CRFParams, DatasetInfo, Method, MethodConfig, SampleSource, StageContext, register, to_uint8_image
from methods.cam.model import ViTCamClassifier, ViTLinearSegmenter, resize_to_patch_multiple
from methods.common.crf import dense_crf_labels
from methods.common.data import batches_per_epoch
from methods.common.loop import ResumableLoop
from methods.common.weights import weights_field
from methods.common.precision import Precision, PrecisionOptions
from methods.common.training import (
    CropAugment,
    mask_absent,
    max_normalize,
    resize_to,
    set_lr,
    threshold_masks,
    warmup_cosine_lr,
)


@dataclass
class CamConfig(MethodConfig, PrecisionOptions):
    backbone: str = "vit_synth"  # vit_synth | deit_tiny | deit_small | vit_small
    pretrained: str | None = weights_field("backbone")  # ImageNet checkpoint: path, "auto" or none
    crop: int = 96
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    scale_range: tuple[float, ...] = (0.8, 1.2)
    cam_scales: tuple[float, ...] = (1.0,)
    cam_flip: bool = False
    bg_threshold: float = 0.35
    pseudo_crf: bool = False
    seg_backbone: str = "vit_synth"
    seg_pretrained: str | None = weights_field("seg_backbone")
    seg_crop: int = 96
    seg_epochs: int = 12
    seg_batch_size: int = 16
    seg_lr: float = 1e-3
    test_scales: tuple[float, ...] = (0.75, 1.0, 1.25)


def _train_loop(net: nn.Module, optimizer: torch.optim.Optimizer, source: SampleSource, batch_size: int, augment: CropAugment,
                with_masks: bool, epochs: int, warmup_epochs: int, base_lr: float, loss_fn, ctx: StageContext, tag: str, stream: int) -> None:
    """A seeded, resumable epoch loop with warm-up + cosine lr, reporting progress and the
    loss of each epoch's last batch."""
    per_epoch = batches_per_epoch(len(source), batch_size)
    total = max(1, per_epoch * epochs)
    loop = ResumableLoop(ctx, tag, {"net": net}, {"optimizer": optimizer}, total)
    net.train()
    for step, batch in loop.batches(source, batch_size, augment, ctx.stream_seed(stream), with_masks):
        set_lr(optimizer, warmup_cosine_lr(base_lr, step, total, warmup_epochs * per_epoch))
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ctx.progress(step + 1, total)
        if (step + 1) % per_epoch == 0:
            ctx.log_metric(f"{tag}_loss", loss.item(), step // per_epoch)
    net.eval()


@register
class CamBaseline(Method):
    name = "cam"
    Config = CamConfig

    def __init__(self, config: CamConfig, dataset: DatasetInfo, device: torch.device) -> None:
        super().__init__(config, dataset, device)
        C = dataset.num_classes
        self.precision = Precision.of(config, device)
        self.classifier = self.precision.module(ViTCamClassifier(config.backbone, config.crop, C, config.pretrained).to(device))
        self.segmenter = self.precision.module(ViTLinearSegmenter(config.seg_backbone, config.seg_crop, C, config.seg_pretrained).to(device))

    def networks(self) -> dict[str, nn.Module]:
        return {"classifier": self.classifier, "segmenter": self.segmenter}

    def macs_inputs(self):
        return {
            "classifier": (torch.zeros(1, 3, self.config.crop, self.config.crop),),
            "segmenter": (torch.zeros(1, 3, self.config.seg_crop, self.config.seg_crop),),
        }

    # -- stage 1 -----------------------------------------------------------------------------
    def train_cam(self, train: SampleSource, ctx: StageContext) -> None:
        cfg = self.config
        augment = CropAugment(cfg.crop, tuple(cfg.scale_range), flip=True)
        optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        forward = self.precision.train_forward(self.classifier)

        def loss_fn(batch) -> torch.Tensor:
            logits = self.precision.forward(forward, batch.images_on(self.device))  # float32: the loss runs in float32
            return F.multilabel_soft_margin_loss(logits, batch.labels.to(self.device))

        _train_loop(self.classifier, optimizer, train, cfg.batch_size, augment, False, cfg.epochs, cfg.warmup_epochs, cfg.lr, loss_fn, ctx, "cls", 1)

    # -- stage 2 -----------------------------------------------------------------------------
    @torch.no_grad()
    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        total = torch.zeros(images.shape[0], self.dataset.num_classes, *size, device=images.device)
        for scale in self.config.cam_scales:
            scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else images
            scaled = resize_to_patch_multiple(scaled, self.classifier.patch)
            views = [scaled, scaled.flip(-1)] if self.config.cam_flip else [scaled]
            for flipped, view in enumerate(views):
                cam = resize_to(F.relu(self.precision.forward(self.classifier.forward_cam, view)), size)
                total += cam.flip(-1) if flipped else cam
        return mask_absent(max_normalize(total), labels).clamp(0, 1)

    # -- stage 3 -----------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        masks = threshold_masks(cams, labels, self.config.bg_threshold)
        if not self.config.pseudo_crf:
            return masks
        refined = []
        for image, mask, label in zip(images, masks, labels):
            present = [0] + (torch.nonzero(label).flatten() + 1).tolist()  # bg + present classes
            compact = torch.searchsorted(torch.tensor(present), mask.cpu()).numpy()
            out = dense_crf_labels(to_uint8_image(image), compact, len(present), CRFParams())
            refined.append(torch.tensor(present)[torch.from_numpy(out)])
        return torch.stack(refined).to(masks.device)

    # -- stage 4 -----------------------------------------------------------------------------
    def train_seg(self, train: SampleSource, ctx: StageContext) -> None:
        cfg = self.config
        augment = CropAugment(cfg.seg_crop, tuple(cfg.scale_range), flip=True)
        optimizer = torch.optim.AdamW(self.segmenter.parameters(), lr=cfg.seg_lr, weight_decay=cfg.weight_decay)
        forward = self.precision.train_forward(self.segmenter)

        def loss_fn(batch) -> torch.Tensor:
            logits = self.precision.forward(forward, batch.images_on(self.device))
            return F.cross_entropy(logits, batch.masks.to(self.device), ignore_index=255)

        _train_loop(self.segmenter, optimizer, train, cfg.seg_batch_size, augment, True, cfg.seg_epochs, 1, cfg.seg_lr, loss_fn, ctx, "seg", 2)

    # -- stage 5 -----------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, images: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
        self.segmenter.eval()
        if not multiscale:
            return self.precision.forward(self.segmenter, images)
        size = images.shape[-2:]
        probs = 0
        for scale in self.config.test_scales:
            scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else images
            for flipped, view in enumerate((scaled, scaled.flip(-1))):
                out = resize_to(self.precision.forward(self.segmenter, view), size).softmax(1)
                probs = probs + (out.flip(-1) if flipped else out)
        return torch.log(probs / (2 * len(self.config.test_scales)) + 1e-8)

    def cam_threshold(self) -> float | None:
        """The pseudo-mask background threshold."""
        return self.config.bg_threshold
