"""A trial killed inside a training stage resumes from its mid-stage checkpoint and ends
with the same numbers, bit for bit, as an uninterrupted trial (CPU)."""

from __future__ import annotations

import pytest

from harness.config import load_suite, parse_overrides
from harness.sweep import execute_trial, plan_trials
from harness.tracking import default_tracking_uri

TINY = ["dataset.num_train=12", "dataset.num_val=6", "dataset.image_size=64", "epochs=2", "seg_epochs=1",
        "crop=64", "seg_crop=64", "batch_size=6", "seg_batch_size=6", "eval.gallery_size=0", "eval.crf=false"]


def _spec(cache):
    return plan_trials(load_suite("synthetic"), ["cam"], [0], parse_overrides(TINY), None, cache)[0]


@pytest.mark.slow
def test_kill_inside_train_cam_then_rerun_gives_identical_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CHECKPOINT_STEPS", "1")
    cache = tmp_path / "cache"
    reference = execute_trial(_spec(cache), tmp_path / "ref", default_tracking_uri(tmp_path / "ref"))
    assert reference.state == "finished"

    spec = _spec(cache)
    results = tmp_path / "run"
    seen = []

    def kill_at_step_3(stage, done, total):
        seen.append((stage, done))
        if stage == "train_cam" and done == 3:  # inside step 3 of 4: steps 1-2 are checkpointed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_trial(spec, results, default_tracking_uri(results), progress=kill_at_step_3)
    work = results / "trials" / spec.trial_id / "work" / "train_cam"
    assert (work / "cls.pt").exists()

    resumed_steps = []
    second = execute_trial(spec, results, default_tracking_uri(results),
                           progress=lambda stage, done, total: resumed_steps.append((stage, done)))
    assert second.state == "finished"
    # train_cam went on from step 3 (the checkpoint after 2 steps), not from step 1
    assert [d for s, d in resumed_steps if s == "train_cam" and d] == [3, 4]
    assert not (work / "cls.pt").exists()
    keys = [k for k in reference.metrics if k.startswith(("cam_", "mask_", "val_", "iou_"))]
    assert keys and {k: second.metrics[k] for k in keys} == {k: reference.metrics[k] for k in keys}
