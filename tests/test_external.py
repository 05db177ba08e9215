"""The `external` method: files made elsewhere evaluated like a built-in method.

The round trip (a built-in trial's CAMs exported with `wsss-bench export-cams`, then evaluated
as `--methods external`) must give the same CAM / mask / val-SS numbers bit for bit; the file
readers are checked on small hand-made arrays; bad directories stop the sweep (exit 2) and bad
files fail the trial with a message naming the file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from harness.cli import main
from harness.config import load_suite, parse_overrides
from harness.sweep import plan_trials
from harness.tracking import default_tracking_uri
from methods.base import DatasetInfo, NoPrediction
from methods.external.formats import ExternalFileError, read_cam_file, read_label_png, write_cam_file
from methods.external.method import External, ExternalConfig

DATA = ["dataset.num_train=12", "dataset.num_val=6", "dataset.image_size=64", "eval.gallery_size=2", "eval.crf=false", "eval.multiscale=false"]
TRAIN_IDS = [f"train_{i:05d}" for i in range(12)]  # the ids of the tiny synthetic train split (also its cam-eval split)
CAM_TINY = ["epochs=0", "seg_epochs=0",  # untrained networks: real float CAMs, no training time
            "crop=64", "seg_crop=64", "batch_size=6", "seg_batch_size=6"]
SAME = ["cam_miou", "cam_best_threshold", "cam_miou_fixed", "mask_miou", "mask_miou_gt", "val_miou_ss"]


def _run(results: Path, methods: str, *extra: str) -> int:
    return main(["run", "--methods", methods, "--dataset", "synthetic", "--seeds", "0", "--results", str(results), *DATA, *extra])


def _trial_runs(results: Path):
    client = MlflowClient(default_tracking_uri(results))
    exp = client.get_experiment_by_name("wsss-bench/synthetic")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("wsss.kind") != "sweep"]


def _run_of(results: Path, method_tag: str):
    (run,) = [r for r in _trial_runs(results) if r.data.tags["wsss.method"] == method_tag and r.data.tags["wsss.status"] == "finished"]
    return run


def _blank_cams(directory: Path, ids=TRAIN_IDS, size: int = 64) -> Path:
    """Valid CAM files (no present class: all-zero maps) for ``ids``, in the harness's npz layout."""
    directory.mkdir(parents=True, exist_ok=True)
    for sample_id in ids:
        write_cam_file(directory, sample_id, np.zeros(0, np.int64), np.zeros((0, size, size), np.float32), 5, "npz")
    return directory


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny `cam` trial and its export (IRN-style CAMs, masks, predictions)."""
    results = tmp_path_factory.mktemp("results")
    assert _run(results, "cam", *CAM_TINY) == 0
    (trial,) = [p.name for p in (results / "trials").iterdir()]
    out = results / "export"
    assert main(["export-cams", "--results", str(results), "--trial", trial, "--out", str(out), "--format", "irn"]) == 0
    return results, out


def _same_numbers(a: dict[str, float], b: dict[str, float], keys: list[str]) -> None:
    per_class = [k for k in a if k.startswith(("iou_cam/", "iou_mask/"))]
    assert per_class
    for key in keys + per_class:
        assert a[key] == b[key], key  # bit for bit, not approx


@pytest.mark.slow
def test_round_trip_cams_masks_predictions_bit_for_bit(builtin):
    results, out = builtin
    assert _run(results, "external", "external.name=cam-files", f"external.cams={out / 'cams'}", f"external.masks={out / 'masks'}",
                f"external.predictions={out / 'predictions'}") == 0
    reference, external = _run_of(results, "cam"), _run_of(results, "cam-files")
    _same_numbers(reference.data.metrics, external.data.metrics, SAME)
    # the run records the directories and the files' hash; the row carries the given name
    params = external.data.params
    assert params["method.cams"] == str(out / "cams") and params["method.predictions"] == str(out / "predictions")
    assert len(params["method.files_hash"]) == 16
    assert external.data.metrics["params_total"] == 0
    board = pd.read_csv(results / "report" / "synthetic" / "leaderboard.csv")
    assert "cam-files" in set(board["label"])


@pytest.mark.slow
def test_round_trip_cams_only_uses_common_mask_recipe(builtin, tmp_path):
    """Dense CAM arrays, no masks: pseudo masks by the common threshold recipe at the cam
    baseline's threshold (0.35) give the cam baseline's mask mIoU exactly."""
    results, out = builtin
    dense = tmp_path / "dense"
    dense.mkdir()
    for path in sorted((out / "cams").glob("*.npy")):
        classes, maps = read_cam_file(path, 5)
        write_cam_file(dense, path.stem, classes, maps, 5, "dense")
    assert _run(results, "external", "external.name=cam-dense", f"external.cams={dense}", "external.bg_threshold=0.35",
                f"external.predictions={out / 'predictions'}") == 0
    _same_numbers(_run_of(results, "cam").data.metrics, _run_of(results, "cam-dense").data.metrics, SAME)


@pytest.mark.slow
def test_every_export_format_reads_back_the_same_maps(builtin, tmp_path):
    _, out = builtin
    source = sorted((out / "cams").glob("*.npy"))[0]
    classes, maps = read_cam_file(source, 5)
    for style in ("npz", "dense", "irn", "weaktr"):
        path = write_cam_file(tmp_path, f"{style}_x", classes, maps, 5, style)
        got_classes, got_maps = read_cam_file(path, 5)
        if style == "dense":  # every class; the absent ones are zero
            assert np.array_equal(got_maps[classes], maps) and not got_maps[np.setdiff1d(np.arange(5), classes)].any()
        else:
            assert np.array_equal(got_classes, classes) and np.array_equal(got_maps, maps)


def test_changed_directory_is_a_new_trial_and_a_stale_one_fails(tmp_path):
    cams = _blank_cams(tmp_path / "cams")
    overrides = parse_overrides(DATA + [f"external.cams={cams}"])

    def plan():
        return plan_trials(load_suite("synthetic"), ["external"], [0], overrides, None, tmp_path / "cache")[0]

    before = plan()
    assert plan().trial_id == before.trial_id  # same files, same trial
    write_cam_file(cams, "train_00000", np.array([0]), np.zeros((1, 64, 64), np.float32), 5, "npz")  # a map added
    after = plan()
    assert after.trial_id != before.trial_id and after.method_config["files_hash"] != before.method_config["files_hash"]
    # the trial planned before the change refuses to evaluate the changed files
    method = External(ExternalConfig(**before.method_config), DatasetInfo("synthetic", ("a",) * 5), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="changed since this trial was planned"):
        method.train_cam([], None)


@pytest.mark.parametrize("damage, message", [
    ("remove", "has no file for 1 id(s) of the cam_eval split: train_00003"),
    ("extra", "holds 1 file(s) for ids in none of the dataset's train / cam-eval / val splits: not_an_image"),
    ("nocams", "needs `external.cams=DIR`"),
])
def test_bad_directory_stops_before_running(tmp_path, capsys, damage, message):
    cams = _blank_cams(tmp_path / "cams")
    if damage == "remove":
        (cams / "train_00003.npz").unlink()
    if damage == "extra":
        shutil.copyfile(cams / "train_00003.npz", cams / "not_an_image.npz")
    args = [] if damage == "nocams" else [f"external.cams={cams}"]
    assert _run(tmp_path / "results", "external", *args) == 2
    text = " ".join(capsys.readouterr().out.split())
    assert message in text and "Traceback" not in text
    if damage != "nocams":
        assert str(cams) in text


def test_bad_file_fails_the_trial_naming_the_file(tmp_path, capsys):
    cams = _blank_cams(tmp_path / "cams")
    _blank_cams(cams, ["train_00002"], size=32)  # wrong size
    assert _run(tmp_path / "results", "external", f"external.cams={cams}") == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "train_00002.npz" in text and "32x32 (WxH) but the image is 64x64" in text


# -- readers and checks on hand-made arrays ---------------------------------------------------

INFO = DatasetInfo("toy", ("a", "b", "c"), input_size=2)


def _external(tmp_path: Path, **config) -> External:
    return External(ExternalConfig(cams=str(tmp_path), **config), INFO, torch.device("cpu"))


def _save_pickle(path: Path, content) -> None:
    np.save(path, content, allow_pickle=True)


def test_irn_weaktr_dense_and_background_based_layouts(tmp_path):
    high = np.array([[[0.0, 0.5], [1.0, 0.25]]], dtype=np.float32)  # one present class, 2x2
    # IRN make_cam.py: keys is a torch tensor of foreground indices, `cam` strided, `high_res` at image size
    _save_pickle(tmp_path / "irn.npy", {"keys": torch.tensor([2]), "cam": torch.zeros(1, 1, 1), "high_res": high})
    classes, maps = read_cam_file(tmp_path / "irn.npy", 3)
    assert classes.tolist() == [2] and np.array_equal(maps, high)
    # WeakTr engine.py: {foreground index: (H, W) map}
    _save_pickle(tmp_path / "weaktr.npy", {0: high[0], 2: high[0] / 2})
    classes, maps = read_cam_file(tmp_path / "weaktr.npy", 3)
    assert classes.tolist() == [0, 2] and np.array_equal(maps[1], high[0] / 2)
    # keys counting background as 0: key 3 is foreground class 2, key 0 is skipped
    _save_pickle(tmp_path / "bg.npy", {0: high[0], 3: high[0]})
    classes, _ = read_cam_file(tmp_path / "bg.npy", 3, class_index_base=1)
    assert classes.tolist() == [2]
    np.save(tmp_path / "dense3.npy", np.zeros((3, 2, 2), np.float32))  # dense: channel c is class c, whatever the base
    assert read_cam_file(tmp_path / "dense3.npy", 3, class_index_base=1)[0].tolist() == [0, 1, 2]
    np.save(tmp_path / "dense.npy", np.zeros((4, 2, 2), np.float32))  # C + 1 channels: background included
    with pytest.raises(ExternalFileError, match="drop the background channel"):
        read_cam_file(tmp_path / "dense.npy", 3)


def test_unpickling_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.npy"
    with open(path, "wb") as handle:  # an object .npy whose pickle calls a function
        np.lib.format.write_array_header_1_0(handle, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(np.array({"keys": Evil()}, dtype=object), handle)
    with pytest.raises(ExternalFileError, match="refusing to load .*print"):
        read_cam_file(path, 3)


def test_cams_checks_and_minmax(tmp_path):
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    images = torch.zeros(1, 3, 2, 2)
    # values 2, 4, 6, 10: min-max gives (x - 2) / 8 = 0, 0.25, 0.5, 1
    _save_pickle(tmp_path / "x.npy", {0: np.array([[2.0, 4.0], [6.0, 10.0]], np.float32)})
    with pytest.raises(ExternalFileError, match=r"x.npy has values in \[2, 10\]; expected \[0, 1\]"):
        _external(tmp_path).cams(images, labels, ids=["x"])
    cams = _external(tmp_path, normalize="minmax").cams(images, labels, ids=["x"])
    assert cams[0, 0].tolist() == [[0.0, 0.25], [0.5, 1.0]] and not cams[0, 1:].any()
    # a map for class b, absent from the labels
    _save_pickle(tmp_path / "y.npy", {0: np.zeros((2, 2), np.float32), 1: np.full((2, 2), 0.5, np.float32)})
    with pytest.raises(ExternalFileError, match=r"y.npy has a non-zero map for class\(es\) \['b'\]"):
        _external(tmp_path).cams(images, labels, ids=["y"])
    assert not _external(tmp_path, absent="zero").cams(images, labels, ids=["y"]).any()
    with pytest.raises(ExternalFileError, match="no CAM file for image 'z'"):
        _external(tmp_path).cams(images, labels, ids=["z"])


def test_predictions_and_masks_from_png(tmp_path):
    pred = np.array([[0, 3], [255, 1]], np.uint8)
    Image.fromarray(pred, mode="L").save(tmp_path / "v.png")
    method = _external(tmp_path, predictions=str(tmp_path), masks=str(tmp_path))
    assert method.has_segmenter and method.wants_ids
    images = torch.zeros(1, 3, 2, 2)
    # one-hot logits: the read class wins; a 255 pixel has equal logits -> background (0)
    assert method.segment(images, ids=["v"]).argmax(1)[0].tolist() == [[0, 3], [0, 1]]
    assert method.pseudo_masks(images, torch.zeros(1, 3, 2, 2), torch.ones(1, 3), ids=["v"])[0].tolist() == [[0, 3], [255, 1]]
    with pytest.raises(NoPrediction):
        method.segment(images, ids=["w"])
    palette = Image.fromarray(pred, mode="P")  # a palette PNG is read as its indices, not its colours
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [255, 255, 255] * 252)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(read_label_png(tmp_path / "p.png", 3, (2, 2)), pred)
    Image.fromarray(np.array([[0, 4], [0, 0]], np.uint8), mode="L").save(tmp_path / "bad.png")
    with pytest.raises(ExternalFileError, match=r"bad.png holds values \[4\]"):
        read_label_png(tmp_path / "bad.png", 3, (2, 2))
    assert not _external(tmp_path).has_segmenter  # no predictions: the harness's common recipe segments


def test_threshold_recipe_with_crf_keeps_present_classes(tmp_path):
    """pseudo_crf=true: the threshold masks (class a at 0.9 > 0.35 on the left column, background
    on the right) refined by the dense CRF; labels stay in {background, present classes}."""
    cams = torch.tensor([[[[0.9, 0.0], [0.9, 0.0]], [[0.0] * 2] * 2, [[0.0] * 2] * 2]])
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    masks = _external(tmp_path, pseudo_crf=True).pseudo_masks(torch.zeros(1, 3, 2, 2), cams, labels, ids=["x"])
    assert masks.shape == (1, 2, 2) and set(masks.flatten().tolist()) <= {0, 1}
    assert _external(tmp_path).pseudo_masks(torch.zeros(1, 3, 2, 2), cams, labels, ids=["x"])[0].tolist() == [[1, 0], [1, 0]]


def test_export_of_an_unknown_trial_is_a_clean_error(tmp_path, capsys):
    assert main(["export-cams", "--results", str(tmp_path), "--trial", "abc123", "--out", str(tmp_path / "out")]) == 2
    assert "No trial 'abc123'" in capsys.readouterr().out


@pytest.mark.slow
def test_cams_without_predictions_train_the_common_segmenter(tmp_path):
    """No predictions: train_seg trains harness/common_seg.py (here the suite's 1-epoch recipe)
    on the threshold pseudo masks, and segment evaluates it."""
    suite = tmp_path / "ext-suite.toml"
    cams = _blank_cams(tmp_path / "cams")
    suite.write_text('[suite]\ndataset = "synthetic"\n[eval.common_segmentation]\nepochs = 1\ncrop = 64\nbatch_size = 6\n'
                     f'[methods.external]\nname = "blank"\ncams = "{cams}"\n')  # the directory from the suite's table
    assert main(["run", "--methods", "external", "--suite", str(suite), "--seeds", "0", "--results", str(tmp_path / "r"), *DATA]) == 0
    (trial,) = (tmp_path / "r" / "trials").iterdir()
    state = json.loads((trial / "state.json").read_text())["stages"]
    assert state["train_seg"]["status"] == "common" and "params_common_seg" in state["train_seg"]["metrics"]
    assert (trial / "checkpoints" / "common_seg.pt").is_file() and "val_miou_ss" in state["segment"]["metrics"]
