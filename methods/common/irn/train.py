"""IRN training: boundary and displacement branches from confident CAM regions (IRN, Sec. 3-4).

Each step: a batch of augmented crops (random rescale, crop ``crop``, flip:
:class:`methods.common.training.CropAugment`) with their confident-region labels
(:func:`methods.common.irn.labels.confident_labels`, carried as the sample's mask so the crop
and flip apply to both; padding is 255), labels downsampled (nearest) to the stride-4 grid,
pairs within ``train_radius`` split into P+_fg / P+_bg / P-, loss

    L = L_B + L_D_fg + L_D_bg        (IRN paper, Eq. 6)

(:func:`methods.common.irn.affinity.boundary_loss`,
:func:`methods.common.irn.displacement.displacement_losses`), SGD with polynomial decay
(power 0.9) from ``lr``. Batches come from :func:`methods.common.data.training_batches` via
:class:`methods.common.loop.ResumableLoop` (loop name ``irn``), so an interrupted run resumes
at its last mid-stage checkpoint with bit-identical results on CPU.
"""

from __future__ import annotations

import torch

from methods.base import StageContext, SampleSource
from methods.common.data import batches_per_epoch
from methods.common.irn.affinity import affinity, boundary_loss, offsets_within
from methods.common.irn.config import IRNConfig
from methods.common.irn.displacement import displacement_losses
from methods.common.irn.labels import downsample_labels, pair_sets
from methods.common.irn.model import IRNet
from methods.common.loop import ResumableLoop
from methods.common.training import CropAugment, poly_lr, seeded, set_lr
from methods.common.weights import resolve as resolve_weights


def build_model(config: IRNConfig, seed: int) -> IRNet:
    """The network of ``config``, initialised from ``seed`` (the global RNG is left as it was)."""
    with seeded(seed, torch.device("cpu")):  # built on the CPU, moved to the device later
        path = resolve_weights(config.pretrained, config.arch)  # None = random init; "auto" fetches into the cache
        return IRNet(config.arch, str(path) if path else None, config.edge_dim, config.disp_dim, config.freeze_backbone)


def irn_loss(model: IRNet, images: torch.Tensor, labels: torch.Tensor, offsets: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The three loss terms and their sum for images (B, 3, S, S) in [0, 1] and confident
    labels (B, S, S) int64 in {0..C, 255}."""
    boundary, disp = model(images)
    grid = downsample_labels(labels, tuple(boundary.shape[-2:]))
    pos_fg, pos_bg, neg = pair_sets(grid, offsets)
    aff, _ = affinity(boundary[:, 0], offsets)
    terms = {"irn_loss_boundary": boundary_loss(aff, pos_fg, pos_bg, neg)}
    terms["irn_loss_disp_fg"], terms["irn_loss_disp_bg"] = displacement_losses(disp, offsets, pos_fg, pos_bg)
    terms["irn_loss"] = sum(terms.values())  # type: ignore[assignment]
    return terms


def train_irn(model: IRNet, source: SampleSource, config: IRNConfig, ctx: StageContext) -> None:
    """Train ``model`` in place on ``source`` (whose ``mask`` is the confident-region label).

    Logs ``irn_loss*`` per step through ``ctx.log_metric``; reports progress per step."""
    model.to(ctx.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    total = config.epochs * batches_per_epoch(len(source), config.batch_size)
    loop = ResumableLoop(ctx, "irn", {"model": model}, {"sgd": optimizer}, total)
    augment = CropAugment(config.crop, (config.scale_min, config.scale_max), flip=True)
    offsets = offsets_within(config.train_radius, half=True)
    for step, batch in loop.batches(source, config.batch_size, augment, ctx.stream_seed(31), with_masks=True):
        set_lr(optimizer, poly_lr(config.lr, step, total))
        terms = irn_loss(model, batch.images_on(ctx.device), batch.masks.to(ctx.device), offsets)
        optimizer.zero_grad(set_to_none=True)
        terms["irn_loss"].backward()
        optimizer.step()
        for name, value in terms.items():
            ctx.log_metric(name, value.detach(), step)
        ctx.progress(step + 1, total)
    model.eval()
