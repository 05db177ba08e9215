"""End-to-end runs of the `cam` baseline on tiny synthetic data through the CLI: every
metric lands in MLflow and the report, same seed -> same metrics, resume, no re-runs, and
the errors users get for bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import Overrides, load_suite
from harness.sweep import execute_trial, plan_trials
from harness.tracking import default_tracking_uri

TINY = ["dataset.num_train=12", "dataset.num_val=6", "dataset.image_size=64", "epochs=1", "seg_epochs=1",
        "crop=64", "seg_crop=64", "batch_size=6", "seg_batch_size=6", "eval.gallery_size=2"]
CORE_METRICS = ["cam_miou", "cam_best_threshold", "cam_miou_fixed", "cam_fixed_threshold", "cam_threshold_stop", "mask_miou",
                "mask_miou_ignore255", "mask_ignored_pct", "val_miou_ss", "val_miou_ms",
                "val_miou_ms_crf", "params_total", "gmacs_total", "time_train_cam_s", "time_segment_s", "peak_rss_train_cam_mb"]


def _run(results: Path, *extra: str) -> int:
    return main(["run", "--methods", "cam", "--dataset", "synthetic", "--seeds", "0", "--results", str(results), *TINY, *extra])


def _all_runs(results: Path):
    client = MlflowClient(default_tracking_uri(results))
    exp = client.get_experiment_by_name("wsss-bench/synthetic")
    return client.search_runs([exp.experiment_id])


def _runs(results: Path):
    return [r for r in _all_runs(results) if r.data.tags.get("wsss.kind") != "sweep"]


def _sweep_run(results: Path):
    (run,) = [r for r in _all_runs(results) if r.data.tags.get("wsss.kind") == "sweep"]
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results")
    assert _run(results) == 0
    return results


def test_every_metric_lands_in_mlflow_and_report(finished):
    runs = _runs(finished)
    assert len(runs) == 1
    run = runs[0]
    for name in CORE_METRICS:
        assert name in run.data.metrics, name
    assert 0 <= run.data.metrics["cam_miou"] <= 100
    assert any(k.startswith("iou_cam/") for k in run.data.metrics)
    assert run.data.tags["wsss.status"] == "finished" and run.info.status == "FINISHED"
    parent = _sweep_run(finished)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # the sweep's parent run ends with its trials (the MLflow UI must not show it running forever)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 1
    assert run.data.params["method.epochs"] == "1"
    curve = MlflowClient(default_tracking_uri(finished)).get_metric_history(run.info.run_id, "cam_curve")
    # the whole range swept: 0.00 .. cam_threshold_stop (0.60, or wider when the best was at its end)
    assert [p.step for p in curve] == list(range(0, round(run.data.metrics["cam_threshold_stop"] * 100) + 1))
    assert run.data.metrics["cam_fixed_threshold"] == 0.35  # the cam baseline's own bg_threshold
    # per-step losses arrive through the background buffer: one point per epoch (epochs=1), at step 0
    losses = MlflowClient(default_tracking_uri(finished)).get_metric_history(run.info.run_id, "cls_loss")
    assert [p.step for p in losses] == [0] and losses[0].value > 0
    artifacts = {a.path for a in MlflowClient(default_tracking_uri(finished)).list_artifacts(run.info.run_id, "gallery")}
    assert any(p.endswith("_cam.png") for p in artifacts) and any(p.endswith("_pred.png") for p in artifacts)
    table = pd.read_csv(finished / "report" / "synthetic" / "leaderboard.csv")
    assert table.loc[0, "method"] == "cam" and table.loc[0, "n_seeds"] == 1
    assert table.loc[0, "cam_miou_mean"] == pytest.approx(run.data.metrics["cam_miou"])
    assert "cam" in (finished / "report" / "synthetic" / "leaderboard.md").read_text()


def test_finished_trial_is_not_rerun(finished, capsys):
    state = next((finished / "trials").glob("*/state.json"))
    before = state.stat().st_mtime_ns
    assert _run(finished) == 0
    assert state.stat().st_mtime_ns == before
    assert len(_runs(finished)) == 1
    assert "skipped" in capsys.readouterr().out


def test_dry_run_shows_states(finished, capsys):
    assert _run(finished, "--dry-run", "--seeds", "0,1") == 0
    out = capsys.readouterr().out
    assert "finished" in out and "new" in out


def test_dry_run_on_a_new_results_dir_creates_no_store(tmp_path, capsys):
    assert _run(tmp_path, "--dry-run") == 0
    assert "new" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()  # looking must not create the MLflow store
    assert _run(tmp_path / "not" / "yet", "--dry-run") == 0
    assert not (tmp_path / "not").exists()  # ... nor the results directory


def test_same_seed_same_metrics(finished, tmp_path, capsys):
    assert _run(tmp_path) == 0
    a, b = _runs(finished)[0].data.metrics, _runs(tmp_path)[0].data.metrics
    quality = [k for k in a if "iou" in k or "threshold" in k]
    assert quality and {k: a[k] for k in quality} == {k: b[k] for k in quality}
    # each trial's end is one log line with its headline figures (logs, not only a progress bar)
    line = f"finished cam/synthetic/seed0 ({_runs(tmp_path)[0].data.tags['wsss.trial_id']}): CAM {b['cam_miou']:.1f}, mask {b['mask_miou']:.1f}"
    assert line in " ".join(capsys.readouterr().out.split())


def test_interrupted_trial_resumes_at_next_stage(finished, tmp_path):
    suite = load_suite("synthetic")
    from harness.config import parse_overrides

    spec = plan_trials(suite, ["cam"], [0], parse_overrides(TINY), None, tmp_path / "cache")[0]
    uri = default_tracking_uri(tmp_path)
    first = execute_trial(spec, tmp_path, uri, stop_after="pseudo_masks")
    assert first.state == "interrupted"
    state = json.loads((tmp_path / "trials" / spec.trial_id / "state.json").read_text())
    assert set(state["stages"]) == {"train_cam", "cams", "pseudo_masks"}
    checkpoint = tmp_path / "trials" / spec.trial_id / "checkpoints" / "train_cam.pt"
    mtime = checkpoint.stat().st_mtime_ns
    second = execute_trial(spec, tmp_path, uri)
    assert second.state == "finished" and second.resumed_from == "train_seg"
    assert checkpoint.stat().st_mtime_ns == mtime  # train_cam was not redone
    assert second.run_id == first.run_id  # one MLflow run, not two
    # and the resumed trial equals an uninterrupted one
    reference = _runs(finished)[0].data.metrics
    assert second.metrics["val_miou_ss"] == reference["val_miou_ss"]
    assert second.metrics["cam_miou"] == reference["cam_miou"]


def test_force_reruns_and_keeps_old_run(finished, tmp_path):
    results = tmp_path / "copy"
    assert _run(results) == 0
    assert _run(results, "--force") == 0
    runs = [r for r in _runs(results)]
    assert len(runs) == 2
    assert sum(r.data.tags.get("wsss.superseded") == "true" for r in runs) == 1


def test_failed_trial_is_recorded_and_exit_code_nonzero(tmp_path, capsys):
    code = _run(tmp_path, "bg_threshold=2.0", "cam_scales=0.0")
    assert code == 1
    runs = _runs(tmp_path)
    assert runs[0].data.tags["wsss.status"] == "failed"
    assert "wsss.error" in runs[0].data.tags
    parent = _sweep_run(tmp_path)
    assert parent.info.status == "FAILED" and parent.data.metrics["trials_failed"] == 1
    assert (next((tmp_path / "trials").iterdir()) / "error.txt").exists()
    assert "failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "cma", "--dataset", "synthetic"], 'Did you mean "cam"'),
        (["--methods", "cam", "--dataset", "synthetik"], 'Did you mean "synthetic"'),
        (["--methods", "cam", "--suite", "voc-mimi"], 'Did you mean "voc-mini"'),
        (["--methods", "cam", "--dataset", "synthetic", "epoch=2"], 'Did you mean "epochs"'),
        (["--methods", "cam", "--dataset", "voc", "--data-root", "/nonexistent/VOC2012"], "/nonexistent/VOC2012"),
        (["--methods", "cam", "--dataset", "synthetic", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
        (["--methods", "cam", "--dataset", "synthetic", "--seeds", "a,b"], "--seeds must be comma-separated integers"),
    ],
)
def test_bad_input_gives_one_clear_message(tmp_path, capsys, args, message):
    code = main(["run", *args, "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 2
    assert message in " ".join(out.split())
    assert "Traceback" not in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission checks cannot fail")
def test_unwritable_results_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    assert main(["run", "--methods", "cam", "--dataset", "synthetic", "--results", str(locked / "r")]) == 2
    assert "not writable" in capsys.readouterr().out


def test_results_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", "--methods", "cam", "--dataset", "synthetic", "--results", str(blocker / "r")]) == 2
    assert "not writable" in capsys.readouterr().out


def test_lost_store_or_lost_trial_dir_never_recomputes(tmp_path):
    results = tmp_path / "r"
    assert _run(results) == 0
    trial = next((results / "trials").iterdir())
    metrics = _runs(results)[0].data.metrics
    checkpoint_mtime = (trial / "checkpoints" / "train_cam.pt").stat().st_mtime_ns
    # A new tracking store: the finished trial directory is logged again, not recomputed.
    (results / "mlflow.db").unlink()
    assert _run(results) == 0
    assert (trial / "checkpoints" / "train_cam.pt").stat().st_mtime_ns == checkpoint_mtime
    runs = _runs(results)
    assert len(runs) == 1 and runs[0].data.metrics["cam_miou"] == metrics["cam_miou"]
    # The trial directory removed: MLflow still holds the finished run, so nothing re-runs.
    import shutil

    shutil.rmtree(trial)
    assert _run(results) == 0
    assert not (trial / "state.json").exists() and len(_runs(results)) == 1
