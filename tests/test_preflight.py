"""The pre-flight data check (harness/datasets/preflight.py) through the CLI, on copies of the
real voc-mini and coco-tiny files damaged the ways real downloads are: every case exits 2
before anything runs, with one message naming the file, and records nothing (no MLflow store,
no trial directory). Also: one trial id for every spelling of the same data root (``~``
included), the train_aug -> train fallback, and ``--suite FILE`` without ``--methods``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.config import Overrides, load_suite
from harness.datasets import create_dataset
from harness.datasets.preflight import preflight
from harness.errors import DataError
from harness.sweep import plan_trials

TRIAL_ID = re.compile(r"│ ([0-9a-f]{12}) │ (\w+)")


@pytest.fixture()
def voc(shared_data: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """data/VOCdevkit/VOC2012 holding 3 real voc-mini images (in train and val) with masks."""
    source = shared_data / "voc-mini" / "VOC2012"
    if not source.is_dir():
        pytest.skip(f"voc-mini not found at {source}")
    ids = (source / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:3]
    target = tmp_path / "data" / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (target / folder).mkdir(parents=True)
    for i in ids:
        shutil.copy(source / "JPEGImages" / f"{i}.jpg", target / "JPEGImages")
        shutil.copy(source / "SegmentationClass" / f"{i}.png", target / "SegmentationClass")
    for split in ("train", "val"):
        (target / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return target, ids


@pytest.fixture()
def coco(shared_data: Path, tmp_path: Path) -> Path:
    source = shared_data / "coco-tiny"
    if not source.is_dir():
        pytest.skip(f"coco-tiny not found at {source}")
    return Path(shutil.copytree(source, tmp_path / "coco"))


def suite_file(tmp_path: Path, dataset: str, root: Path | None, train: str | None = None) -> Path:
    """A suite of two methods on ``dataset`` (trials are never started by these tests)."""
    lines = ["[suite]", f'dataset = "{dataset}"', "seeds = [0, 1]", 'methods = ["cam", "afa"]']
    if root is not None:
        lines += ["[dataset]", f'root = "{root}"']
    if train is not None:
        lines += ["[splits]", f'train = "{train}"']
    # real data needs its weights spelled out (random init here: no download in these tests)
    lines += ["[methods.cam]", 'pretrained = "none"', 'seg_pretrained = "none"', "[methods.afa]", 'pretrained = "none"']
    path = tmp_path / f"{dataset}-suite.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(results: Path, *args: str) -> int:
    return main(["run", "--results", str(results), *args])


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_refused(capsys: pytest.CaptureFixture[str], code: int, results: Path, *culprits: object) -> str:
    """Exit 2, one message naming every culprit, no traceback, nothing recorded."""
    out = flat(capsys.readouterr().out)
    assert code == 2, out
    assert "Traceback" not in out
    for culprit in culprits:
        assert str(culprit) in out, (culprit, out)
    assert not (results / "mlflow.db").exists(), "no MLflow store created"
    assert not (results / "trials").exists(), "no trial directory created"
    return out


def damage_voc(root: Path, ids: list[str], damage: str) -> Path:
    """Break the VOC copy one way; return the file (or folder) the message must name."""
    image = root / "JPEGImages" / f"{ids[1]}.jpg"
    mask = root / "SegmentationClass" / f"{ids[1]}.png"
    if damage == "missing_image":
        image.unlink()
        return image
    if damage == "zero_byte_image":
        image.write_bytes(b"")
        return image
    if damage == "truncated_jpeg":
        image.write_bytes(image.read_bytes()[:2000])  # a download cut short: header, no end marker
        return image
    if damage == "mask_size":
        with Image.open(mask) as original:
            small = original.crop((0, 0, original.width - 5, original.height))
            small.save(mask)
        return mask
    if damage == "missing_mask":
        mask.unlink()
        return root / "SegmentationClass" / f"{ids[1]}.png"
    if damage == "no_jpegimages":
        shutil.rmtree(root / "JPEGImages")
        return root / "JPEGImages"
    if damage == "missing_val_list":
        (root / "ImageSets" / "Segmentation" / "val.txt").unlink()
        return root / "ImageSets" / "Segmentation" / "val.txt"
    if damage == "binary_list":
        (root / "ImageSets" / "Segmentation" / "train.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
        return root / "ImageSets" / "Segmentation" / "train.txt"
    raise AssertionError(damage)


@pytest.mark.parametrize(
    "damage",
    ["missing_image", "zero_byte_image", "truncated_jpeg", "mask_size", "missing_mask", "no_jpegimages",
     "missing_val_list", "binary_list"],
)
def test_broken_voc_is_refused_before_anything_runs(voc, tmp_path, capsys, damage):
    root, ids = voc
    culprit = damage_voc(root, ids, damage)
    results = tmp_path / "results"
    code = run(results, "--suite", str(suite_file(tmp_path, "voc", root)))
    out = assert_refused(capsys, code, results, culprit)
    assert "DataError" in out and "Nothing was run or recorded" in out


def test_dry_run_checks_the_data_too(voc, tmp_path, capsys):
    root, ids = voc
    culprit = damage_voc(root, ids, "missing_image")
    results = tmp_path / "results"
    assert_refused(capsys, run(results, "--suite", str(suite_file(tmp_path, "voc", root)), "--dry-run"), results, culprit)


def test_every_problem_is_counted_and_the_first_ones_named(voc, tmp_path):
    root, ids = voc
    for i in ids:
        (root / "JPEGImages" / f"{i}.jpg").unlink()
    dataset = create_dataset("voc", root, tmp_path, {})
    with pytest.raises(DataError) as error:
        dataset.check_split("train")
    message = str(error.value)
    assert "found 3 problem(s)" in message  # three listed ids, three missing images
    assert all(f"image {i}: Image not found: {root / 'JPEGImages' / (i + '.jpg')}" in message for i in ids)


def test_mask_values_are_left_to_the_trial_and_name_the_image(voc, tmp_path):
    """Values need decoding (not cheap): the pre-flight passes, and the trial's read error
    starts with the split and image id and names the mask file."""
    root, ids = voc
    mask = root / "SegmentationClass" / f"{ids[1]}.png"
    with Image.open(mask) as original:
        values, palette = np.array(original), original.getpalette()
    values[0, 0] = 42  # 42 is neither a VOC class (0..20) nor ignore (255)
    broken = Image.fromarray(values, mode="P")
    broken.putpalette(palette)
    broken.save(mask)
    dataset = create_dataset("voc", root, tmp_path, {})
    dataset.check_split("train")
    with pytest.raises(DataError) as error:
        dataset.split("train")[1]
    first_line = str(error.value).splitlines()[0]
    assert first_line.startswith(f"voc split train, image {ids[1]}: Mask {mask} holds values 42")


def test_coco_swapped_size_names_entry_file_and_both_sizes(coco, tmp_path, capsys):
    annotations = coco / "annotations" / "instances_val2017.json"
    data = json.loads(annotations.read_text())
    entry = data["images"][0]  # id 471345, 000000471345.jpg, 640 x 480 in the JSON and the file
    entry["width"], entry["height"] = entry["height"], entry["width"]
    annotations.write_text(json.dumps(data))
    image = coco / "images" / "val2017" / entry["file_name"]
    results = tmp_path / "results"
    code = run(results, "--suite", str(suite_file(tmp_path, "coco", coco)))
    assert_refused(capsys, code, results, annotations, f"image id {entry['id']}", image,
                   "width 480 x height 640", "is 640 x 480")
    # The conversion itself checks too (a trial that bypasses the CLI, a cleared cache).
    with pytest.raises(DataError, match=f"image id {entry['id']}.*width 480 x height 640.*is 640 x 480"):
        create_dataset("coco", coco, tmp_path / "cache", {}).split("val")
    assert not list((tmp_path / "cache").rglob("index.json")), "no index of a bad conversion"


def test_coco_listed_image_missing(coco, tmp_path, capsys):
    image = next((coco / "images" / "train2017").iterdir())
    image.unlink()
    results = tmp_path / "results"
    code = run(results, "--suite", str(suite_file(tmp_path, "coco", coco)))
    assert_refused(capsys, code, results, image, "instances_train2017.json")


def test_coco_unparseable_json(coco, tmp_path, capsys):
    annotations = coco / "annotations" / "instances_val2017.json"
    annotations.write_text(annotations.read_text()[:500])
    results = tmp_path / "results"
    assert_refused(capsys, run(results, "--suite", str(suite_file(tmp_path, "coco", coco))), results, annotations)


def test_coco_converted_cache_checks_the_images(coco, tmp_path):
    """With the masks converted, the check reads the cached index, not the JSON."""
    dataset = create_dataset("coco", coco, tmp_path, {})
    dataset.split("val")
    dataset.check_split("val")
    image = coco / "images" / "val2017" / "000000475546.jpg"
    image.write_bytes(b"")
    with pytest.raises(DataError, match=f"image 000000475546: Image {image} is empty"):
        dataset.check_split("val")


def test_coco_cache_converted_at_a_wrong_size_is_named(coco, tmp_path):
    """A cache written before sizes were checked (masks at a swapped JSON size): the check
    names the cached mask, the image, both sizes and the folder to delete."""
    dataset = create_dataset("coco", coco, tmp_path, {})
    dataset.split("val")
    directory = dataset.cache_directory("val")
    mask = directory / "masks" / "000000471345.png"  # the image is 640 x 480
    Image.fromarray(np.zeros((640, 480), np.uint8)).save(mask)  # as rasterised at 480 x 640
    image = coco / "images" / "val2017" / "000000471345.jpg"
    with pytest.raises(DataError) as error:
        dataset.check_split("val")
    assert f"Cached mask {mask} is 480 x 640 but the image file {image} is 640 x 480" in str(error.value)
    assert f"delete {directory}" in str(error.value)


def trial_ids(out: str) -> list[tuple[str, str]]:
    return TRIAL_ID.findall(out)


def test_every_spelling_of_the_root_gives_the_same_trial_ids(voc, tmp_path, capsys, monkeypatch):
    root, _ = voc
    suite = str(suite_file(tmp_path, "voc", None))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "data")
    spellings = [str(root), str(root.parent), str(root.parent.parent), "VOCdevkit/VOC2012", "=~/data/VOCdevkit/VOC2012", "=~/data"]
    seen = []
    for spelling in spellings:
        results = tmp_path / "results"
        flag = ["--data-root" + spelling] if spelling.startswith("=") else ["--data-root", spelling]
        assert run(results, "--suite", suite, *flag, "--dry-run") == 0
        seen.append(trial_ids(capsys.readouterr().out))
    assert len(seen[0]) == 4 and all(ids == seen[0] for ids in seen), seen
    specs = preflight(plan_trials(load_suite(suite), ["cam"], [0], Overrides(), str(root.parent.parent), tmp_path), tmp_path)
    assert specs[0].data_root == str(root.resolve()), "the trial records the VOC2012 folder itself"


def test_missing_train_aug_falls_back_to_train(voc, tmp_path, capsys):
    root, _ = voc
    results = tmp_path / "results"
    assert run(results, "--suite", str(suite_file(tmp_path, "voc", root, train="train_aug")), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "'train_aug'" in out and "uses 'train' instead" in flat(out)
    (tmp_path / "pinned").mkdir()  # a second suite file (--dry-run created no results folder)
    pinned_train = suite_file(tmp_path / "pinned", "voc", root, train="train")
    assert run(results, "--suite", str(pinned_train), "--dry-run") == 0
    assert trial_ids(out) == trial_ids(capsys.readouterr().out), "the id names the split that really runs"
    # With SBD's list present, train_aug is used (and checked).
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("nope\n")
    code = run(results, "--suite", str(suite_file(tmp_path, "voc", root, train="train_aug")), "--dry-run")
    out = flat(capsys.readouterr().out)
    assert code == 2 and "image nope" in out and str(root / "JPEGImages" / "nope.jpg") in out


def test_suite_file_without_methods_uses_its_method_list(voc, tmp_path, capsys):
    root, _ = voc
    assert run(tmp_path / "results", "--suite", str(suite_file(tmp_path, "voc", root)), "--dry-run") == 0
    assert [m for _, m in trial_ids(capsys.readouterr().out)] == ["cam", "afa", "cam", "afa"]
    bare = tmp_path / "bare.toml"
    bare.write_text('[suite]\ndataset = "synthetic"\n')
    assert run(tmp_path / "results", "--suite", str(bare), "--dry-run") == 2
    assert "lists no default methods" in flat(capsys.readouterr().out)
