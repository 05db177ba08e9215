"""AD-CAM (Huang et al., "Attention-based Class Activation Diffusion for Weakly-Supervised
Semantic Segmentation"): the five stages.

1. ``train_cam``: multi-label BCE (Eq. 1) on both heads of a Conformer (Eqs. 4-5), with the
   cross-branch gradients detached (``stop_gradient``, Sec. 4.1 / Tab. 3); AdamW with a
   constant lr on the transformer branch and a poly-decayed lr on the CNN branch (Sec. 5.1).
2. ``cams``: CNN-branch CAM, ReLU, / max (Eq. 2) on the token grid; attention A = mean over
   heads and blocks (Sec. 4.2), made row-stochastic over the patches (``attention_norm``);
   co-neighbour refinement (Eqs. 6-7, ``top_k``) and ``diffusion_steps`` of diffusion (Eq. 8,
   ``diffusion_direction``); upsampled, summed over ``cam_scales`` x flips, absent classes
   zeroed, each map divided by its max. ``refine_mode`` gives Tab. 3's ablations.
3. ``pseudo_masks``: constant background plane ``bg_threshold`` + argmax, optionally refined by
   a dense CRF with a label unary (``pseudo_crf``). The paper uses IRN here instead (not
   implemented: it needs a second network).
4. ``train_seg``: DeepLab-V2 (ResNet-101, ASPP 6/12/18/24) or a small ResNet with the same
   head, per-pixel CE (ignore 255), SGD with poly decay, head lr x10 (biases x20).
5. ``segment``: single scale, or ``test_scales`` x flip with softmax averaging.

No public code exists: everything is from the paper (sections 3-5) and METHODS.md; the choices
it leaves open are config fields, listed in README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.adcam.diffusion import adcam_refine, patch_attention, row_normalize
from methods.adcam.model import BACKBONES, CamNet, build_cam_net
from methods.base import (
    IGNORE_INDEX,
    CRFParams,
    DatasetInfo,
    Method,
    MethodConfig,
    SampleSource,
    StageContext,
    register,
    to_uint8_image,
)
from methods.common.crf import dense_crf_labels
from methods.common.data import batches_per_epoch
from methods.common.deeplab import SEG_ARCHS, DeepLabV2
from methods.common.loop import ResumableLoop
from methods.common.weights import weights_field
from methods.common.precision import Precision, PrecisionOptions
from methods.common.training import (
    CropAugment,
    mask_absent,
    max_normalize,
    normalize,
    poly_lr,
    resize_to,
    seeded,
    threshold_masks,
)
from methods.common.vit import pad_to_multiple

# Label-CRF kernels for the optional pseudo-mask refinement (the settings usually paired with
# IRN-style label CRFs: Gaussian sxy 3 / compat 3, bilateral sxy 50 / srgb 5 / compat 10).
PSEUDO_CRF = CRFParams(gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=50, bilateral_srgb=5, bilateral_compat=10)
# DeepLab-V2's dense-CRF post-processing (pos 1/3, bilateral 67/3/4, 10 iterations).
SEGMENT_CRF = CRFParams(gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4)


@dataclass
class ADCAMConfig(MethodConfig, PrecisionOptions):
    """AD-CAM hyper-parameters. Defaults: the fast synthetic recipe (tiny Conformer, 96 px,
    small segmenter); the paper's values are in ``[methods.adcam]`` of ``benchmarks/voc.toml``."""

    # -- CAM network ------------------------------------------------------------------------
    backbone: str = "conformer_tiny"  # conformer_s | conformer_ti | conformer_b | conformer_tiny | deit_small | vit_synth | ...
    pretrained: str | None = weights_field("backbone")  # path (official Conformer / timm ViT names), "auto" or none
    last_stage: str = "drop"  # Conformer last block: drop (paper) | stride1 | stride2 (original)
    drop_path_rate: float = 0.0
    stop_gradient: bool = True  # detach cross-branch gradients (paper Tab. 3)
    # -- CAM training (Sec. 5.1) ------------------------------------------------------------
    crop: int = 96
    scale_range: tuple[float, float] = (0.7, 1.3)  # random rescale before the crop
    epochs: int = 20
    batch_size: int = 16
    lr_vit: float = 1e-3  # transformer branch, constant (paper 2e-4)
    lr_cnn: float = 2e-3  # CNN branch, poly decay from here (paper 5e-4)
    poly_power: float = 0.9
    weight_decay: float = 1e-4
    # -- CAM extraction and diffusion (Secs. 4.2-4.3) ---------------------------------------
    cam_scales: tuple[float, ...] = (1.0,)
    cam_flip: bool = True
    refine_mode: str = "adcam"  # adcam | diffusion_only | plain_cam
    top_k: int = 12  # paper: 50 of 576 tokens (8.7%); the same fraction of the synthetic 144
    diffusion_steps: int = 2  # T
    attention_norm: str = "renorm"  # renorm (drop cls, rows to 1) | raw
    diffusion_direction: str = "push"  # push: M' = A~^T M (paper text) | pull: M' = A~ M
    # -- pseudo masks ---------------------------------------------------------------------------
    bg_threshold: float = 0.45  # synthetic sweep optimum of the diffused CAMs; paper: not given
    pseudo_crf: bool = False
    pseudo_crf_gt_prob: float = 0.7
    # -- segmentation (DeepLab-V2) --------------------------------------------------------------
    seg_arch: str = "small"  # deeplab_v2_r101 | deeplab_v2_r50 | small
    seg_pretrained: str | None = weights_field("seg_arch")  # ImageNet ResNet: path, "auto" or none
    seg_iterations: int = 300
    seg_batch_size: int = 8
    seg_crop: int = 96
    seg_scale_range: tuple[float, float] = (0.5, 1.5)
    seg_lr: float = 1e-2
    seg_momentum: float = 0.9
    seg_weight_decay: float = 5e-4
    seg_head_lr_mult: float = 10.0  # ASPP weights x10, biases x20 (DeepLab-V2)
    seg_poly_power: float = 0.9
    seg_freeze_bn: bool = False  # freeze backbone BN statistics (DeepLab-V2 with ImageNet weights)
    test_scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    test_flip: bool = True

    def __post_init__(self) -> None:
        # TOML / CLI overrides give lists: store tuples so configs hash and compare stably.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        choices = {
            "backbone": BACKBONES,
            "last_stage": ("drop", "stride1", "stride2"),
            "refine_mode": ("adcam", "diffusion_only", "plain_cam"),
            "attention_norm": ("renorm", "raw"),
            "diffusion_direction": ("push", "pull"),
            "seg_arch": tuple(SEG_ARCHS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"adcam: {name}={getattr(self, name)!r}; expected one of {sorted(allowed)}")
        if self.top_k < 1 or self.diffusion_steps < 0:
            raise ValueError("adcam: top_k must be >= 1 and diffusion_steps >= 0")


@register
class ADCAM(Method):
    """AD-CAM behind the common interface; see the module docstring."""

    name = "adcam"
    Config = ADCAMConfig

    def __init__(self, config: ADCAMConfig, dataset: DatasetInfo, device: torch.device) -> None:
        super().__init__(config, dataset, device)
        self.config: ADCAMConfig = config
        self.precision = Precision.of(config, device)  # bf16 / channels_last / compile
        with seeded(0, device):  # structure for networks() / resume; re-initialised per seed in training
            self.cam_net = self._build_cam_net().to(device)
            self.segmenter = self._build_segmenter().to(device)

    # -- construction ------------------------------------------------------------------------
    def _build_cam_net(self) -> CamNet:
        cfg = self.config
        net = build_cam_net(
            cfg.backbone,
            self.dataset.num_classes,
            img_size=cfg.crop,
            pretrained=cfg.pretrained,
            last_stage=cfg.last_stage,  # type: ignore[arg-type]
            drop_path_rate=cfg.drop_path_rate,
            stop_gradient=cfg.stop_gradient,
        )
        return self.precision.module(net)  # channels_last pays on the Conformer's CNN branch

    def _build_segmenter(self) -> DeepLabV2:
        return self.precision.module(DeepLabV2(self.dataset.num_classes + 1, self.config.seg_arch, self.config.seg_pretrained))

    def networks(self) -> dict[str, nn.Module]:
        return {"cam_net": self.cam_net, "segmenter": self.segmenter}

    def macs_inputs(self) -> dict[str, tuple[Any, ...]]:
        size = self.dataset.input_size
        cam_size = math.ceil(size / self.cam_net.size_multiple) * self.cam_net.size_multiple
        return {
            "cam_net": (torch.zeros(1, 3, cam_size, cam_size),),
            "segmenter": (torch.zeros(1, 3, size, size),),
        }

    def crf_params(self) -> CRFParams:
        return SEGMENT_CRF

    # -- stage 1 ------------------------------------------------------------------------------
    def _cam_optimizer(self) -> torch.optim.AdamW:
        """AdamW with one group per (branch, decay): weight decay on weights only, not on
        biases / norms / tokens (1-D parameters)."""
        groups = []
        for branch, params in self.cam_net.branch_parameters().items():
            exempt = {n for n, p in params if p.ndim <= 1 or n.endswith("token")}
            decay = [p for n, p in params if n not in exempt]
            no_decay = [p for n, p in params if n in exempt]
            groups.append({"params": decay, "branch": branch, "weight_decay": self.config.weight_decay})
            groups.append({"params": no_decay, "branch": branch, "weight_decay": 0.0})
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr_vit)

    def _set_cam_lr(self, optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
        cfg = self.config
        for group in optimizer.param_groups:
            if group["branch"] == "cnn":
                group["lr"] = poly_lr(cfg.lr_cnn, step, total, cfg.poly_power)
            else:
                group["lr"] = cfg.lr_vit

    def train_cam(self, train: SampleSource, ctx: StageContext) -> None:
        """Eq. 1 BCE on the CNN (Eq. 4) and transformer (Eq. 5) logits, summed."""
        cfg = self.config
        with seeded(ctx.seed, self.device):
            self.cam_net = self._build_cam_net().to(self.device)
        optimizer = self._cam_optimizer()
        augment = CropAugment(cfg.crop, cfg.scale_range)
        total = cfg.epochs * batches_per_epoch(len(train), cfg.batch_size)
        self.cam_net.train()
        forward = self.precision.train_forward(self.cam_net)
        with seeded(ctx.seed + 1, self.device):
            loop = ResumableLoop(ctx, "cam", {"cam_net": self.cam_net}, {"optimizer": optimizer}, total)
            for step, batch in loop.batches(train, cfg.batch_size, augment, ctx.stream_seed(1)):
                self._set_cam_lr(optimizer, step, total)
                images = normalize(batch.images_on(self.device))
                labels = batch.labels.to(self.device)
                cnn_logits, trans_logits = self.precision.forward(forward, images)  # float32: BCE in float32
                loss_cnn = F.binary_cross_entropy_with_logits(cnn_logits, labels)
                loss_trans = F.binary_cross_entropy_with_logits(trans_logits, labels)
                loss = loss_cnn + loss_trans
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ctx.log_metric("train_cam/loss_cnn", loss_cnn.detach(), step + 1)
                ctx.log_metric("train_cam/loss_transformer", loss_trans.detach(), step + 1)
                ctx.progress(step + 1, total)
        self.cam_net.eval()

    # -- stage 2 ------------------------------------------------------------------------------
    def refined_cams(self, images: torch.Tensor, valid: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised images (B, 3, H, W), sides multiples of the network's ``size_multiple``
        -> AD-CAM on the token grid (B, K, h, w) for every class (Eq. 2, then Eqs. 6-8 per
        ``refine_mode``). ``valid``: the unpadded (H, W); tokens lying wholly in the padding
        are dropped before the diffusion so they neither send nor receive activation, and the
        result covers only the tokens that touch the image."""
        cfg = self.config
        # float32 outputs: normalisation and diffusion run in float32 whatever ``bf16``
        out = self.precision.forward(self.cam_net.extract, images, with_attention=cfg.refine_mode != "plain_cam")
        gh, gw = out.grid
        stride = self.cam_net.token_stride
        vh, vw = (gh, gw) if valid is None else (math.ceil(valid[0] / stride), math.ceil(valid[1] / stride))
        cam = resize_to(F.relu(out.cam), out.grid)[..., :vh, :vw]  # CNN grid -> token grid
        cam = max_normalize(cam)  # Eq. 2
        if cfg.refine_mode == "plain_cam":
            return cam
        B, K = cam.shape[:2]
        attention = patch_attention(out.attention, out.num_prefix, "raw")
        if (vh, vw) != (gh, gw):
            keep = (torch.arange(vh, device=cam.device)[:, None] * gw + torch.arange(vw, device=cam.device)).flatten()
            attention = attention[:, keep][:, :, keep]
        if cfg.attention_norm == "renorm":
            attention = row_normalize(attention)
        refined = adcam_refine(
            cam.flatten(2),
            attention,
            mode=cfg.refine_mode,  # type: ignore[arg-type]
            top_k=cfg.top_k,
            steps=cfg.diffusion_steps,
            direction=cfg.diffusion_direction,  # type: ignore[arg-type]
        )
        return refined.view(B, K, vh, vw)

    def _cam_view(self, images: torch.Tensor, flip: bool) -> torch.Tensor:
        """One scale/flip view (B, 3, h, w) in [0, 1] -> CAM (B, K, h, w), not normalised."""
        if flip:
            images = images.flip(-1)
        padded, (h, w) = pad_to_multiple(normalize(images), self.cam_net.size_multiple)
        cam = self.refined_cams(padded, valid=(h, w))
        stride = self.cam_net.token_stride
        cam = resize_to(cam, (cam.shape[-2] * stride, cam.shape[-1] * stride))[..., :h, :w]
        return cam.flip(-1) if flip else cam

    @torch.no_grad()
    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        self.cam_net.eval()
        images, labels = images.to(self.device), labels.to(self.device)
        H, W = images.shape[-2:]
        total = torch.zeros(images.shape[0], self.dataset.num_classes, H, W, device=self.device)
        for scale in cfg.cam_scales:
            size = (max(1, round(H * scale)), max(1, round(W * scale)))
            view = resize_to(images, size)
            for flip in (False, True) if cfg.cam_flip else (False,):
                total += resize_to(self._cam_view(view, flip), (H, W))
        return max_normalize(mask_absent(F.relu(total), labels)).clamp_(0, 1)

    # -- stage 3 ------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        masks = threshold_masks(cams, labels, self.config.bg_threshold)
        if not self.config.pseudo_crf:
            return masks
        return torch.stack([self._crf_mask(img, m, lab) for img, m, lab in zip(images, masks, labels)]).to(masks.device)

    def _crf_mask(self, image: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Dense CRF with a label unary over background + the present classes only."""
        present = [0] + [int(c) + 1 for c in torch.nonzero(labels > 0).flatten()]
        lookup = np.zeros(self.dataset.num_classes + 1, dtype=np.int64)
        lookup[present] = np.arange(len(present))
        compact = lookup[mask.cpu().numpy()]
        refined = dense_crf_labels(
            to_uint8_image(image), compact, len(present), PSEUDO_CRF, gt_prob=self.config.pseudo_crf_gt_prob
        )
        return torch.from_numpy(np.asarray(present, dtype=np.int64)[refined])

    # -- stage 4 ------------------------------------------------------------------------------
    def _seg_optimizer(self) -> torch.optim.SGD:
        cfg = self.config
        groups = self.segmenter.param_groups()
        mult = cfg.seg_head_lr_mult
        spec = [
            {"params": [p for p in groups["backbone"] if p.requires_grad], "lr_scale": 1.0},
            {"params": groups["head_weight"], "lr_scale": mult},
            {"params": groups["head_bias"], "lr_scale": 2 * mult, "weight_decay": 0.0},
        ]
        return torch.optim.SGD(spec, lr=cfg.seg_lr, momentum=cfg.seg_momentum, weight_decay=cfg.seg_weight_decay)

    def train_seg(self, train: SampleSource, ctx: StageContext) -> None:
        """Per-pixel CE (Eq. 3, ignore 255) on the pseudo masks, SGD + poly, for
        ``seg_iterations`` steps."""
        cfg = self.config
        with seeded(ctx.seed + 2, self.device):
            self.segmenter = self._build_segmenter().to(self.device)
        if cfg.seg_freeze_bn:
            self.segmenter.train()
            self.segmenter.freeze_bn()
        optimizer = self._seg_optimizer()
        forward = self.precision.train_forward(self.segmenter)
        augment = CropAugment(cfg.seg_crop, cfg.seg_scale_range)
        with seeded(ctx.seed + 3, self.device):
            loop = ResumableLoop(ctx, "seg", {"segmenter": self.segmenter}, {"optimizer": optimizer}, cfg.seg_iterations)
            for step, batch in loop.batches(train, cfg.seg_batch_size, augment, ctx.stream_seed(2), with_masks=True):
                self.segmenter.train()
                if cfg.seg_freeze_bn:
                    self.segmenter.freeze_bn()
                lr = poly_lr(cfg.seg_lr, step, cfg.seg_iterations, cfg.seg_poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                logits = self.precision.forward(forward, normalize(batch.images_on(self.device)))
                loss = F.cross_entropy(logits, batch.masks.to(self.device), ignore_index=IGNORE_INDEX)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ctx.log_metric("train_seg/loss", loss.detach(), step + 1)
                ctx.progress(step + 1, cfg.seg_iterations)
        self.segmenter.eval()

    # -- stage 5 ------------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, images: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
        """Single scale: the segmenter's logits. Multi-scale: softmax averaged over
        ``test_scales`` x (flip), returned as log-probabilities (valid logits)."""
        self.segmenter.eval()
        images = normalize(images.to(self.device))
        if not multiscale:
            return self.precision.forward(self.segmenter, images)
        cfg = self.config
        H, W = images.shape[-2:]
        probs = torch.zeros(images.shape[0], self.dataset.num_classes + 1, H, W, device=self.device)
        views = 0
        for scale in cfg.test_scales:
            view = resize_to(images, (max(8, round(H * scale)), max(8, round(W * scale))))
            for flip in (False, True) if cfg.test_flip else (False,):
                logits = self.precision.forward(self.segmenter, view.flip(-1) if flip else view)
                logits = logits.flip(-1) if flip else logits
                probs += resize_to(logits, (H, W)).softmax(1)
                views += 1
        return (probs / views).clamp_min(1e-8).log()

    def cam_threshold(self) -> float | None:
        """The pseudo-mask background plane."""
        return self.config.bg_threshold
