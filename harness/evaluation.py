"""Segmentation metrics: mIoU under two named conventions, the CAM background-threshold
sweep, and CRF-refined evaluation.

Every number comes from a confusion matrix over the ``C + 1`` classes (index 0 is
background, ``c + 1`` foreground class ``c``), rows ground truth and columns prediction,
counted only on pixels whose ground truth is not :data:`IGNORE_INDEX` (255).

Two mIoU conventions exist in the literature and both are always computed and reported
(:class:`SegmentationScores` carries both); :data:`DEFAULT_CONVENTION` is the one used
wherever a single number is chosen (e.g. the best threshold of a sweep):

* ``"present"`` (WeakTr): mean IoU over the classes that occur in the ground truth *or* the
  prediction (``nanmean`` over classes with a non-empty union). A class predicted but absent
  from the ground truth counts with IoU 0.
* ``"gt"`` (AFA): mean IoU over the classes with ground-truth pixels only. False positives of
  classes absent from the ground truth lower other classes' IoU (via background's column) but
  add no zero of their own, so ``miou_gt >= miou_present`` for the same confusion.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from methods.base import IGNORE_INDEX, CRFParams
from methods.common.crf import dense_crf_many

__all__ = [
    "Convention",
    "DEFAULT_CONVENTION",
    "CONVENTIONS",
    "SegmentationScores",
    "SegmentationMetric",
    "SweepResult",
    "CamThresholdSweep",
    "SWEEP_LIMIT",
    "SWEEP_EXTENSION",
    "default_thresholds",
    "extend_until_interior",
    "scores_from_confusion",
    "evaluate_with_crf",
]

ArrayLike = torch.Tensor | np.ndarray


class Convention(enum.StrEnum):
    """How per-class IoUs are averaged into mIoU (see the module docstring)."""

    PRESENT = "present"  # WeakTr: classes in GT or prediction
    GT = "gt"  # AFA: classes with GT pixels


DEFAULT_CONVENTION: Convention = Convention.PRESENT
CONVENTIONS: tuple[Convention, ...] = tuple(Convention)


def _convention(value: str | Convention) -> Convention:
    """Parse a convention name, with a clear error for unknown ones."""
    try:
        return Convention(value)
    except ValueError:
        names = ", ".join(c.value for c in Convention)
        raise ValueError(f'unknown mIoU convention "{value}"; valid: {names}') from None


# -- confusion -> scores ---------------------------------------------------------------------


def _per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU per class of one or a stack of confusions ``(..., K, K)``; nan where union is 0."""
    conf = confusion.astype(np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over the last axis where ``mask``; nan where nothing is selected."""
    count = mask.sum(-1)
    total = np.where(mask, values, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _mean_iou(confusion: np.ndarray, iou: np.ndarray, convention: Convention) -> np.ndarray:
    """mIoU of one or a stack of confusions under ``convention``."""
    if convention is Convention.GT:
        return _masked_mean(iou, confusion.sum(-1) > 0)
    return _masked_mean(iou, ~np.isnan(iou))


@dataclass
class SegmentationScores:
    """Scores of one confusion matrix (rows GT, columns prediction, ``C + 1`` classes)."""

    confusion: np.ndarray  # (C+1, C+1) int64
    per_class_iou: np.ndarray  # (C+1,) float64, nan for classes absent from GT and prediction
    miou_present: float
    miou_gt: float
    pixel_accuracy: float

    def miou(self, convention: str | Convention = DEFAULT_CONVENTION) -> float:
        """mIoU under ``convention`` (``"present"`` or ``"gt"``)."""
        conv = _convention(convention)
        return self.miou_present if conv is Convention.PRESENT else self.miou_gt

    @property
    def num_pixels(self) -> int:
        """Number of evaluated (non-ignored) pixels."""
        return int(self.confusion.sum())

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalar metrics for logging: both mIoU conventions and pixel accuracy."""
        return {
            f"{prefix}miou_present": self.miou_present,
            f"{prefix}miou_gt": self.miou_gt,
            f"{prefix}pixel_accuracy": self.pixel_accuracy,
        }


def scores_from_confusion(confusion: np.ndarray) -> SegmentationScores:
    """Build :class:`SegmentationScores` from a ``(K, K)`` confusion (rows GT, cols pred)."""
    conf = np.asarray(confusion, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion must be square (K, K), got shape {conf.shape}")
    iou = _per_class_iou(conf)
    total = conf.sum()
    return SegmentationScores(
        confusion=conf,
        per_class_iou=iou,
        miou_present=float(_mean_iou(conf, iou, Convention.PRESENT)),
        miou_gt=float(_mean_iou(conf, iou, Convention.GT)),
        pixel_accuracy=float(np.trace(conf) / total) if total > 0 else float("nan"),
    )


# -- input checks ----------------------------------------------------------------------------


def _as_tensor(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """numpy or torch -> torch on ``device`` (no copy when already there)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.to(device)


def _check_target(target: torch.Tensor, num_classes: int, shape: tuple[int, ...]) -> None:
    """Target must be an integer (B, H, W) map in {0..C, 255} of the expected shape."""
    if tuple(target.shape) != shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match prediction shape {shape}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer label map, got dtype {target.dtype}")
    bad = ((target < 0) | (target > num_classes)) & (target != IGNORE_INDEX)
    if bool(bad.any()):
        values = torch.unique(target[bad])[:10].tolist()
        raise ValueError(
            f"target has values {values} outside {{0..{num_classes}, {IGNORE_INDEX}}} "
            f"(num_classes={num_classes} foreground classes + background)"
        )


def _confusion_bincount(gt: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """(K, K) int64 confusion of flat, already-valid ``gt`` / ``pred`` in [0, K)."""
    index = gt.long() * k + pred.long()
    return torch.bincount(index, minlength=k * k).reshape(k, k)


# -- fixed predictions -------------------------------------------------------------------------


class SegmentationMetric(Metric):
    """Accumulating confusion-matrix metric for ``(B, H, W)`` label maps (torchmetrics style).

    ``num_classes`` is C, the number of *foreground* classes; the confusion is ``C + 1``
    square with background at index 0. Pixels whose target is 255 are excluded. Predictions
    must lie in ``{0..C}`` on the evaluated pixels; a prediction of 255 (a pseudo mask's
    ignore) raises unless ``pred_ignore_as`` names the class to count it as (e.g. 0 to
    count ignored pseudo-mask pixels as background, which never inflates the score the way
    dropping them would) or ``drop_pred_ignore`` excludes those pixels from the confusion
    (AFA's evaluator: a pixel the pseudo mask is unsure about is not scored).

    ``compute()`` returns :class:`SegmentationScores` with both mIoU conventions. The state
    is a summed confusion, so it syncs across processes like any torchmetrics metric.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    confusion: torch.Tensor

    def __init__(
        self, num_classes: int, *, pred_ignore_as: int | None = None, drop_pred_ignore: bool = False, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground classes) must be >= 1, got {num_classes}")
        if pred_ignore_as is not None and not 0 <= pred_ignore_as <= num_classes:
            raise ValueError(f"pred_ignore_as must be in 0..{num_classes}, got {pred_ignore_as}")
        if pred_ignore_as is not None and drop_pred_ignore:
            raise ValueError("pass pred_ignore_as or drop_pred_ignore, not both")
        self.num_classes = num_classes
        self.pred_ignore_as = pred_ignore_as
        self.drop_pred_ignore = drop_pred_ignore
        k = num_classes + 1
        self.add_state("confusion", default=torch.zeros(k, k, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add a batch: ``pred`` and ``target`` integer maps of the same shape ``(B, H, W)``."""
        pred = _as_tensor(pred, self.confusion.device)
        target = _as_tensor(target, self.confusion.device)
        if pred.dtype.is_floating_point or pred.dtype == torch.bool:
            raise ValueError(f"pred must be an integer label map (argmax the logits), got {pred.dtype}")
        _check_target(target, self.num_classes, tuple(pred.shape))
        valid = target != IGNORE_INDEX
        gt, pr = target[valid], pred[valid]
        if self.pred_ignore_as is not None:
            pr = torch.where(pr == IGNORE_INDEX, torch.full_like(pr, self.pred_ignore_as), pr)
        elif self.drop_pred_ignore:
            keep = pr != IGNORE_INDEX
            gt, pr = gt[keep], pr[keep]
        bad = (pr < 0) | (pr > self.num_classes)
        if bool(bad.any()):
            values = torch.unique(pr[bad])[:10].tolist()
            raise ValueError(
                f"pred has values {values} outside {{0..{self.num_classes}}} on evaluated pixels"
                + (" (pass pred_ignore_as or drop_pred_ignore for 255)" if IGNORE_INDEX in values else "")
            )
        self.confusion += _confusion_bincount(gt, pr, self.num_classes + 1)

    def compute(self) -> SegmentationScores:
        """Scores of everything accumulated since the last ``reset()``."""
        return scores_from_confusion(self.confusion.cpu().numpy())


# -- CAM background-threshold sweep ------------------------------------------------------------


def default_thresholds(start: float = 0.0, stop: float = 0.60, step: float = 0.01) -> np.ndarray:
    """Thresholds ``start, start+step, ... <= stop`` (inclusive), rounded to 1e-6.

    The default grid 0.00..0.60 is the full sweep; it deliberately does not stop at the first
    non-improvement (WeakTr's 0.40-0.59 early stop can miss a later maximum).
    """
    if step <= 0 or stop < start:
        raise ValueError(f"bad threshold range start={start} stop={stop} step={step}")
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    return np.round(start + step * np.arange(n), 6)


@dataclass
class SweepResult:
    """Outcome of a CAM background-threshold sweep.

    ``best_*`` is an **oracle**: the threshold is chosen on the same pixel labels it is scored
    on (pixel supervision, WeakTr #32). Report it beside :meth:`at` a fixed, pre-declared
    threshold, and say which is which.
    """

    thresholds: np.ndarray  # (T,) ascending
    confusions: np.ndarray  # (T, C+1, C+1) int64
    convention: Convention  # the convention ``curve`` and ``best_*`` use
    curves: dict[Convention, np.ndarray]  # (T,) mIoU per threshold, both conventions
    best_index: int
    scores_at_best: SegmentationScores = field(repr=False)

    @property
    def curve(self) -> np.ndarray:
        """mIoU per threshold under :attr:`convention`."""
        return self.curves[self.convention]

    @property
    def best_threshold(self) -> float:
        """Oracle: the threshold maximising :attr:`curve` (lowest one on ties)."""
        return float(self.thresholds[self.best_index])

    @property
    def best_miou(self) -> float:
        """Oracle: the maximum of :attr:`curve`."""
        return float(self.curve[self.best_index])

    def index(self, threshold: float) -> int:
        """Position of ``threshold`` in the grid (to 1e-6), or ValueError."""
        hits = np.flatnonzero(np.abs(self.thresholds - threshold) < 1e-6)
        if hits.size == 0:
            lo, hi = self.thresholds[0], self.thresholds[-1]
            n = len(self.thresholds)
            raise ValueError(f"threshold {threshold} is not on the sweep grid ({lo}..{hi}, {n} values)")
        return int(hits[0])

    def at(self, threshold: float) -> SegmentationScores:
        """Scores at a fixed threshold of the grid (the non-oracle number)."""
        return scores_from_confusion(self.confusions[self.index(threshold)])

    @property
    def num_pixels(self) -> int:
        """Evaluated (GT != 255) pixels; the same at every threshold. 0: nothing to score."""
        return int(self.confusions[0].sum()) if len(self.confusions) else 0

    def upto(self, count: int) -> "SweepResult":
        """The sweep over its first ``count`` thresholds only, best re-chosen in that range."""
        if not 1 <= count <= len(self.thresholds):
            raise ValueError(f"count must be in 1..{len(self.thresholds)}, got {count}")
        return _sweep_result(self.thresholds[:count].copy(), self.confusions[:count], self.convention)


def _sweep_result(thresholds: np.ndarray, confusions: np.ndarray, convention: Convention) -> SweepResult:
    """A :class:`SweepResult` from a grid and its confusions ``(T, K, K)``: curves under both
    conventions and the best threshold under ``convention`` (lowest on ties; index 0 when
    every value is nan, i.e. no evaluated pixel)."""
    iou = _per_class_iou(confusions)
    curves = {conv: _mean_iou(confusions, iou, conv) for conv in CONVENTIONS}
    curve = curves[convention]
    best = int(np.nanargmax(curve)) if np.any(~np.isnan(curve)) else 0
    return SweepResult(
        thresholds=thresholds,
        confusions=confusions,
        convention=convention,
        curves=curves,
        best_index=best,
        scores_at_best=scores_from_confusion(confusions[best]),
    )


# The sweep may be widened up to this threshold (CAMs lie in [0, 1]: at 1.0 every pixel is
# background), in steps of SWEEP_EXTENSION.
SWEEP_LIMIT: float = 1.0
SWEEP_EXTENSION: float = 0.10


def extend_until_interior(result: SweepResult, stop: float, extension: float = SWEEP_EXTENSION) -> SweepResult:
    """The sweep over ``thresholds <= stop``, widened while its best threshold is its last one.

    ``result`` holds the whole grid a sweep may use (up to :data:`SWEEP_LIMIT`). Starting with
    the range ``[first threshold, stop]``, while the best threshold (lowest on ties) is the
    range's upper end and the grid goes further, ``stop`` grows by ``extension``; the first
    range whose best lies strictly inside it (or the whole grid) is returned. Its last
    threshold is the range actually used. Rationale: an oracle at the upper end of the range
    may lie past it (WeakTr on synthetic data peaks at or above 0.60); widening step by step
    keeps the suite's range whenever the optimum is inside it. ValueError when ``extension``
    is not positive or ``stop`` is below the grid.
    """
    if extension <= 0:
        raise ValueError(f"extension must be positive, got {extension}")
    grid = result.thresholds
    if stop < grid[0] - 1e-9:
        raise ValueError(f"stop {stop} lies below the sweep grid ({grid[0]}..{grid[-1]})")
    while True:
        count = int(np.searchsorted(grid, stop + 1e-9, side="right"))
        window = result.upto(count)
        if window.best_index < count - 1 or count == len(grid):
            return window
        stop += extension


class CamThresholdSweep(Metric):
    """CAM ("seed") mIoU for every background threshold of a grid, in one pass.

    For threshold ``t`` the prediction of a pixel is
    ``argmax([t, cam_0, ..., cam_{C-1}])`` over the classes present in the image labels (the
    background plane first), i.e. 0 when no present class's CAM exceeds ``t`` strictly
    (``argmax`` returns the first maximum, so ties go to background) and ``c + 1`` for the
    first present class with the largest CAM otherwise. Absent classes never win.

    Instead of T argmaxes, the foreground max / argmax is computed once, each pixel's count
    ``k`` of thresholds strictly below its max is found by ``searchsorted``, and one bincount
    over ``(k, gt, fg class)`` plus cumulative sums gives all T confusions; thresholds are
    compared in the CAMs' dtype, so results equal the brute-force argmax exactly.

    Thresholds default to the full grid 0.00..0.60 step 0.01 (``start`` / ``stop`` /
    ``step`` or an explicit ``thresholds`` change it). Picking the best threshold on train
    pixel labels is an oracle (see :class:`SweepResult`).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    confusions: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        thresholds: Sequence[float] | np.ndarray | None = None,
        *,
        start: float = 0.0,
        stop: float = 0.60,
        step: float = 0.01,
        convention: str | Convention = DEFAULT_CONVENTION,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground classes) must be >= 1, got {num_classes}")
        if thresholds is None:
            grid = default_thresholds(start, stop, step)
        else:
            grid = np.asarray(thresholds, np.float64)
        if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
            raise ValueError(f"thresholds must be a non-empty 1-D finite sequence, got {grid!r}")
        self.thresholds = np.unique(grid)  # sorted ascending, deduplicated
        self.num_classes = num_classes
        self.convention = _convention(convention)
        k = num_classes + 1
        zeros = torch.zeros(len(self.thresholds), k, k, dtype=torch.long)
        self.add_state("confusions", default=zeros, dist_reduce_fx="sum")

    def _check(self, cams: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> None:
        if cams.ndim != 4 or cams.shape[1] != self.num_classes:
            raise ValueError(f"cams must be (B, {self.num_classes}, H, W), got {tuple(cams.shape)}")
        b, c = cams.shape[:2]
        if not cams.dtype.is_floating_point:
            raise ValueError(f"cams must be floating point, got {cams.dtype}")
        if tuple(labels.shape) != (b, c):
            raise ValueError(f"labels must be (B, C) = {(b, c)}, got {tuple(labels.shape)}")
        if not bool(torch.isfinite(cams).all()):
            raise ValueError("cams contain NaN or inf")
        _check_target(target, self.num_classes, (b, *cams.shape[2:]))

    def update(self, cams: ArrayLike, labels: ArrayLike, target: ArrayLike) -> None:
        """Add a batch: ``cams`` (B, C, H, W), ``labels`` (B, C) multi-hot, ``target`` (B, H, W)."""
        device = self.confusions.device
        cams, labels, target = (_as_tensor(x, device) for x in (cams, labels, target))
        self._check(cams, labels, target)
        absent = (labels <= 0)[:, :, None, None]
        masked = cams.masked_fill(absent, float("-inf"))
        fg_max, fg_arg = masked.max(dim=1)  # first maximum on ties, like argmax
        valid = target != IGNORE_INDEX
        fg_max, fg_arg, gt = fg_max[valid], fg_arg[valid], target[valid].long()
        grid = torch.as_tensor(self.thresholds, device=device).to(cams.dtype)
        # k = #thresholds strictly below fg_max: foreground for thresholds [0, k), background after.
        k = torch.searchsorted(grid, fg_max.contiguous(), right=False)
        self.confusions += self._confusions_from_counts(k, gt, fg_arg, len(grid))

    def _confusions_from_counts(
        self, k: torch.Tensor, gt: torch.Tensor, fg: torch.Tensor, t: int
    ) -> torch.Tensor:
        """All T confusions from per-pixel (k, gt, fg class) by one bincount and cumsums."""
        n, c = self.num_classes + 1, self.num_classes
        index = (k * n + gt) * c + fg
        hist = torch.bincount(index, minlength=(t + 1) * n * c).reshape(t + 1, n, c)
        # foreground at threshold i: pixels with k > i  ->  reverse cumsum over k, shifted.
        fg_counts = hist.flip(0).cumsum(0).flip(0)[1:]  # (T, n, c): sum_{k > i}
        # background at threshold i: pixels with k <= i, any fg class.
        bg_counts = hist.sum(-1).cumsum(0)[:-1]  # (T, n): sum_{k <= i}
        return torch.cat([bg_counts[..., None], fg_counts], dim=-1)

    def compute(self) -> SweepResult:
        """Curves for both conventions and the (oracle) best threshold."""
        return _sweep_result(self.thresholds.copy(), self.confusions.cpu().numpy(), self.convention)


# -- CRF-refined evaluation --------------------------------------------------------------------


def evaluate_with_crf(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    params: CRFParams,
    workers: int | None = None,
    chunk_size: int | None = None,
) -> SegmentationScores:
    """Dense-CRF refine ``probs`` (K, H, W) on ``images`` (H, W, 3) uint8 and score the argmax
    against ``targets`` (H, W) in {0..K-1, 255}.

    Images may differ in size. CRF runs in ``workers`` processes (``dense_crf_many``), in
    chunks of ``chunk_size`` images (default ``8 * workers``) so only label maps, not all
    marginals, are kept.
    """
    if not len(images) == len(probs) == len(targets):
        lengths = f"images ({len(images)}), probs ({len(probs)}) and targets ({len(targets)})"
        raise ValueError(f"{lengths} differ in length")
    if not probs:
        raise ValueError("evaluate_with_crf: no images")
    n_labels = probs[0].shape[0]
    metric = SegmentationMetric(n_labels - 1)
    chunk = chunk_size or 8 * max(1, workers or 1)
    for start in range(0, len(images), chunk):
        stop = start + chunk
        refined = dense_crf_many(images[start:stop], probs[start:stop], params, workers=workers)
        for marginals, target in zip(refined, targets[start:stop]):
            metric.update(marginals.argmax(0)[None], np.asarray(target)[None])
    return metric.compute()
