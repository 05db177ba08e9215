"""WeakTr (Zhu et al., TIP 2023) behind the common five-stage interface.

Stage 1 ``train_cam``: the C-class-token ViT with adaptive attention fusion, trained end to end
with three multilabel soft-margin losses. ``cams``: fine CAM, multi-scale + flip, min-max per
present class. ``pseudo_masks``: background threshold + dense CRF with the label unary.
Stage 2 ``train_seg``: online retraining of a Segmenter with the gradient-clipping loss.
``segment``: sliding-window (multi-scale + flip) inference, optional two-block combination.

Defaults are the fast synthetic recipe; the paper's values are in the ``[methods.weaktr]`` table of ``benchmarks/voc.toml``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import (
    CRFParams, DatasetInfo, IGNORE_INDEX, Method, MethodConfig, SampleSource, StageContext, register, to_uint8_image,
)
from methods.common.crf import dense_crf_labels
from methods.common.data import batches_per_epoch
from methods.common.loop import ResumableLoop
from methods.common.precision import Precision, PrecisionOptions
from methods.common.training import (
    CropAugment, normalize, poly_lr, seeded, set_lr, threshold_masks, warmup_cosine_lr,
)
from methods.common.vit import POS_RESAMPLE_RULES
from methods.common.weights import weights_field
from methods.weaktr.aaf import AAF_PRIORS
from methods.weaktr.augment import SegAugment, TimmCamAugment
from methods.weaktr.cam import multiscale_cams, weaktr_loss
from methods.weaktr.gradient_clipping import check_patch_size, gradient_clipping_loss
from methods.weaktr.model import WeakTrCAMNet, resolve_pretrained
from methods.weaktr.segmenter import Segmenter, segment_probs, transfer_backbone

# Pseudo-label CRF of the authors' code for VOC (METHODS.md): Gaussian 4/3, bilateral 83/5/3, 10
# iterations; their COCO run uses 3/3 and 50/5/10 (config fields pseudo_crf_*).
PSEUDO_LABEL_CRF = CRFParams(
    gaussian_sxy=4.0, gaussian_compat=3.0, bilateral_sxy=83.0, bilateral_srgb=5.0, bilateral_compat=3.0, iterations=10
)
CAM_EPOCH_SELECTIONS = ("last", "oracle")
CRF_PROTOCOLS = ("code", "softmax")


@dataclass
class WeakTrConfig(MethodConfig, PrecisionOptions):
    """WeakTr hyper-parameters. Defaults: the fast synthetic recipe (tiny ViT, 96 px, CPU)."""

    # -- stage 1: CAM network ---------------------------------------------------------------
    arch: str = "vit_synth"  # ViT of methods.common.vit.VIT_ARCHS (paper: deit_small)
    pretrained: str | None = weights_field("arch")  # single-cls-token checkpoint path, "auto", or none (random init)
    cam_crop: int = 96  # training crop side (paper 224)
    cam_augment: str = "crop"  # "crop": common CropAugment; "timm": the DeiT recipe (paper)
    cam_scale_range: tuple[float, float] = (0.7, 1.3)  # CropAugment rescale range ("crop" only)
    cam_epochs: int = 20
    cam_max_steps: int = 0  # cap on optimizer steps (0 = none), for smoke tests
    cam_batch_size: int = 16
    cam_lr: float = 0.064  # base lr; effective lr = cam_lr * batch / 512 (code: 6e-4 VOC, 2e-4 COCO)
    cam_min_lr: float = 1e-5
    cam_weight_decay: float = 0.03  # code 0.03 (paper text 0.05)
    cam_warmup_epochs: int = 1  # paper 5
    drop_path: float = 0.0  # paper 0.1
    aaf: bool = True  # False: the paper's mean-sum baseline fusion (Table 4)
    aaf_prior: str = "features"  # features (code) | attention_avg | attention_max | random_fixed
    aaf_hidden: int = 0  # FFN hidden size; 0 = maps // 8 (code: 9 for 72 maps; paper 18)
    aaf_feat_hidden: int = 8  # width of the per-head feature projection (code 8)
    pos_resample: str = "offset_bicubic"  # position embeddings per input grid (code); "timm" | "bilinear"
    cam_epoch_selection: str = "last"  # "oracle": keep the epoch with the best CAM mIoU on pixel labels (code)
    # -- CAM inference and pseudo labels ---------------------------------------------------
    cam_scales: tuple[float, ...] = (1.0, 1.2)  # VOC (1.0, 1.2), COCO (1.0, 0.8, 1.2)
    cam_flip: bool = True
    bg_threshold: float = 0.43  # VOC 0.43, COCO 0.42
    pseudo_crf: bool = True  # refine the thresholded seeds with the label-unary dense CRF
    pseudo_crf_gt_prob: float = 0.7
    # pseudo-label CRF kernels (code: VOC 4/3 & 83/5/3; COCO 3/3 & 50/5/10), 10 iterations
    pseudo_crf_gaussian_sxy: float = 4.0
    pseudo_crf_gaussian_compat: float = 3.0
    pseudo_crf_bilateral_sxy: float = 83.0
    pseudo_crf_bilateral_srgb: float = 5.0
    pseudo_crf_bilateral_compat: float = 3.0
    # -- stage 2: online retraining --------------------------------------------------------
    seg_arch: str = "vit_synth"  # paper: deit_small (or vit_small)
    seg_pretrained: str | None = weights_field("seg_arch")
    seg_init_from_cam: bool = True  # not in the paper: start the encoder from the CAM backbone
    seg_pos_resample: str = "bilinear"  # Segmenter position embeddings (code: bilinear); "timm" | "offset_bicubic"
    seg_crop: int = 96  # paper 480
    seg_base_size: int = 0  # short side before the random rescale and at test (paper 520; 0 = native)
    seg_scale_range: tuple[float, float] = (0.5, 2.0)
    seg_cat_max_ratio: float = 0.75
    seg_photometric: bool = True
    seg_decoder_depth: int = 2
    seg_decoder_dim: int = 0  # 0 = encoder width (paper 384)
    seg_decoder_heads: int = 0  # 0 = encoder heads (paper 6)
    seg_decoder_ffn: int = 0  # 0 = 4 x dim (paper 1536)
    seg_dropout: float = 0.1
    seg_drop_path: float = 0.0  # paper 0.1
    grad_clip: bool = True  # False: plain cross-entropy ("naive decoder", paper Table 5)
    tau: float = 0.4  # clipping start value (paper 1.2, for an ImageNet-pretrained encoder)
    clip_patch: int = 48  # S, must divide seg_crop (paper 120 for 480)
    seg_lr: float = 0.01  # paper 1e-4
    seg_min_lr: float = 1e-5
    seg_encoder_lr_factor: float = 1.0  # paper 0.1
    seg_momentum: float = 0.9
    seg_weight_decay: float = 0.0
    seg_batch_size: int = 8  # paper 4
    seg_epochs: int = 10  # paper 100 (VOC train_aug)
    seg_max_steps: int = 0
    # -- segmentation inference ------------------------------------------------------------
    test_scales: tuple[float, ...] = (0.75, 1.0, 1.25)  # paper 0.5-1.75 in 0.25 steps
    test_flip: bool = True
    window: int = 96  # sliding window (paper 480)
    stride: int = 64  # (paper 320)
    two_block: bool = True  # combine the decoder blocks' predictions as 0.8 * p1 + p2 (code)
    two_block_weight: float = 0.8
    # -- dense CRF for the "+CRF" val protocol (VOC values; COCO 1/3 and 67/3/4) --------------
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 83.0
    crf_bilateral_srgb: float = 5.0
    crf_bilateral_compat: float = 3.0
    crf_protocol: str = "code"  # "code": predicted classes, un-normalised 0.8 p1 + p2; "softmax": harness default
    # -- numerics: bf16, channels_last, compile (methods.common.precision.PrecisionOptions) --


def _param_groups(model: nn.Module, weight_decay: float, lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Decay for weight matrices only; none for biases, norms, tokens and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "cls_emb"))
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]


def _steps(n_samples: int, batch: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """(steps per epoch with drop_last, total steps capped by ``max_steps``)."""
    if n_samples == 0:
        raise ValueError("WeakTr: the training split is empty")
    per_epoch = batches_per_epoch(n_samples, batch)
    total = per_epoch * epochs
    return per_epoch, min(total, max_steps) if max_steps > 0 else total


@register
class WeakTr(Method):
    name = "weaktr"
    Config = WeakTrConfig

    def __init__(self, config: WeakTrConfig, dataset: DatasetInfo, device: torch.device) -> None:
        super().__init__(config, dataset, device)
        self.config: WeakTrConfig = config
        self._validate()
        self.precision = Precision.of(config, device)
        with seeded(0, device):  # deterministic placeholders; training re-initialises from the trial seed
            self.cam_net = self._build_cam_net()
            self.segmenter = self._build_segmenter()

    # -- construction ---------------------------------------------------------------------
    def _validate(self) -> None:
        cfg = self.config
        if cfg.aaf_prior not in AAF_PRIORS:
            raise ValueError(f"aaf_prior must be one of {AAF_PRIORS}, got {cfg.aaf_prior!r}")
        if cfg.cam_augment not in ("crop", "timm"):
            raise ValueError(f"cam_augment must be 'crop' or 'timm', got {cfg.cam_augment!r}")
        if cfg.two_block and cfg.seg_decoder_depth < 2:
            raise ValueError("two_block needs seg_decoder_depth >= 2")
        if cfg.grad_clip:
            check_patch_size(cfg.seg_crop, cfg.seg_crop, cfg.clip_patch)
        if cfg.seg_init_from_cam and cfg.seg_arch != cfg.arch:
            raise ValueError(f"seg_init_from_cam needs seg_arch == arch, got {cfg.seg_arch!r} vs {cfg.arch!r}")
        if cfg.stride <= 0 or cfg.stride > cfg.window:
            raise ValueError(f"sliding window stride must be in (0, window={cfg.window}], got {cfg.stride}")
        for name in ("pos_resample", "seg_pos_resample"):
            if getattr(cfg, name) not in POS_RESAMPLE_RULES:
                raise ValueError(f"{name} must be one of {POS_RESAMPLE_RULES}, got {getattr(cfg, name)!r}")
        if cfg.cam_epoch_selection not in CAM_EPOCH_SELECTIONS:
            raise ValueError(f"cam_epoch_selection must be one of {CAM_EPOCH_SELECTIONS}, got {cfg.cam_epoch_selection!r}")
        if cfg.crf_protocol not in CRF_PROTOCOLS:
            raise ValueError(f"crf_protocol must be one of {CRF_PROTOCOLS}, got {cfg.crf_protocol!r}")

    def _build_cam_net(self) -> WeakTrCAMNet:
        cfg = self.config
        net = WeakTrCAMNet(
            self.dataset.num_classes, cfg.arch, cfg.cam_crop, cfg.drop_path, cfg.pretrained, cfg.aaf,
            cfg.aaf_prior, cfg.aaf_hidden, cfg.aaf_feat_hidden, cfg.pos_resample,
        ).to(self.device)
        return self.precision.module(net)

    def _build_segmenter(self) -> Segmenter:
        cfg = self.config
        net = Segmenter(
            self.dataset.num_classes + 1, cfg.seg_arch, cfg.seg_crop, cfg.seg_drop_path,
            resolve_pretrained(cfg.seg_pretrained, cfg.seg_arch), cfg.seg_decoder_depth, cfg.seg_decoder_dim,
            cfg.seg_decoder_heads, cfg.seg_decoder_ffn, cfg.seg_dropout, cfg.seg_pos_resample,
        ).to(self.device)
        return self.precision.module(net)

    # -- stage 1 ----------------------------------------------------------------------------
    def train_cam(self, train: SampleSource, ctx: StageContext) -> None:
        with seeded(ctx.seed * 1000 + 11, self.device):
            self.cam_net = self._build_cam_net()
            self._fit_cam(train, ctx)

    def _fit_cam(self, train: SampleSource, ctx: StageContext) -> None:
        cfg, net = self.config, self.cam_net
        timm_aug = cfg.cam_augment == "timm"
        augment = TimmCamAugment(cfg.cam_crop) if timm_aug else CropAugment(cfg.cam_crop, tuple(cfg.cam_scale_range))
        per_epoch, total = _steps(len(train), cfg.cam_batch_size, cfg.cam_epochs, cfg.cam_max_steps)
        lr = cfg.cam_lr * cfg.cam_batch_size / 512.0  # the code's linear scaling rule
        optimizer = torch.optim.AdamW(_param_groups(net, cfg.cam_weight_decay), lr=lr)
        selector = _OracleEpochSelector(net, ctx) if cfg.cam_epoch_selection == "oracle" else None
        state = {"cam_net": net} | ({"oracle": selector} if selector is not None else {})
        net.train()
        forward = self.precision.train_forward(net)
        loop = ResumableLoop(ctx, "cam", state, {"optimizer": optimizer}, total)
        for step, batch in loop.batches(train, cfg.cam_batch_size, augment, ctx.stream_seed(1)):
            set_lr(optimizer, warmup_cosine_lr(lr, step, total, cfg.cam_warmup_epochs * per_epoch, cfg.cam_min_lr))
            images = batch.images_on(self.device)
            images = images if timm_aug else normalize(images)
            labels = batch.labels.to(self.device)
            out = self.precision.forward(forward, images)  # float32 outputs: the losses run in float32
            loss, parts = weaktr_loss(out.cls_logits, out.coarse_logits, out.fine_logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ctx.log_metric("cam/loss", loss.detach(), step + 1)
            for key, value in parts.items():
                ctx.log_metric(f"cam/loss_{key}", value, step + 1)
            ctx.progress(step + 1, total)
            if selector is not None and ((step + 1) % per_epoch == 0 or step + 1 == total):
                selector.score_epoch(step // per_epoch + 1)
        if selector is not None:
            selector.restore_best(-(-total // per_epoch), total)
        net.eval()

    @torch.no_grad()
    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg, net = self.config, self.cam_net
        net.eval()
        x = images.to(self.device).float()
        y = labels.to(self.device).float()

        def fine(view: torch.Tensor) -> torch.Tensor:
            return self.precision.forward(net, normalize(view)).fine_cam

        out = multiscale_cams(fine, x, y, cfg.cam_scales, cfg.cam_flip, net.patch_size)
        return out.to(images.device)

    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        seeds = threshold_masks(cams.detach().float().cpu(), labels.cpu(), cfg.bg_threshold)
        if not cfg.pseudo_crf:
            return seeds.to(cams.device)
        params = self.pseudo_crf_params()
        refined = [
            refine_seed_crf(to_uint8_image(img), seed.numpy(), lab.numpy(), cfg.pseudo_crf_gt_prob, params)
            for img, seed, lab in zip(images.cpu(), seeds, labels.cpu())
        ]
        return torch.from_numpy(np.stack(refined)).to(cams.device)

    def pseudo_crf_params(self) -> CRFParams:
        """The pseudo-label CRF kernels of the config (``pseudo_crf_*``), 10 iterations."""
        cfg = self.config
        return CRFParams(
            gaussian_sxy=cfg.pseudo_crf_gaussian_sxy, gaussian_compat=cfg.pseudo_crf_gaussian_compat,
            bilateral_sxy=cfg.pseudo_crf_bilateral_sxy, bilateral_srgb=cfg.pseudo_crf_bilateral_srgb,
            bilateral_compat=cfg.pseudo_crf_bilateral_compat, iterations=10,
        )

    # -- stage 2 ----------------------------------------------------------------------------
    def train_seg(self, train: SampleSource, ctx: StageContext) -> None:
        cfg = self.config
        with seeded(ctx.seed * 1000 + 22, self.device):
            self.segmenter = self._build_segmenter()
            if cfg.seg_init_from_cam:
                transfer_backbone(self.cam_net.backbone, self.segmenter.encoder)
            self._fit_seg(train, ctx)

    def _fit_seg(self, train: SampleSource, ctx: StageContext) -> None:
        cfg, net = self.config, self.segmenter
        augment = SegAugment(
            cfg.seg_crop, cfg.seg_base_size, tuple(cfg.seg_scale_range), cfg.seg_cat_max_ratio, cfg.seg_photometric
        )
        groups = _param_groups(net.encoder, cfg.seg_weight_decay, cfg.seg_encoder_lr_factor)
        groups += _param_groups(net.decoder, cfg.seg_weight_decay, 1.0)
        optimizer = torch.optim.SGD(groups, lr=cfg.seg_lr, momentum=cfg.seg_momentum, nesterov=True)
        _, total = _steps(len(train), cfg.seg_batch_size, cfg.seg_epochs, cfg.seg_max_steps)
        net.train()
        forward = self.precision.train_forward(net)
        loop = ResumableLoop(ctx, "seg", {"segmenter": net}, {"optimizer": optimizer}, total)
        for step, batch in loop.batches(train, cfg.seg_batch_size, augment, ctx.stream_seed(2), with_masks=True):
            set_lr(optimizer, poly_lr(cfg.seg_lr, step, total, 0.9, cfg.seg_min_lr))
            images = normalize(batch.images_on(self.device))
            masks = batch.masks.to(self.device)
            logits = self.precision.forward(forward, images)
            if cfg.grad_clip:
                result = gradient_clipping_loss(logits, masks, cfg.tau, cfg.clip_patch)
                loss = result.loss
                ctx.log_metric("seg/clipped_fraction", result.clipped_fraction, step + 1)
            else:
                loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ctx.log_metric("seg/loss", loss.detach(), step + 1)
            ctx.progress(step + 1, total)
        net.eval()

    @torch.no_grad()
    def segment(self, images: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
        cfg, net = self.config, self.segmenter
        net.eval()
        x = normalize(images.to(self.device).float())
        ratios = tuple(cfg.test_scales) if multiscale else (1.0,)

        def window_forward(crop: torch.Tensor, all_blocks: bool = False) -> Any:
            return self.precision.forward(net, crop, all_blocks=all_blocks)  # float32 logits

        probs = segment_probs(
            window_forward, x, ratios, cfg.test_flip and multiscale, cfg.window, cfg.stride, cfg.seg_base_size,
            cfg.two_block, cfg.two_block_weight,
        )
        # log of the averaged probabilities: softmax of it gives those probabilities back.
        return probs.float().clamp_min(1e-8).log().to(images.device)

    # -- state and cost ---------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {"cam_net": self.cam_net, "segmenter": self.segmenter}

    def macs_inputs(self) -> dict[str, tuple[Any, ...]]:
        p = self.cam_net.patch_size
        size = max(p, self.dataset.input_size // p * p)
        return {
            "cam_net": (torch.zeros(1, 3, size, size, device=self.device),),
            "segmenter": (torch.zeros(1, 3, self.config.seg_crop, self.config.seg_crop, device=self.device),),
        }

    def crf_params(self) -> CRFParams:
        cfg = self.config
        return CRFParams(
            gaussian_sxy=cfg.crf_gaussian_sxy, gaussian_compat=cfg.crf_gaussian_compat,
            bilateral_sxy=cfg.crf_bilateral_sxy, bilateral_srgb=cfg.crf_bilateral_srgb,
            bilateral_compat=cfg.crf_bilateral_compat, iterations=10,
        )

    def crf_inputs(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``+CRF`` protocol's CRF input. ``crf_protocol="code"`` (the authors' ``miou.py`` /
        ``make_crf.py``): see :func:`code_crf_inputs`; ``"softmax"``: the harness default (all
        classes, normalised probabilities)."""
        if self.config.crf_protocol == "softmax":
            return super().crf_inputs(probs)
        weight = self.config.two_block_weight if self.config.two_block else 0.0
        return code_crf_inputs(probs, 1.0 + weight)

    def cam_threshold(self) -> float | None:
        """The pseudo-label background threshold (VOC 0.43, COCO 0.42)."""
        return self.config.bg_threshold



def code_crf_inputs(probs: np.ndarray, total: float) -> tuple[np.ndarray, np.ndarray]:
    """WeakTr's "+CRF" input (authors' code): the un-normalised prediction ``0.8 p1 + p2``
    restricted to the classes that win somewhere in its argmax, clipped to [1e-5, inf)
    (``unary_from_softmax``'s lower clip; the CRF's own [., 1] clip then caps values above 1,
    which the normalised input never reaches).

    ``probs`` (K, H, W): the normalised prediction, summing to 1 per pixel (``segment`` divides
    ``w p1 + p2`` by ``1 + w``); ``total`` = ``1 + w`` undoes it (1 without two blocks).
    Returns (``unary`` (k, H, W) float32, ``classes`` (k,) int64 ascending)."""
    classes = np.unique(probs.argmax(0)).astype(np.int64)
    unary = np.clip(probs[classes] * total, 1e-5, None).astype(np.float32)
    return unary, classes


class _OracleEpochSelector:
    """``cam_epoch_selection="oracle"`` (authors' ``main.py``): after every CAM epoch, score the
    CAMs on the cam-eval split with pixel labels (``StageContext.score_cams``) and keep a copy
    of the network whenever the score beats every earlier one strictly (a tie keeps the earlier
    epoch); at the end the kept copy is restored. Logged as ``cam/epoch_miou`` per epoch and
    ``cam_selected_epoch`` / ``cam_selected_miou`` at the end: an oracle model choice."""

    def __init__(self, net: nn.Module, ctx: StageContext) -> None:
        if ctx.score_cams is None:
            raise RuntimeError(
                "WeakTr: cam_epoch_selection='oracle' scores each epoch's CAMs with pixel labels, but this "
                "harness gives no StageContext.score_cams; use cam_epoch_selection='last'"
            )
        self.net, self.ctx = net, ctx
        self.best_score, self.best_epoch = float("-inf"), 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def score_epoch(self, epoch: int) -> None:
        """Score the network as it is after ``epoch`` (1-based) and keep it if it is the best."""
        self.net.eval()
        score = float(self.ctx.score_cams())
        self.net.train()
        self.ctx.log_metric("cam/epoch_miou", score, epoch)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = copy.deepcopy(self.net.state_dict())

    def state_dict(self) -> dict[str, object]:
        """What a mid-stage checkpoint keeps of the selection (see ``ResumableLoop``)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.best_score, self.best_epoch = float(state["best_score"]), int(state["best_epoch"])
        self.best_state = state["best_state"]

    def restore_best(self, last_epoch: int, step: int) -> None:
        """Load the kept network; with no finite score at all (no pixel labels) keep the last."""
        if self.best_state is None:
            self.ctx.log_metric("cam_selected_epoch", float(last_epoch), step)
            return
        self.net.load_state_dict(self.best_state)
        self.ctx.log_metric("cam_selected_epoch", float(self.best_epoch), step)
        self.ctx.log_metric("cam_selected_miou", self.best_score, step)


def refine_seed_crf(
    image: np.ndarray, seed: np.ndarray, labels: np.ndarray, gt_prob: float = 0.7, params: CRFParams = PSEUDO_LABEL_CRF
) -> np.ndarray:
    """Pseudo-label CRF (METHODS.md, code): the seed mask (H, W) in {0..C} as a label unary with
    confidence ``gt_prob``, over background + the image's present classes only, with ``params``
    (default the code's VOC kernels: Gaussian 4/3, bilateral 83/5/3, 10 iterations). Returns
    (H, W) int64 in {0..C}."""
    present = np.concatenate([[0], np.flatnonzero(labels > 0) + 1])
    if len(present) == 1:
        return np.zeros_like(seed, dtype=np.int64)
    # Seeds hold only present classes (absent CAMs are zero); anything else would map to background.
    compact = np.zeros(len(labels) + 1, dtype=np.int64)
    compact[present] = np.arange(len(present))
    refined = dense_crf_labels(image, compact[seed], len(present), params, gt_prob=gt_prob)
    return present[refined].astype(np.int64)
