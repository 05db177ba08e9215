"""``afa``: AFA with PAR (Ru et al., "Learning Affinity from Attention: End-to-End Weakly-
Supervised Semantic Segmentation with Transformers", CVPR 2022), end to end.

One network (backbone + GMP classifier + affinity head + SegFormer head) is trained in
``train_cam`` with the iteration schedule of the authors' code: classification only for
``cls_warmup_iters``; then cls + ``seg_weight`` * seg + ``aff_weight`` * aff (+ ``lreg_weight``
* L_reg when ``use_lreg``), the segmentation target being the PAR-refined CAM label until
``rw_switch_iter`` and the random-walk + PAR label after. ``fused_segmentation = True``:
the harness skips ``train_seg``. Stages:

* ``cams``: multi-scale (``cam_scales``) + flip CAM, flip max, ReLU, summed over scales,
  min-max per class, absent classes zero.
* ``pseudo_masks``: the random-walk (learned affinity at the largest CAM scale) + PAR label
  with the high / low background thresholds (``pseudo_mask_mode="rw"``; ``"par"``: the
  PAR-refined CAM label; ``"cam"``: the plain two-threshold label).
* ``segment``: the segmentation head on the image resized to long side ``test_long_side``
  (authors: 512; 0 = off); multi-scale = ``test_scales`` x flip, flip averaged, max over
  scales at the scale-1 logit grid; logits resized back. Dense CRF (``crf_params``) is
  applied by the harness.

Authors' choices that are config switches (defaults = the authors' code): backbone norms
frozen (``freeze_backbone_norms``), the CAM label's PAR on the whole padded crop
(``cam_par_region``), the affinity label from the CAM label (VOC script) or from the
random-walk label after the switch (``aff_from_rw_label``, their COCO script).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.afa.labels import affinity_label, cam_label, random_walk_label, refine_guide, refined_cam_label
from methods.afa.losses import affinity_loss, balanced_seg_loss, classification_loss, dense_energy_loss
from methods.afa.model import AFANet
from methods.afa.par import PAR
from methods.base import CRFParams, DatasetInfo, Method, MethodConfig, SampleSource, StageContext, register
from methods.common.loop import ResumableLoop
from methods.common.weights import weights_field
from methods.common.precision import Precision, PrecisionOptions
from methods.common.training import CropAugment, mask_absent, normalize, resize_to, seeded, set_lr


@dataclass
class AFAConfig(MethodConfig, PrecisionOptions):
    """Hyper-parameters; defaults are the fast synthetic recipe (``benchmarks/*.toml`` have the
    paper's). Iteration counts are optimiser steps."""

    # network
    backbone: str = "mit_synth"  # mit_synth | mit_b0 | mit_b1 | mit_b2 | vit_synth | deit_tiny | deit_small | vit_small
    pretrained: str | None = weights_field("backbone")  # ImageNet checkpoint: path (mit_b1.pth, ...), "auto" or none
    drop_path_rate: float = 0.0
    affinity_blocks: int = 2  # last blocks whose attention feeds the affinity head
    affinity_softmax: bool = False  # False: raw q k^T (code); True: post-softmax attention
    decoder_dim: int = 64
    decoder_dropout: float = 0.1
    # data and schedule
    crop: int = 96
    scale_range: tuple[float, ...] = (0.75, 1.5)
    batch_size: int = 8
    iterations: int = 400
    cls_warmup_iters: int = 200  # classification loss only before this step
    rw_switch_iter: int = 300  # seg target: PAR-refined CAM label before, random walk + PAR after
    # optimiser: AdamW, linear warm-up then poly; backbone norms without weight decay
    lr: float = 1.5e-3  # backbone; heads (classifier, affinity, decoder) get lr * head_lr_mult
    head_lr_mult: float = 1.0  # authors: 10 (at lr 6e-5); 10 x 1.5e-3 is too high from random init (README)
    weight_decay: float = 0.01
    freeze_backbone_norms: bool = True  # authors: backbone norm layers at lr 0 for the whole run
    warmup_iters: int = 20
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    # CAM and pseudo labels
    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    bg_high: float = 0.55
    bg_low: float = 0.35
    par_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    par_iters: int = 10
    par_w1: float = 0.3
    par_w2: float = 0.01
    par_downscale: int = 2  # PAR runs at 1 / par_downscale of the image size
    cam_par_region: str = "crop"  # CAM-label PAR on the whole padded crop (authors) | "box"
    aff_radius: int = 4  # Chebyshev radius (tokens) of the affinity window (paper: 8 on 32 x 32)
    rw_alpha: float = 2.0
    rw_eps: float = 0.1  # column normalisation A / (A.sum(0) + rw_eps)
    aff_from_rw_label: bool = False  # after the switch, affinity label from the rw label (authors' COCO) or the CAM label (VOC)
    # loss weights (Eq. 12)
    seg_weight: float = 0.1
    aff_weight: float = 0.1
    use_lreg: bool = False  # the authors' code dropped L_reg; the paper (Tab. 2) used it
    lreg_weight: float = 0.01  # the paper's lambda_3 on its L_reg scale (losses.dense_energy_loss)
    lreg_sigma_rgb: float = 15.0
    lreg_sigma_xy: float = 100.0  # crop pixels
    lreg_max_side: int = 64  # L_reg's grid: half the crop (authors), at most this side (dense kernel)
    # inference
    pseudo_mask_mode: str = "rw"  # rw | par | cam
    test_scales: tuple[float, ...] = (1.0, 0.75, 1.25)  # paper (VOC): (1.0, 0.5, 0.75)
    test_flip: bool = True
    test_long_side: int = 0  # > 0: resize each test image to this long side first (authors: 512); 0: off
    log_every: int = 20


def warmup_poly_factor(step: int, total: int, warmup: int, warmup_ratio: float = 1e-6, power: float = 1.0) -> float:
    """The authors' lr multiplier (``PolyWarmupAdamW``): linear warm-up from ``warmup_ratio``,
    ``1 - (1 - step / warmup) * (1 - warmup_ratio)`` for ``step < warmup``, then poly decay
    ``(1 - step / total) ^ power`` (not restarted after the warm-up)."""
    if step < warmup:
        return 1.0 - (1.0 - step / warmup) * (1.0 - warmup_ratio)
    return max(0.0, 1.0 - step / max(1, total)) ** power


def schedule_phase(step: int, cls_warmup_iters: int, rw_switch_iter: int) -> str:
    """Which losses / target a step uses: ``"cls"`` (classification only), ``"cam"`` (all
    losses, PAR-refined CAM target) or ``"rw"`` (all losses, random-walk + PAR target)."""
    if step < cls_warmup_iters:
        return "cls"
    return "cam" if step < rw_switch_iter else "rw"


def build_optimizer(net: AFANet, cfg: AFAConfig) -> torch.optim.AdamW:
    """AdamW with the code's four groups: backbone (lr, wd), backbone norms (wd 0; lr 0 for
    the whole run with ``freeze_backbone_norms``, the authors' "freeze norm layers", else lr),
    classifier + affinity head and decoder (lr * head_lr_mult, wd). ``lr_scale`` is what
    :func:`methods.common.training.set_lr` multiplies the scheduled lr by (0 stays 0, as the
    authors' scheduler multiplies each group's initial lr)."""
    groups = net.param_groups()
    spec = [
        ("backbone", 1.0, cfg.weight_decay),
        ("backbone_norm", 0.0 if cfg.freeze_backbone_norms else 1.0, 0.0),
        ("heads", cfg.head_lr_mult, cfg.weight_decay),
        ("decoder", cfg.head_lr_mult, cfg.weight_decay),
    ]
    params = [
        {"params": groups[name], "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": wd, "name": name}
        for name, scale, wd in spec
        if groups[name]
    ]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The code's ``int(scale * side)`` (at least 1)."""
    return max(1, int(scale * size[0])), max(1, int(scale * size[1]))


def long_side_size(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """The authors' test resize (``--resize_long 512``): ``ratio = long_side / max(H, W)``,
    ``(int(H * ratio), int(W * ratio))`` (at least 1); ``long_side <= 0``: ``size`` as is."""
    if long_side <= 0:
        return tuple(size)
    ratio = long_side / max(size)
    return max(1, int(size[0] * ratio)), max(1, int(size[1] * ratio))


@register
class AFA(Method):
    name = "afa"
    Config = AFAConfig
    fused_segmentation = True

    def __init__(self, config: AFAConfig, dataset: DatasetInfo, device: torch.device) -> None:
        super().__init__(config, dataset, device)
        if config.pseudo_mask_mode not in ("rw", "par", "cam"):
            raise ValueError(f"pseudo_mask_mode must be rw, par or cam, not {config.pseudo_mask_mode!r}")
        if config.cam_par_region not in ("crop", "box"):
            raise ValueError(f"cam_par_region must be crop or box, not {config.cam_par_region!r}")
        if config.test_long_side < 0:
            raise ValueError(f"test_long_side must be >= 0 (0 = off), not {config.test_long_side}")
        self.precision = Precision.of(config, device)  # bf16 / channels_last / compile
        self.net = self.precision.module(self._build_net().to(device))
        self.net.eval()
        self.par = PAR(config.par_dilations, config.par_iters, config.par_w1, config.par_w2).to(device)

    def _build_net(self) -> AFANet:
        cfg = self.config
        return AFANet(
            cfg.backbone,
            self.dataset.num_classes,
            img_size=cfg.crop,
            pretrained=cfg.pretrained,
            drop_path_rate=cfg.drop_path_rate,
            affinity_blocks=cfg.affinity_blocks,
            affinity_softmax=cfg.affinity_softmax,
            decoder_dim=cfg.decoder_dim,
            decoder_dropout=cfg.decoder_dropout,
        )

    def networks(self) -> dict[str, nn.Module]:
        return {"afa": self.net}

    def crf_params(self) -> CRFParams:
        """METHODS.md: positional 3/3, bilateral 64/5/4, 10 iterations."""
        return CRFParams(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=64, bilateral_srgb=5, bilateral_compat=4, iterations=10)

    # -- shared pieces ----------------------------------------------------------------------
    def multiscale_cam(
        self, images: torch.Tensor, scales: tuple[float, ...], affinity: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
        """Multi-scale + flip CAM (METHODS.md, code ``multi_scale_cam_with_aff_mat``): per
        scale ``ReLU(max(cam, flipped-back cam of the flipped image))`` at image size, summed
        over scales, min-max normalised per class. With ``affinity``, also the predicted
        affinity (B, N, N) of the (unflipped) images at the largest scale and its grid.
        ``images`` in [0, 1]; runs in the network's current mode, without gradients."""
        B, _, H, W = images.shape
        x = normalize(images)
        total = torch.zeros(B, self.dataset.num_classes, H, W, device=images.device)
        aff, grid = None, None
        largest = max(scales)
        with torch.no_grad():
            for scale in scales:
                xs = x if scale == 1.0 else F.interpolate(x, size=scaled_size((H, W), scale), mode="bilinear", align_corners=False)
                if affinity and scale == largest and aff is None:
                    # The affinity of the unflipped images only: run the two halves apart.
                    plain = self.precision.forward(self.net, xs, seg=False, affinity=True)
                    flipped = self.precision.forward(self.net, xs.flip(-1), seg=False, affinity=False)
                    aff, grid = plain.affinity, plain.grid
                    cam = torch.cat([plain.cam, flipped.cam])
                else:
                    cam = self.precision.forward(self.net, torch.cat([xs, xs.flip(-1)]), seg=False, affinity=False).cam
                cam = resize_to(cam, (H, W))
                total += F.relu(torch.maximum(cam[:B], cam[B:].flip(-1)))
        flat = total.flatten(2)
        total = total - flat.min(-1).values[..., None, None]
        total = total / (total.flatten(2).max(-1).values[..., None, None] + 1e-5)
        return total, aff, grid

    # -- stage 1 (+ 4, fused) ------------------------------------------------------------------
    def train_cam(self, train: SampleSource, ctx: StageContext) -> None:
        cfg = self.config
        if len(train) == 0:
            raise ValueError("afa: empty training split")
        augment = CropAugment(cfg.crop, tuple(cfg.scale_range), flip=True)
        optimizer = build_optimizer(self.net, cfg)
        # Initial weights, drop-path and dropout draw from the global RNG: seed it from the
        # trial and re-draw the initial weights in place (the network was built in __init__,
        # which has no seed) so a seed fixes the whole run.
        with seeded(int(torch.randint(0, 2**62, (1,), generator=ctx.generator(2))), self.device):
            self.net.load_state_dict(self._build_net().state_dict())
            self.net.train()
            loop = ResumableLoop(ctx, "train", {"net": self.net}, {"optimizer": optimizer}, cfg.iterations)
            for step, batch in loop.batches(train, cfg.batch_size, augment, ctx.stream_seed(1)):
                set_lr(optimizer, cfg.lr * warmup_poly_factor(step, cfg.iterations, cfg.warmup_iters, cfg.warmup_ratio, cfg.poly_power))
                losses = self.training_step(batch.images_on(self.device), batch.labels, batch.valid, step)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                ctx.progress(step + 1, cfg.iterations)
                if (step + 1) % max(1, cfg.log_every) == 0 or step + 1 == cfg.iterations:
                    for key, value in losses.items():
                        ctx.log_metric(f"train_{key}", value.detach(), step + 1)
        self.net.eval()

    def training_step(self, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Losses of one step (Eq. 12 with the schedule). images (B, 3, S, S) in [0, 1],
        labels (B, C), valid (B, S, S) bool (the image inside the augmented crop)."""
        cfg = self.config
        images, labels, valid = images.to(self.device), labels.to(self.device), valid.to(self.device)
        phase = schedule_phase(step, cfg.cls_warmup_iters, cfg.rw_switch_iter)
        # float32 outputs (bf16 autocast inside): the losses run in float32
        out = self.precision.forward(self.precision.train_forward(self.net), normalize(images), seg=True, affinity=phase != "cls")
        loss = classification_loss(out.logits, labels)
        losses = {"cls": loss.detach()}
        if phase == "cls":
            losses["loss"] = loss
            return losses
        cams, aff, grid = self.multiscale_cam(images, cfg.cam_scales, affinity=phase == "rw")
        cams = mask_absent(cams, labels)
        with torch.no_grad():
            guide = refine_guide(self.par, images, valid, cfg.par_downscale)
            cam_target = refined_cam_label(
                self.par, images, cams, labels, valid, cfg.bg_high, cfg.bg_low, guide=guide, region=cfg.cam_par_region
            )
            if phase == "rw":
                seg_target = random_walk_label(
                    self.par, images, cams, aff, grid, labels, valid, cfg.bg_high, cfg.bg_low,
                    cfg.aff_radius, cfg.rw_alpha, cfg.rw_eps, guide=guide,
                )
            else:
                seg_target = cam_target
            # Authors: VOC builds the affinity label from the CAM label all run long; COCO
            # from the segmentation target, i.e. the random-walk label after the switch.
            aff_source = seg_target if cfg.aff_from_rw_label else cam_target
            aff_target = affinity_label(aff_source, out.grid, cfg.aff_radius)
        seg = resize_to(out.seg, images.shape[-2:])
        aff_loss = affinity_loss(out.affinity, aff_target)
        seg_loss = balanced_seg_loss(seg, seg_target)
        loss = loss + cfg.seg_weight * seg_loss + cfg.aff_weight * aff_loss
        losses.update(seg=seg_loss.detach(), aff=aff_loss.detach())
        if cfg.use_lreg:
            # As the authors: softmax of the crop-sized logits, gated by the seg target.
            reg = dense_energy_loss(
                images, seg.softmax(1), valid, seg_target, cfg.lreg_sigma_rgb, cfg.lreg_sigma_xy, cfg.lreg_max_side
            )
            loss = loss + cfg.lreg_weight * reg
            losses["reg"] = reg.detach()
        losses["loss"] = loss
        return losses

    # -- stage 2 -------------------------------------------------------------------------------
    @torch.no_grad()
    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        images, labels = images.to(self.device), labels.to(self.device)
        cams, _, _ = self.multiscale_cam(images, self.config.cam_scales)
        return mask_absent(cams, labels).clamp_(0.0, 1.0)

    # -- stage 3 -------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        self.net.eval()
        images, cams, labels = images.to(self.device), cams.to(self.device), labels.to(self.device)
        if cfg.pseudo_mask_mode == "cam":
            return cam_label(cams, labels, cfg.bg_high, cfg.bg_low)
        if cfg.pseudo_mask_mode == "par":
            return refined_cam_label(self.par, images, cams, labels, None, cfg.bg_high, cfg.bg_low, cfg.par_downscale)
        size = scaled_size(tuple(images.shape[-2:]), max(cfg.cam_scales))
        x = normalize(images)
        x = x if size == tuple(x.shape[-2:]) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out = self.precision.forward(self.net, x, seg=False, affinity=True)
        return random_walk_label(
            self.par, images, cams, out.affinity, out.grid, labels, None, cfg.bg_high, cfg.bg_low,
            cfg.aff_radius, cfg.rw_alpha, cfg.rw_eps, cfg.par_downscale,
        )

    # -- stage 5 -------------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, images: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
        """Segmentation logits (B, C + 1, H, W), as the authors' ``test_msc_flip.py``: with
        ``test_long_side`` > 0 the image is first resized (bilinear) to
        :func:`long_side_size`. Single scale: the logits of that image. Multi-scale: per
        scale (``int(scale * side)``) the logits of the image and its flip (flipped back),
        resized to the logit grid of scale 1.0 (else the largest scale) and averaged; max
        over scales. Logits are resized back to (H, W) last (bilinear)."""
        cfg = self.config
        self.net.eval()
        images = images.to(self.device)
        B, _, H, W = images.shape
        x = normalize(images)
        size = long_side_size((H, W), cfg.test_long_side)
        if size != (H, W):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if not multiscale:
            return resize_to(self.precision.forward(self.net, x, affinity=False).seg, (H, W))
        per_scale = {}
        for scale in cfg.test_scales:
            xs = x if scale == 1.0 else F.interpolate(x, size=scaled_size(size, scale), mode="bilinear", align_corners=False)
            per_scale[scale] = self.precision.forward(self.net, torch.cat([xs, xs.flip(-1)]) if cfg.test_flip else xs, affinity=False).seg
        grid = tuple(per_scale[1.0 if 1.0 in per_scale else max(per_scale)].shape[-2:])
        best = None
        for seg in per_scale.values():
            seg = resize_to(seg, grid)
            if cfg.test_flip:
                seg = 0.5 * (seg[:B] + seg[B:].flip(-1))
            best = seg if best is None else torch.maximum(best, seg)
        return resize_to(best, (H, W))

    def macs_inputs(self) -> dict[str, tuple[Any, ...]]:
        size = self.dataset.input_size
        return {"afa": (torch.zeros(1, 3, size, size),)}

    def cam_threshold(self) -> float | None:
        """beta_h: a pixel is foreground in AFA's label iff a present CAM exceeds it."""
        return self.config.bg_high
