"""harness/common_seg.py: the shared segmentation recipe trained by the harness on any
method's pseudo masks (eval option ``common_segmentation``), wired into the runner's
train_seg / segment stages, checkpointed apart from the method, resumable."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from harness.common_seg import CommonSegConfig, CommonSegmenter, build_network, common_seg_config
from harness.config import load_suite, parse_overrides
from harness.errors import ConfigError
from harness.runner import TrialRunner
from harness.sweep import plan_trials
from methods.base import DatasetInfo

TINY = ["dataset.num_train=12", "dataset.num_val=6", "dataset.image_size=64", "epochs=1", "seg_epochs=1",
        "crop=64", "seg_crop=64", "batch_size=6", "seg_batch_size=6", "eval.gallery_size=2"]
COMMON = {"crop": 64, "epochs": 1, "batch_size": 6, "test_scales": [1.0, 1.25]}


def test_config_from_eval_settings():
    assert common_seg_config({}) is None
    assert common_seg_config({"common_segmentation": False}) is None
    assert common_seg_config({"common_segmentation": "false"}) is None
    assert common_seg_config({"common_segmentation": True}) == CommonSegConfig()
    assert common_seg_config({"common_segmentation": "true"}) == CommonSegConfig()
    config = common_seg_config({"common_segmentation": {"crop": "64", "test_scales": "1.0,1.5"}})
    assert config.crop == 64 and config.test_scales == (1.0, 1.5)
    with pytest.raises(ConfigError, match='Did you mean "epochs"'):
        common_seg_config({"common_segmentation": {"epoch": 3}})
    with pytest.raises(ConfigError, match="must be true, false or a table"):
        common_seg_config({"common_segmentation": 3})


@pytest.mark.parametrize("arch", ["deeplab_lite_vit_synth", "deeplab_v2_small"])
def test_networks_keep_the_image_size(arch):
    net = build_network(CommonSegConfig(arch=arch, crop=64), num_classes=5).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 50, 70))
    assert out.shape == (2, 6, 50, 70)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ConfigError, match="Valid: .*deeplab_lite_vit_synth.*deeplab_v2_r101"):
        build_network(CommonSegConfig(arch="unet"), 5)
    with pytest.raises(ConfigError, match='Did you mean "deeplab_lite_vit_small"'):
        common_seg_config({"common_segmentation": {"arch": "deeplab_lite_vit_smal"}})


def test_multiscale_returns_log_probabilities():
    seg = CommonSegmenter(CommonSegConfig(crop=64, test_scales=(1.0, 0.5)), DatasetInfo("x", ("a", "b")), torch.device("cpu"))
    out = seg.segment(torch.rand(1, 3, 40, 48), multiscale=True)
    assert out.shape == (1, 3, 40, 48)
    assert torch.allclose(out.exp().sum(1), torch.ones(1, 40, 48), atol=1e-4)
    assert set(seg.cost_metrics()) == {"params_common_seg", "gmacs_common_seg"}


def _spec(tmp_path):
    spec = plan_trials(load_suite("synthetic"), ["cam"], [0], parse_overrides(TINY), None, tmp_path / "cache")[0]
    return dataclasses.replace(spec, eval={**spec.eval, "common_segmentation": dict(COMMON)})


def test_runner_trains_and_evaluates_the_common_segmenter(tmp_path):
    spec = _spec(tmp_path)
    result = TrialRunner(spec, tmp_path / "a").run()
    root = tmp_path / "a" / "trials" / spec.trial_id
    assert result.records["train_seg"].status == "common"
    assert (root / "checkpoints" / "common_seg.pt").exists()
    assert not (root / "checkpoints" / "train_seg.pt").exists()  # the method's own segmenter is not trained
    for name in ("val_miou_ss", "val_miou_ms", "val_miou_ms_crf", "params_common_seg", "gmacs_common_seg"):
        assert name in result.metrics, name
    assert result.metrics["params_common_seg"] > 0
    assert any(p.name.endswith("_pred.png") for p in (root / "gallery").iterdir())

    # an interrupted trial resumes at `segment` from the checkpoint and gets the same numbers
    runner = TrialRunner(spec, tmp_path / "b", stop_after="train_seg")
    runner.run()
    state = json.loads((tmp_path / "b" / "trials" / spec.trial_id / "state.json").read_text())
    assert "segment" not in state["stages"]
    resumed = TrialRunner(spec, tmp_path / "b").run()
    assert resumed.metrics["val_miou_ss"] == result.metrics["val_miou_ss"]
    assert resumed.metrics["val_miou_ms_crf"] == result.metrics["val_miou_ms_crf"]
