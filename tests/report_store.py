"""A small MLflow store with known numbers, written directly through MlflowClient in the
shape harness/tracking.py writes (tags, params, metrics, cam_curve history, gallery
artifacts), for the report tests.

Suite ``demo`` on dataset ``synthetic``, metric ``val_miou_ss`` by seed:

=============  =========================  ===========================================
row            seeds: value               notes
=============  =========================  ===========================================
alpha          0: 60, 1: 62, 2: 64        mean 62, std 2
beta           0: 50, 1: 51, 2: 53        mean 51.333, std 1.5275
gamma          0: 61, 1: 61.5             seed 2 failed (listed, not averaged)
delta @aaa     0: 45                      code version aaa (one seed)
delta @bbb     1: 40, 2: 43               code version bbb: never averaged with aaa
eps            -                          seed 0 still "running", seed 1 tagged finished
                                          but its MLflow run is RUNNING (not finished)
=============  =========================  ===========================================

plus a superseded alpha run (seed 0, value 99) that must be ignored, and a run in a second
suite ``other``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

VAL_SS = {
    ("alpha", "c1"): {0: 60.0, 1: 62.0, 2: 64.0},
    ("beta", "c1"): {0: 50.0, 1: 51.0, 2: 53.0},
    ("gamma", "c1"): {0: 61.0, 1: 61.5},
    ("delta", "aaa"): {0: 45.0},
    ("delta", "bbb"): {1: 40.0, 2: 43.0},
}
VAL_MS_CRF = {0: 65.0, 1: 66.0, 2: 67.0}  # alpha only
CLASSES = ("background", "disc", "square")
GALLERY_IDS = ("img_000", "img_001")


def _curve(peak: float, best_t: float) -> list[tuple[int, float]]:
    return [(step, peak - 200 * (step / 100 - best_t) ** 2) for step in range(0, 61, 5)]


def _png(path: Path, kind: str, value: int) -> None:
    from PIL import Image

    from harness.visualize import save_label_png

    rng = np.random.default_rng(value)
    if kind in ("image", "cam"):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
    else:
        labels = np.zeros((48, 48), np.uint8)
        labels[8:30, 10:40] = 1 + value % 2
        labels[0:3] = 255
        save_label_png(labels, path)


def build_store(root: Path) -> str:
    uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    client = MlflowClient(uri)
    # Artifacts under root (MLflow's default, ./mlruns, would land in the working directory).
    demo = client.create_experiment("wsss-bench/demo", artifact_location=(root / "artifacts" / "demo").resolve().as_uri())
    other = client.create_experiment("wsss-bench/other", artifact_location=(root / "artifacts" / "other").resolve().as_uri())
    client.create_experiment("unrelated-experiment", artifact_location=(root / "artifacts" / "unrelated").resolve().as_uri())

    def run(experiment, method, seed, commit, metrics=None, status="finished", mlflow_status="FINISHED", superseded=False,
            curve=None, gallery=None, error="", params=None, hardware="cpu x86_64 x2"):
        tags = {"wsss.trial_id": f"{method}-{seed}-{commit}", "wsss.method": method, "wsss.dataset": "synthetic",
                "wsss.suite": "demo" if experiment == demo else "other", "wsss.seed": str(seed), "wsss.status": status,
                "wsss.git_commit": commit, "wsss.code_version": "0.1.0", "wsss.hardware": hardware}
        if superseded:
            tags["wsss.superseded"] = "true"
        if error:
            tags["wsss.error"] = error
        r = client.create_run(experiment, run_name=f"{method}-s{seed}", tags=tags)
        rid = r.info.run_id
        all_params = {"seed": str(seed), "method.epochs": "2", "eval.convention": "present", "eval.fixed_threshold": "0.4",
                      "eval.threshold_start": "0.0", "eval.threshold_stop": "0.6", "eval.threshold_step": "0.01", **(params or {})}
        client.log_batch(rid, params=[Param(k, v) for k, v in all_params.items()])
        points = [Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()]
        points += [Metric("cam_curve", v, 0, s) for s, v in (curve or [])]
        if points:
            client.log_batch(rid, metrics=points)
        for kind_value in gallery or []:
            folder = root / "art" / rid
            folder.mkdir(parents=True, exist_ok=True)
            for image_id in GALLERY_IDS:
                for kind in ("image", "gt", "cam", "mask", "pred"):
                    _png(folder / f"{image_id}_{kind}.png", kind, kind_value + (0 if kind in ("image", "gt") else seed))
            client.log_artifacts(rid, str(folder), artifact_path="gallery")
        client.set_terminated(rid, status=mlflow_status)
        return rid

    for (method, commit), values in VAL_SS.items():
        for seed, value in values.items():
            metrics = {
                "val_miou_ss": value,
                "cam_miou": value - 10,
                "cam_miou_fixed": value - 12,
                "cam_best_threshold": 0.3,
                "mask_miou": value - 5,
                "time_train_cam_s": 100.0 + seed,
                "cpu_train_cam_s": 180.0,
                "time_cams_s": 10.0,
                "cpu_cams_s": 15.0,
                "time_pseudo_masks_s": 20.0,
                "cpu_pseudo_masks_s": 30.0,
                "time_train_seg_s": 200.0,
                "cpu_train_seg_s": 360.0,
                "time_segment_s": 30.0,
                "cpu_segment_s": 40.0,
                "time_total_s": 360.0 + seed,
                "peak_rss_train_cam_mb": 1000.0 + seed,
                "peak_rss_train_seg_mb": 1500.0,
                "params_total": 2_000_000.0,
                "params_classifier": 1_000_000.0,
                "params_segmenter": 1_000_000.0,
                "gmacs_total": 1.5,
                "gmacs_classifier": 0.5,
                "gmacs_segmenter": 1.0,
            }
            for index, name in enumerate(CLASSES):
                metrics[f"iou_val_ss/{name}"] = value + index
                metrics[f"iou_mask/{name}"] = value - 5 + index
            if method == "alpha":
                metrics["val_miou_ms_crf"] = VAL_MS_CRF[seed]
            run(demo, method, seed, commit, metrics, curve=_curve(value - 10, 0.3),
                gallery=[hash(method) % 7] if seed == min(values) else None)
    run(demo, "gamma", 2, "c1", status="failed", mlflow_status="FAILED", error="RuntimeError: out of memory")
    run(demo, "alpha", 0, "c1", {"val_miou_ss": 99.0}, superseded=True)
    run(demo, "eps", 0, "c1", status="running", mlflow_status="RUNNING")
    run(demo, "eps", 1, "c1", {"val_miou_ss": 70.0}, status="finished", mlflow_status="RUNNING")
    run(other, "alpha", 0, "c1", {"val_miou_ss": 30.0, "time_total_s": 10.0, "time_train_cam_s": 5.0})
    return uri


_CACHE: dict[str, str] = {}


def cached_store(tmp_path_factory) -> str:
    """One store per test session (creating an MLflow SQLite schema takes seconds)."""
    if "uri" not in _CACHE:
        _CACHE["uri"] = build_store(tmp_path_factory.mktemp("report-store"))
    return _CACHE["uri"]
