"""The runner's evaluation stages on a fake dataset and method whose CAMs and pseudo masks are
written into the images, so every number is hand-computable: pseudo-mask mIoU on the cam-eval
ids only (both 255 conventions, mask_ignored_pct kept), the widening CAM sweep and its
recorded range, the method's own fixed threshold, the suite's convention, and ground truth
without labelled pixels stopping the trial with an error naming the split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from harness.config import EvalConfig, TrialSpec
from harness.datasets.base import Split
from harness.errors import DataError
from harness.runner import TrialRunner
from methods.base import DatasetInfo, Method, MethodConfig, Sample

# Images are 1 x W. Channel 0 / 1 hold class 1 / 2's CAM times 200 (CAM = value / 200, kept
# off the 0.01 threshold grid), channel 2 holds the pseudo mask (a class index or 255).
SCALE = 200.0


def _sample(sample_id: str, cams: list[list[float]], pseudo: list[int], gt: list[int] | None, labels: list[float]) -> Sample:
    width = len(pseudo)
    image = np.zeros((1, width, 3), np.uint8)
    for c, row in enumerate(cams):
        image[0, :, c] = np.round(np.asarray(row) * SCALE).astype(np.uint8)
    image[0, :, 2] = pseudo
    mask = None if gt is None else np.asarray([gt], np.uint8)
    return Sample(sample_id, image, np.asarray(labels, np.float32), mask)


class FakeDataset:
    """Splits from in-memory samples; roles train / cam_eval / val -> "train" / "cam" / "val"."""

    def __init__(self, splits: dict[str, list[Sample]], num_classes: int) -> None:
        self.info = DatasetInfo("fake", tuple(f"c{i}" for i in range(1, num_classes + 1)), input_size=8)
        self._splits = splits

    def default_splits(self) -> dict[str, str]:
        return {"train": "train", "cam_eval": "cam", "val": "val"}

    def split(self, name: str) -> Split:
        samples = {s.id: s for s in self._splits[name]}
        return Split("fake", name, list(samples), lambda i: dataclasses.replace(samples[i]))


class FakeMethod(Method):
    """CAMs and pseudo masks read back from the image; segment() predicts all background."""

    name = "fake_eval"

    def __init__(self, dataset: DatasetInfo, threshold: float | None) -> None:
        super().__init__(MethodConfig(), dataset, torch.device("cpu"))
        self.threshold = threshold

    def train_cam(self, train, ctx) -> None:
        pass

    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.dataset.num_classes
        return (images[:, :c] * 255.0 / SCALE) * labels[:, :, None, None]

    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (images[:, 2] * 255.0).round().long()

    def segment(self, images: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
        b, _, h, w = images.shape
        logits = torch.zeros(b, self.dataset.num_classes + 1, h, w)
        logits[:, 0] = 1.0
        return logits

    def networks(self) -> dict[str, nn.Module]:
        return {}

    def cam_threshold(self) -> float | None:
        return self.threshold


def _runner(tmp_path: Path, splits: dict[str, list[Sample]], num_classes: int = 1, threshold: float | None = None,
            **eval_values) -> TrialRunner:
    ev = dataclasses.asdict(EvalConfig(batch_size=1, gallery_size=0, crf=False, multiscale=False, **eval_values))
    spec = TrialSpec("t", "fake_eval", {}, "fake", None, {}, {}, ev, 0)
    runner = TrialRunner(spec, tmp_path)
    runner._dataset = FakeDataset(splits, num_classes)
    runner._method = FakeMethod(runner._dataset.info, threshold)
    return runner


# One class; GT [0, 0, 1, 1]; CAM [0.245, 0.545, 0.745, 0.945]. mIoU ("present") per threshold:
# t < 0.245: all fg -> (0 + 2/4)/2 = 0.25; 0.25..0.54: pred [0,1,1,1] -> (1/2 + 2/3)/2 = 7/12;
# 0.55..0.74: perfect -> 1; 0.75..0.94: pred [0,0,0,1] -> (2/3 + 1/2)/2 = 7/12; >= 0.95: 0.25.
RAMP = _sample("r", [[0.245, 0.545, 0.745, 0.945]], [0, 0, 1, 1], [0, 0, 1, 1], [1.0])


def test_cam_sweep_widens_past_its_stop_and_records_the_range(tmp_path):
    # threshold_stop 0.55: the best of 0..0.55 is 0.55, its last threshold -> widened by 0.10.
    status, metrics, curves = _runner(tmp_path, {"cam": [RAMP]}, threshold_stop=0.55)._stage_cams()
    assert metrics["cam_best_threshold"] == pytest.approx(0.55) and metrics["cam_miou"] == pytest.approx(100.0)
    assert metrics["cam_threshold_start"] == 0.0 and metrics["cam_threshold_stop"] == pytest.approx(0.65)
    # cam_curve covers the whole range used, one point per 0.01.
    assert [round(t * 100) for t, _ in curves["cam_curve"]] == list(range(0, 66))
    assert curves["cam_curve"][30][1] == pytest.approx(700 / 12) and curves["cam_curve"][60][1] == pytest.approx(100.0)


def test_cam_sweep_keeps_the_suite_range_when_the_best_is_inside(tmp_path):
    _, metrics, curves = _runner(tmp_path, {"cam": [RAMP]})._stage_cams()  # default stop 0.60
    assert metrics["cam_threshold_stop"] == pytest.approx(0.60) and len(curves["cam_curve"]) == 61


@pytest.mark.parametrize(("declared", "used", "miou"), [(0.8, 0.8, 700 / 12), (None, 0.2, 25.0)])
def test_fixed_threshold_is_the_methods_own_else_the_suites(tmp_path, declared, used, miou):
    # 0.80 -> pred [0,0,0,1] -> 7/12; the suite's 0.20 (no declared threshold) -> all fg -> 0.25.
    _, metrics, _ = _runner(tmp_path, {"cam": [RAMP]}, threshold=declared, fixed_threshold=0.2)._stage_cams()
    assert metrics["cam_fixed_threshold"] == pytest.approx(used)
    assert metrics["cam_miou_fixed"] == pytest.approx(miou)


def test_fixed_threshold_off_the_grid_is_exact(tmp_path):
    # 0.545 < 0.5455 < 0.745: pred [0, 0, 1, 1] = GT -> 100, though 0.5455 is not a grid point.
    _, metrics, _ = _runner(tmp_path, {"cam": [RAMP]}, threshold=0.5455)._stage_cams()
    assert metrics["cam_miou_fixed"] == pytest.approx(100.0)


# Two classes, both in the image labels; GT [0,0,0,1,1,1]; class 2 is never in the GT.
# t < 0.695: pred [2,0,0,1,1,1]: IoU bg 2/3, c1 1, c2 0 -> present 5/9, gt 5/6 (gt's best)
# 0.795 <= t < 0.895: pred [0,0,0,1,1,0]: IoU bg 3/4, c1 2/3 -> present = gt = 17/24 (present's best)
CONV = _sample("v", [[0, 0, 0, 0.895, 0.895, 0.695], [0.795, 0, 0, 0, 0, 0]], [0] * 6, [0, 0, 0, 1, 1, 1], [1.0, 1.0])


@pytest.mark.parametrize(("convention", "best_t", "best"), [("present", 0.80, 1700 / 24), ("gt", 0.0, 500 / 6)])
def test_sweep_selects_by_the_suites_convention(tmp_path, convention, best_t, best):
    runner = _runner(tmp_path, {"cam": [CONV]}, num_classes=2, convention=convention, threshold_stop=1.0)
    _, metrics, _ = runner._stage_cams()
    assert metrics["cam_best_threshold"] == pytest.approx(best_t) and metrics["cam_miou"] == pytest.approx(best)
    assert metrics[f"cam_miou_{convention}"] == pytest.approx(best)


def test_pseudo_masks_are_scored_on_the_cam_eval_ids_in_both_conventions(tmp_path):
    # "c" is in train and cam-eval: GT [0,0,1,1], pseudo [0,255,255,1].
    #   255 as background: pred [0,0,0,1] -> IoU bg 2/3, fg 1/2 -> mask_miou (2/3 + 1/2)/2 = 7/12
    #   255 ignored: pixels 0 and 3 only, both right -> mask_miou_ignore255 = 100
    # "t" is only in train: GT all 1, pseudo all 0: scoring it would pull everything down.
    # mask_ignored_pct over all 8 generated pixels: 2 are 255 -> 25 %.
    scored = _sample("c", [[0.5] * 4], [0, 255, 255, 1], [0, 0, 1, 1], [1.0])
    train_only = _sample("t", [[0.5] * 4], [0, 0, 0, 0], [1, 1, 1, 1], [1.0])
    runner = _runner(tmp_path, {"train": [scored, train_only], "cam": [scored]})
    status, metrics, _ = runner._stage_pseudo_masks()
    assert metrics["mask_miou"] == pytest.approx(700 / 12)
    assert metrics["mask_miou_ignore255"] == pytest.approx(100.0)
    assert metrics["mask_ignored_pct"] == pytest.approx(25.0)
    assert metrics["mask_eval_images"] == 1.0
    assert (tmp_path / "trials" / runner.spec.trial_id / "pseudo" / "t.png").exists()  # generated for all of train


def test_pseudo_masks_without_any_cam_eval_image_in_train_is_an_error(tmp_path):
    runner = _runner(tmp_path, {"train": [RAMP], "cam": [dataclasses.replace(RAMP, id="elsewhere")]})
    with pytest.raises(DataError, match="none of the 1 cam-eval image\\(s\\) of split 'cam' is in train split 'train'"):
        runner._stage_pseudo_masks()


def test_cam_eval_without_labelled_pixels_stops_with_the_split_named(tmp_path):
    unlabelled = dataclasses.replace(RAMP, mask=np.full((1, 4), 255, np.uint8))
    with pytest.raises(DataError, match="CAM mIoU cannot be computed: the 1 image\\(s\\) of split 'cam' \\(cam_eval role\\)"):
        _runner(tmp_path, {"cam": [unlabelled]})._stage_cams()


def test_val_without_labelled_pixels_or_without_masks_stops_with_the_split_named(tmp_path):
    unlabelled = dataclasses.replace(RAMP, mask=np.full((1, 4), 255, np.uint8))
    with pytest.raises(DataError, match="val mIoU cannot be computed: the 1 image\\(s\\) of split 'val' \\(val role\\)"):
        _runner(tmp_path, {"val": [unlabelled], "cam": [RAMP]})._stage_segment()
    no_mask = dataclasses.replace(RAMP, mask=None)
    with pytest.raises(DataError, match="Image r of split 'val' has no ground-truth mask"):
        _runner(tmp_path, {"val": [no_mask], "cam": [RAMP]})._stage_segment()
    with pytest.raises(DataError, match="Image r of split 'cam' has no ground-truth mask"):
        _runner(tmp_path, {"cam": [no_mask]})._stage_cams()


def test_val_with_labels_scores_normally(tmp_path):
    # segment() predicts background everywhere: GT [0,0,1,1] -> IoU bg 2/4, fg 0 -> 25.
    _, metrics, _ = _runner(tmp_path, {"val": [RAMP], "cam": [RAMP]})._stage_segment()
    assert metrics["val_miou_ss"] == pytest.approx(25.0)


def test_each_method_declares_its_own_threshold():
    """WeakTr / AD-CAM / cam: the pseudo-mask background threshold; AFA: beta_h (a pixel is
    foreground in its label iff a present CAM exceeds it). Called on a stub holding only the
    config (building the networks is not needed)."""
    from types import SimpleNamespace

    from methods import load_all

    registry = load_all()
    cases = {"weaktr": ("bg_threshold", 0.42), "adcam": ("bg_threshold", 0.3), "cam": ("bg_threshold", 0.35),
             "afa": ("bg_high", 0.55)}
    for name, (field, value) in cases.items():
        cls = registry[name]
        stub = SimpleNamespace(config=cls.Config(**{field: value}))
        assert cls.cam_threshold(stub) == value, name
    assert Method.cam_threshold(SimpleNamespace()) is None  # default: use eval.fixed_threshold
