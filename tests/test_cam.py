"""The `cam` baseline's stages on hand-made inputs: contract shapes, ranges and the
compact-label mapping of the CRF pseudo masks."""

from __future__ import annotations

import numpy as np
import torch

from methods.base import DatasetInfo, Sample, StageContext
from methods.cam import CamBaseline, CamConfig

INFO = DatasetInfo("toy", ("a", "b", "c"), input_size=32)


def _method(**kw) -> CamBaseline:
    torch.manual_seed(0)
    config = CamConfig(crop=32, seg_crop=32, batch_size=2, seg_batch_size=2, epochs=1, seg_epochs=1, **kw)
    return CamBaseline(config, INFO, torch.device("cpu"))


def test_cams_are_in_unit_range_and_zero_for_absent_classes():
    method = _method()
    images = torch.rand(2, 3, 40, 24)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cams = method.cams(images, labels)
    assert cams.shape == (2, 3, 40, 24)
    assert cams.min() >= 0 and cams.max() <= 1
    assert cams[0, 1].abs().sum() == 0 and cams[1, 0].abs().sum() == 0 and cams[1, 2].abs().sum() == 0
    assert torch.isclose(cams[0, 0].max(), torch.tensor(1.0), atol=1e-3)  # max-normalised


def test_threshold_pseudo_masks_pick_background_below_threshold():
    method = _method(bg_threshold=0.5)
    cams = torch.zeros(1, 3, 2, 2)
    cams[0, 2] = torch.tensor([[0.9, 0.4], [0.5, 0.0]])
    cams[0, 1] = torch.tensor([[0.95, 0.95], [0.95, 0.95]])  # absent class: ignored
    labels = torch.tensor([[0.0, 0.0, 1.0]])
    masks = method.pseudo_masks(torch.rand(1, 3, 2, 2), cams, labels)
    assert masks.tolist() == [[[3, 0], [0, 0]]]  # a tie with the threshold goes to background


def test_crf_pseudo_masks_use_only_present_classes():
    method = _method(bg_threshold=0.3, pseudo_crf=True)
    image = torch.zeros(1, 3, 16, 16)
    image[..., 4:12, 4:12] = 1.0
    cams = torch.zeros(1, 3, 16, 16)
    cams[0, 2, 4:12, 4:12] = 1.0
    labels = torch.tensor([[0.0, 0.0, 1.0]])
    masks = method.pseudo_masks(image, cams, labels)
    assert set(masks.unique().tolist()) <= {0, 3}
    assert (masks[0, 6:10, 6:10] == 3).all() and (masks[0, :2, :2] == 0).all()


def test_training_stages_and_segment_shapes(tmp_path):
    method = _method()
    rng = np.random.default_rng(0)
    samples = [Sample(str(i), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), np.array([1, 0, 1], np.float32),
                      rng.integers(0, 4, (32, 32)).astype(np.uint8)) for i in range(4)]
    ctx = StageContext(torch.device("cpu"), seed=0, workdir=tmp_path)
    method.train_cam(samples, ctx)
    method.train_seg(samples, ctx)
    images = torch.rand(1, 3, 36, 28)
    assert method.segment(images).shape == (1, 4, 36, 28)
    assert method.segment(images, multiscale=True).shape == (1, 4, 36, 28)
