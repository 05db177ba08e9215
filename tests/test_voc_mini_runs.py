"""Each method end to end through the CLI on real VOC files: the voc-mini suite's recipe with
small sizes, on a 6-train / 3-val slice of ../shared/data/voc-mini copied into tmp_path.
Slow (a minute or two per method on 2 cores); the full-size runs are `make reports`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main

pytestmark = pytest.mark.slow

# Per method: the voc-mini recipe shrunk to seconds (1 epoch / a few steps, small crops, CAMs
# and test images downscaled). Everything else is the suite's.
SMALL = {
    "weaktr": ["cam_epochs=1", "cam_batch_size=3", "cam_crop=64", "cam_scales=[0.25]", "seg_crop=64", "clip_patch=32",
               "seg_base_size=72", "window=64", "stride=48", "seg_epochs=1", "seg_batch_size=3", "test_scales=[1.0]"],
    "afa": ["iterations=3", "cls_warmup_iters=1", "rw_switch_iter=2", "warmup_iters=1", "batch_size=3", "crop=128",
            "aff_radius=2", "cam_scales=[0.5]", "test_scales=[0.5]"],
    "adcam": ["epochs=1", "batch_size=3", "crop=64", "top_k=8", "seg_iterations=2", "seg_batch_size=3", "seg_crop=64",
              "test_scales=[0.5]"],
}


@pytest.fixture(scope="module")
def voc_slice(shared_data: Path, tmp_path_factory) -> Path:
    source = shared_data / "voc-mini" / "VOC2012"
    if not source.is_dir():
        pytest.skip(f"voc-mini not found at {source} (../shared/data is not part of a clone)")
    root = tmp_path_factory.mktemp("voc-slice") / "VOC2012"
    for split, n in (("train", 6), ("val", 3)):
        ids = (source / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for folder, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            (root / folder).mkdir(exist_ok=True)
            for image_id in ids:
                shutil.copy(source / folder / f"{image_id}.{ext}", root / folder / f"{image_id}.{ext}")
    return root


@pytest.mark.parametrize("method", sorted(SMALL))
def test_method_runs_end_to_end_on_voc_files(method: str, voc_slice: Path, tmp_path: Path) -> None:
    overrides = [f"{method}.{item}" for item in SMALL[method]]
    code = main(["run", "--methods", method, "--suite", "voc-mini", "--data-root", str(voc_slice), "--seeds", "0",
                 "--results", str(tmp_path), *overrides])
    assert code == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("wsss-bench/voc-mini")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("wsss.method") == method]
    assert len(runs) == 1 and runs[0].data.tags["wsss.status"] == "finished"
    metrics = runs[0].data.metrics
    for name in ("cam_miou", "mask_miou", "val_miou_ss", "val_miou_ms_crf"):
        assert 0.0 <= metrics[name] <= 100.0 and not math.isnan(metrics[name]), name
    assert metrics["iou_val_ms_crf/background"] > 0  # real masks, real CRF: background is found
