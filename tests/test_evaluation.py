"""Tests of harness.evaluation: hand-computed confusions, both mIoU conventions, the CAM
threshold sweep against a brute-force argmax, and CRF-refined evaluation (real pydensecrf)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.evaluation import (
    DEFAULT_CONVENTION,
    CamThresholdSweep,
    Convention,
    SegmentationMetric,
    default_thresholds,
    evaluate_with_crf,
    extend_until_interior,
    scores_from_confusion,
)
from methods.base import CRFParams

# 3 classes (background + 2 foreground), a 2x3 image. Class 2 is predicted once but absent
# from the GT, so the two conventions differ.
GT = torch.tensor([[[0, 0, 1], [1, 1, 0]]])
PRED = torch.tensor([[[0, 2, 1], [1, 0, 0]]])
# rows GT, cols pred:
#   GT 0 at (0,0)->0, (0,1)->2, (1,2)->0 ; GT 1 at (0,2)->1, (1,0)->1, (1,1)->0 ; no GT 2
CONF = np.array([[2, 0, 1], [1, 2, 0], [0, 0, 0]])
IOU = np.array([2 / 4, 2 / 3, 0 / 1])  # union = row + col - tp: 3+3-2, 3+2-2, 0+1-0


def _scores(pred, target, num_classes: int = 2):
    metric = SegmentationMetric(num_classes)
    metric.update(pred, target)
    return metric.compute()


# -- SegmentationMetric --------------------------------------------------------------------


def test_hand_computed_confusion_and_both_conventions():
    s = _scores(PRED, GT)
    assert s.confusion.dtype == np.int64
    np.testing.assert_array_equal(s.confusion, CONF)
    np.testing.assert_allclose(s.per_class_iou, IOU)
    assert s.miou_present == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)  # class 2 counts as 0
    assert s.miou_gt == pytest.approx((0.5 + 2 / 3) / 2)  # only classes with GT pixels
    assert s.pixel_accuracy == pytest.approx(4 / 6)
    assert s.miou("present") == s.miou_present and s.miou(Convention.GT) == s.miou_gt
    assert DEFAULT_CONVENTION == "present" and s.miou() == s.miou_present
    with pytest.raises(ValueError, match="convention"):
        s.miou("weaktr")


def test_ignore_pixels_excluded_even_with_out_of_range_pred():
    target = torch.tensor([[[0, 0, 1, 255], [1, 1, 0, 255]]])
    pred = torch.tensor([[[0, 2, 1, 7], [1, 0, 0, 1]]])  # 7 sits on an ignored pixel
    s = _scores(pred, target)
    np.testing.assert_array_equal(s.confusion, CONF)
    assert s.num_pixels == 6


def test_empty_class_is_nan_and_excluded_from_both_means():
    s = _scores(PRED, GT, num_classes=3)  # class 3 in neither GT nor prediction
    assert s.confusion.shape == (4, 4)
    assert math.isnan(s.per_class_iou[3])
    np.testing.assert_allclose(s.per_class_iou[:3], IOU)
    assert s.miou_present == pytest.approx(IOU.mean())
    assert s.miou_gt == pytest.approx(IOU[:2].mean())


def test_accumulation_equals_concatenation_and_reset():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (4, 5, 6), generator=gen)
    target[target == 3] = 255
    pred = torch.randint(0, 3, (4, 5, 6), generator=gen)
    split = SegmentationMetric(2)
    split.update(pred[:1], target[:1])
    split.update(pred[1:], target[1:])
    whole = _scores(pred, target)
    np.testing.assert_array_equal(split.compute().confusion, whole.confusion)
    split.reset()
    split.update(PRED, GT)
    np.testing.assert_array_equal(split.compute().confusion, CONF)


def test_numpy_inputs_and_pred_ignore_as():
    pred = PRED.numpy().astype(np.uint8).copy()
    pred[0, 0, 0] = 255  # a pseudo-mask ignore pixel on GT background
    with pytest.raises(ValueError, match="pred_ignore_as"):
        _scores(pred, GT.numpy())
    metric = SegmentationMetric(2, pred_ignore_as=0)
    metric.update(pred, GT.numpy().astype(np.uint8))
    np.testing.assert_array_equal(metric.compute().confusion, CONF)


def test_drop_pred_ignore_scores_only_pixels_the_mask_is_sure_about():
    # GT [0, 0, 1, 1], pseudo mask [0, 255, 255, 1], one foreground class.
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 255, 255, 1]]])
    as_bg = SegmentationMetric(1, pred_ignore_as=0)
    as_bg.update(pred, target)
    # 255 -> background: pred [0, 0, 0, 1]; IoU bg 2 / (2 + 3 - 2) = 2/3, fg 1 / (2 + 1 - 1) = 1/2.
    assert as_bg.compute().miou_present == pytest.approx((2 / 3 + 1 / 2) / 2)
    dropped = SegmentationMetric(1, drop_pred_ignore=True)
    dropped.update(pred, target)
    s = dropped.compute()
    # Only pixels 0 and 3 are scored, both right: confusion [[1, 0], [0, 1]], mIoU 1.
    np.testing.assert_array_equal(s.confusion, [[1, 0], [0, 1]])
    assert s.miou_present == 1.0 and s.num_pixels == 2
    with pytest.raises(ValueError, match="not both"):
        SegmentationMetric(1, pred_ignore_as=0, drop_pred_ignore=True)


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (PRED[:, :, :2], GT, "shape"),
        (PRED, torch.tensor([[[0, 0, 3], [1, 1, 0]]]), r"outside \{0..2, 255\}"),
        (PRED, torch.tensor([[[0, 0, -1], [1, 1, 0]]]), "outside"),
        (torch.tensor([[[0, 0, 1], [1, 9, 0]]]), GT, r"pred has values \[9\]"),
        (PRED.float(), GT, "integer"),
        (PRED, GT.float(), "integer"),
    ],
)
def test_bad_inputs_raise(pred, target, match):
    with pytest.raises(ValueError, match=match):
        _scores(pred, target)


def test_scores_from_confusion_empty_is_nan():
    s = scores_from_confusion(np.zeros((3, 3), dtype=np.int64))
    assert np.isnan(s.per_class_iou).all()
    assert math.isnan(s.miou_present) and math.isnan(s.miou_gt) and math.isnan(s.pixel_accuracy)


# -- CamThresholdSweep ------------------------------------------------------------------------


def test_default_thresholds_full_grid():
    grid = default_thresholds()
    np.testing.assert_array_equal(grid, np.round(np.arange(0.0, 0.60 + 1e-9, 0.01), 2))
    assert len(grid) == 61
    np.testing.assert_array_equal(CamThresholdSweep(2, start=0.4, stop=0.59).thresholds, grid[40:60])


def test_sweep_hand_made_best_threshold_with_tie_and_absent_class():
    # class 0 present; class 1 absent with a high CAM that must be ignored.
    cams = torch.tensor([[[[0.1, 0.3, 0.5, 0.7]], [[0.9, 0.9, 0.9, 0.9]]]])
    labels = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[[0, 0, 1, 1]]])
    sweep = CamThresholdSweep(2)
    sweep.update(cams, labels, target)
    result = sweep.compute()
    # t < 0.1: all foreground -> IoU bg 0, class-1 IoU 2/4; 0.3 <= t < 0.5 perfect (0.3 ties -> bg).
    assert result.curve[0] == pytest.approx(0.25)
    assert result.best_threshold == pytest.approx(0.30)  # lowest of the perfect thresholds
    assert result.best_miou == 1.0 and result.scores_at_best.miou_gt == 1.0
    np.testing.assert_array_equal(result.curve[30:50], 1.0)
    assert result.curve[29] < 1.0 and result.curve[50] < 1.0
    at_half = result.at(0.5)  # 0.5 ties -> background: pred [0, 0, 0, 1]
    np.testing.assert_array_equal(at_half.confusion, [[2, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert result.convention == DEFAULT_CONVENTION
    np.testing.assert_array_equal(result.curve, result.curves[Convention.PRESENT])
    with pytest.raises(ValueError, match="grid"):
        result.at(0.255)


def _brute_force(cams, labels, target, thresholds, num_classes):
    """Per threshold: argmax over [t plane, cams * labels], bg plane first."""
    confs = []
    for t in thresholds:
        plane = torch.full_like(cams[:, :1], float(t))
        pred = torch.cat([plane, cams * labels[:, :, None, None]], dim=1).argmax(1)
        metric = SegmentationMetric(num_classes)
        metric.update(pred, target)
        confs.append(metric.compute().confusion)
    return np.stack(confs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sweep_equals_brute_force_argmax_with_exact_ties(dtype):
    gen = torch.Generator().manual_seed(1)
    num_classes, thresholds = 3, default_thresholds()
    # CAM values drawn from the threshold grid itself: many exact ties with thresholds and
    # between foreground classes.
    grid = torch.as_tensor(thresholds).to(dtype)
    cams = grid[torch.randint(0, len(grid), (3, num_classes, 7, 9), generator=gen)]
    labels = (torch.rand(3, num_classes, generator=gen) > 0.4).float()
    labels[0] = 0.0  # an image with no present class: background everywhere
    target = torch.randint(0, num_classes + 2, (3, 7, 9), generator=gen)
    target[target == num_classes + 1] = 255
    sweep = CamThresholdSweep(num_classes)
    sweep.update(cams[:2], labels[:2], target[:2])  # two updates accumulate
    sweep.update(cams[2:], labels[2:], target[2:])
    result = sweep.compute()
    expected = _brute_force(cams, labels, target, thresholds, num_classes)
    np.testing.assert_array_equal(result.confusions, expected)
    best = int(np.nanargmax([scores_from_confusion(c).miou_present for c in expected]))
    assert result.best_index == best
    gt_sweep = CamThresholdSweep(num_classes, convention="gt")
    gt_sweep.update(cams, labels, target)
    np.testing.assert_array_equal(gt_sweep.compute().curve, result.curves[Convention.GT])


def test_sweep_bad_inputs_raise():
    sweep = CamThresholdSweep(2)
    cams, labels, target = torch.zeros(1, 2, 2, 2), torch.ones(1, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="cams must be"):
        sweep.update(cams[:, :1], labels, target)
    with pytest.raises(ValueError, match="labels must be"):
        sweep.update(cams, labels[:, :1], target)
    with pytest.raises(ValueError, match="shape"):
        sweep.update(cams, labels, target[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        sweep.update(torch.full_like(cams, float("nan")), labels, target)
    with pytest.raises(ValueError, match="outside"):
        sweep.update(cams, labels, target + 3)


# -- CRF ----------------------------------------------------------------------------------------


def _crf_case(height: int, width: int, seed: int):
    """Left half dark / right half bright image, GT 0 / 1, noisy but right-leaning probs."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2 :] = 220
    target = np.zeros((height, width), np.uint8)
    target[:, width // 2 :] = 1
    target[0, 0] = 255
    p1 = np.where(target == 1, 0.7, 0.3) + rng.uniform(-0.25, 0.25, (height, width))
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    return image, probs, target


def test_evaluate_with_crf_parallel_matches_serial():
    cases = [_crf_case(10 + i, 12 + 2 * i, i) for i in range(4)]
    images, probs, targets = map(list, zip(*cases))
    params = CRFParams(iterations=5)
    parallel = evaluate_with_crf(images, probs, targets, params, workers=2, chunk_size=3)
    serial = evaluate_with_crf(images, probs, targets, params, workers=1)
    np.testing.assert_array_equal(parallel.confusion, serial.confusion)
    assert parallel.num_pixels == sum(int((t != 255).sum()) for t in targets)
    raw = SegmentationMetric(1)
    for p, t in zip(probs, targets):
        raw.update(p.argmax(0)[None], t[None])
    assert parallel.miou_present >= raw.compute().miou_present  # CRF cleans the noise here
    assert parallel.miou_present > 0.9


def test_evaluate_with_crf_length_mismatch():
    image, probs, target = _crf_case(8, 8, 0)
    with pytest.raises(ValueError, match="length"):
        evaluate_with_crf([image], [probs], [target, target], CRFParams(), workers=1)


# One image, 6 pixels, two foreground classes, both in the image labels. GT [0,0,0,1,1,1].
# CAMs are off the 0.01 grid so no threshold ties a CAM value.
CONV_CAMS = torch.tensor([[[[0.0, 0.0, 0.0, 0.895, 0.895, 0.695]],   # class 1 (label 1)
                           [[0.795, 0.0, 0.0, 0.0, 0.0, 0.0]]]])      # class 2 (label 2), not in GT
CONV_LABELS = torch.tensor([[1.0, 1.0]])
CONV_GT = torch.tensor([[[0, 0, 0, 1, 1, 1]]])
# t < 0.695: pred [2,0,0,1,1,1]: IoU bg 2/3, c1 1, c2 0 -> present (2/3+1+0)/3 = 5/9, gt (2/3+1)/2 = 5/6
# 0.795 <= t < 0.895: pred [0,0,0,1,1,0]: IoU bg 3/4, c1 2/3, c2 nan -> present = gt = 17/24
# So "present" (which counts the false class-2 pixel as a zero) picks 0.80, "gt" picks 0.00.


@pytest.mark.parametrize(("convention", "best_t", "best"), [("present", 0.80, 17 / 24), ("gt", 0.0, 5 / 6)])
def test_sweep_best_threshold_follows_the_convention(convention, best_t, best):
    sweep = CamThresholdSweep(2, convention=convention, stop=1.0)
    sweep.update(CONV_CAMS, CONV_LABELS, CONV_GT)
    result = sweep.compute()
    assert result.convention == convention
    assert result.best_threshold == pytest.approx(best_t) and result.best_miou == pytest.approx(best)
    assert result.curves[Convention.PRESENT][0] == pytest.approx(5 / 9)
    assert result.curves[Convention.GT][0] == pytest.approx(5 / 6)


def _ramp_sweep(convention: str = "present"):
    """GT [0, 0, 1, 1], one class, CAM [0.245, 0.545, 0.745, 0.945], grid 0.00..1.00."""
    sweep = CamThresholdSweep(1, stop=1.0, convention=convention)
    sweep.update(torch.tensor([[[[0.245, 0.545, 0.745, 0.945]]]]), torch.tensor([[1.0]]), torch.tensor([[[0, 0, 1, 1]]]))
    return sweep.compute()


def test_extend_until_interior_widens_only_while_the_best_is_the_last_threshold():
    full = _ramp_sweep()
    # mIoU (present) per regime: t < 0.245: all fg -> (0 + 2/4)/2 = 0.25; 0.245..0.545: pred
    # [0,1,1,1] -> (1/2 + 2/3)/2 = 7/12; 0.55..0.74: perfect -> 1; 0.75..0.94: 7/12; >= 0.95: 0.25.
    np.testing.assert_allclose(full.curve[[0, 30, 55, 80, 100]], [0.25, 7 / 12, 1.0, 7 / 12, 0.25])
    kept = extend_until_interior(full, 0.60)  # best 0.55 < 0.60: the suite's range stands
    assert kept.thresholds[-1] == pytest.approx(0.60) and len(kept.thresholds) == 61
    assert kept.best_threshold == pytest.approx(0.55) and kept.best_miou == 1.0
    # Range 0..0.55: best is its last threshold (0.55 beats 7/12 below) -> widened by 0.10 to
    # 0.65, where 0.55 is inside.
    wider = extend_until_interior(full, 0.55)
    assert wider.thresholds[-1] == pytest.approx(0.65) and len(wider.curve) == 66
    assert wider.best_threshold == pytest.approx(0.55)
    # Range 0..0.30: best 0.25 (7/12) is inside already (0.26..0.30 tie, ties go low).
    assert extend_until_interior(full, 0.30).thresholds[-1] == pytest.approx(0.30)
    # Range 0..0.20: best 0.00 (0.25 everywhere: tie, lowest) is inside.
    assert extend_until_interior(full, 0.20).best_threshold == 0.0


def test_extend_until_interior_stops_at_the_end_of_the_grid():
    # A curve rising in steps up to 1.0: one class, GT all background, 10 pixels with CAMs
    # 0.095, 0.195, ..., 0.995. At t, pixels above t are (wrong) foreground: bg IoU = #bg / 10,
    # and the predicted class counts as a 0 ("present") until t >= 0.995, where every pixel is
    # background (mIoU 1). Each range 0..0.60, 0..0.70, ... ends on the first threshold of its
    # best plateau, so the sweep widens to the grid's end, 1.00.
    sweep = CamThresholdSweep(1, stop=1.0)
    cams = torch.arange(10, dtype=torch.float32).mul(0.1).add(0.095).reshape(1, 1, 1, 10)
    sweep.update(cams, torch.tensor([[1.0]]), torch.zeros(1, 1, 10, dtype=torch.long))
    result = extend_until_interior(sweep.compute(), 0.60)
    assert result.thresholds[-1] == 1.0 and result.best_threshold == 1.0 and len(result.thresholds) == 101
    assert result.curve[60] == pytest.approx(0.6 / 2)  # t = 0.60: 6 of 10 pixels bg, fg class IoU 0
    with pytest.raises(ValueError, match="extension"):
        extend_until_interior(result, 0.6, extension=0.0)


def test_sweep_num_pixels_and_upto():
    full = _ramp_sweep()
    assert full.num_pixels == 4
    head = full.upto(11)  # thresholds 0.00..0.10: curve flat at 0.25 -> best 0.00
    assert len(head.thresholds) == 11 and head.best_index == 0
    empty = CamThresholdSweep(1)
    empty.update(torch.full((1, 1, 1, 2), 0.5), torch.tensor([[1.0]]), torch.full((1, 1, 2), 255))
    assert empty.compute().num_pixels == 0
