"""Datasets: the synthetic generator's guarantees, VOC and COCO readers on the real mini
sets in ../shared/data, and the DataError each kind of broken input produces."""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from harness.datasets import DATASETS, Dataset, Split, create_dataset, dataset_options
from harness.datasets import coco as coco_module
from harness.datasets.coco import CATEGORY_TO_INDEX, COCO_CLASSES
from harness.datasets.synthetic import CLASSES, SyntheticDataset, generate_sample
from harness.datasets.voc import VOC_CLASSES
from harness.errors import ConfigError, DataError

SMALL = {"num_train": 12, "num_val": 6}


# -- registry and options -----------------------------------------------------------------


def test_registry_and_options(tmp_path: Path) -> None:
    assert set(DATASETS) == {"synthetic", "voc", "coco"}
    assert dataset_options("synthetic")["seed"] == 0
    assert dataset_options("voc") == {"input_size": 224, "labels": "auto"}
    with pytest.raises(ConfigError, match='Did you mean "voc"'):
        create_dataset("vocc", None, tmp_path, {})
    with pytest.raises(ConfigError, match='Did you mean "num_classes"'):
        create_dataset("synthetic", None, tmp_path, {"num_clases": 3})


def test_option_values_are_coerced_and_checked(tmp_path: Path) -> None:
    dataset = create_dataset("synthetic", None, tmp_path, {"num_classes": "3", "noise": 2})
    assert dataset.options["num_classes"] == 3 and dataset.options["noise"] == 2.0
    assert dataset.info.class_names == ("bird", "boat", "disc")
    with pytest.raises(ConfigError, match="num_classes"):
        create_dataset("synthetic", None, tmp_path, {"num_classes": len(CLASSES) + 1})
    with pytest.raises(ConfigError, match="must be a int"):
        create_dataset("synthetic", None, tmp_path, {"seed": "abc"})
    with pytest.raises(ConfigError, match="must be one of"):
        create_dataset("coco", None, tmp_path, {"crowd": "drop"})


# -- synthetic ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, float]:
    """The default synthetic dataset, generated once, with its generation time (CPU time of
    this process: the generator is single-threaded, and wall time on a shared CI box lies)."""
    start = time.process_time()
    dataset = create_dataset("synthetic", None, tmp_path_factory.mktemp("cache"), {})
    dataset.split("train"), dataset.split("val")
    return dataset, time.process_time() - start


def samples_of(split: Split) -> list[Any]:
    return [split[i] for i in range(len(split))]


def test_synthetic_default_is_fast_and_shaped(synthetic: tuple[Dataset, float]) -> None:
    dataset, seconds = synthetic
    assert seconds < 5.0, f"default synthetic generation took {seconds:.1f}s"
    assert dataset.default_splits() == {"train": "train", "cam_eval": "train", "val": "val"}
    assert dataset.info.input_size == 96 and dataset.info.num_classes == 5
    train, val = dataset.split("train"), dataset.split("val")
    assert (len(train), len(val)) == (160, 48)
    sample = train[0]
    assert sample.image.shape == (96, 96, 3) and sample.image.dtype == np.uint8
    assert sample.mask is not None and sample.mask.shape == (96, 96) and sample.mask.dtype == np.uint8
    assert sample.labels.dtype == np.float32 and sample.labels.shape == (5,)


def test_synthetic_labels_masks_and_class_coverage(synthetic: tuple[Dataset, float]) -> None:
    dataset, _ = synthetic
    index = json.loads((dataset.directory / "index.json").read_text())
    for name in ("train", "val"):
        samples = samples_of(dataset.split(name))
        counts = [int(s.labels.sum()) for s in samples]
        assert set(counts) == {1, 2, 3}
        assert np.stack([s.labels for s in samples]).min(axis=0).shape == (5,)
        assert (np.stack([s.labels for s in samples]).sum(axis=0) > 0).all(), "every class occurs"
        for s in samples:
            values = set(np.unique(s.mask).tolist())
            assert values <= set(range(6)), "no ignore border: synthetic GT is exact"
            assert {v - 1 for v in values - {0}} == set(np.flatnonzero(s.labels).tolist())
            meta_classes = {o["class"] for o in index["samples"][s.id]["objects"]}
            assert meta_classes == {dataset.info.class_names[c] for c in np.flatnonzero(s.labels)}


def test_synthetic_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = create_dataset("synthetic", None, tmp_path / "a", SMALL).split("val")
    b = create_dataset("synthetic", None, tmp_path / "b", SMALL).split("val")
    c = create_dataset("synthetic", None, tmp_path / "c", {**SMALL, "seed": 1}).split("val")
    for i in range(len(a)):
        assert np.array_equal(a[i].image, b[i].image) and np.array_equal(a[i].mask, b[i].mask)
    assert not all(np.array_equal(a[i].image, c[i].image) for i in range(len(a)))
    # A sample does not depend on how many others are generated.
    more = generate_sample({**SyntheticDataset.default_options, "num_val": 99}, "val", 3)
    assert np.array_equal(more.image, a[3].image)


def test_synthetic_cache_is_reused_and_repaired(tmp_path: Path) -> None:
    first = create_dataset("synthetic", None, tmp_path, SMALL)
    first.split("train")
    index = first.directory / "index.json"
    stamp = index.stat().st_mtime_ns
    create_dataset("synthetic", None, tmp_path, SMALL).split("train")
    assert index.stat().st_mtime_ns == stamp, "an intact cache is not regenerated"
    damaged = first.directory / "masks" / "train_00004.png"
    damaged.unlink()
    split = create_dataset("synthetic", None, tmp_path, SMALL).split("train")
    assert damaged.is_file() and split[4].mask is not None
    assert len(list(tmp_path.iterdir())) == 1, "no temporary folders left behind"


@pytest.mark.parametrize(
    "options",
    [{"num_classes": 1}, {"num_classes": 8, "max_objects": 4}, {"image_size": 48}, {"image_size": 160, "noise": 0.0}],
)
def test_synthetic_other_configurations(options: dict[str, Any]) -> None:
    resolved = {**SyntheticDataset.default_options, **options}
    for i in range(6):
        g = generate_sample(resolved, "train", i)
        size, classes = resolved["image_size"], resolved["num_classes"]
        assert g.image.shape == (size, size, 3) and g.mask.shape == (size, size)
        assert 1 <= len(set(np.unique(g.mask).tolist()) - {0}) <= min(resolved["max_objects"], classes)
        assert g.mask.max() <= classes


def test_synthetic_small_discriminative_part() -> None:
    """bird and fish share a body texture (also used by unlabelled distractors); their
    heads / tails are small and very different: only the part tells the classes apart."""
    options = dict(SyntheticDataset.default_options)
    bodies: dict[int, list[np.ndarray]] = {0: [], 4: []}
    parts: dict[int, list[np.ndarray]] = {0: [], 4: []}
    fractions, distractor_without_class = [], []
    for i in range(60):
        g = generate_sample(options, "train", i)
        for cls in (0, 4):
            region = g.mask == cls + 1
            if region.any():
                assert (g.part & region).any(), "the part of a bird / fish is always visible"
                fractions.append((g.part & region).sum() / region.sum())
                bodies[cls].append(g.image[region & ~g.part].reshape(-1, 3))
                parts[cls].append(g.image[region & g.part].reshape(-1, 3))
        if not ({1, 5} & set(np.unique(g.mask).tolist())):
            distractor_without_class.append(g.meta["distractors"])
    assert 0.03 < np.mean(fractions) < 0.25 and max(fractions) < 0.35
    body_gap = np.abs(np.concatenate(bodies[0]).mean(0) - np.concatenate(bodies[4]).mean(0)).max()
    part_gap = np.abs(np.concatenate(parts[0]).mean(0) - np.concatenate(parts[4]).mean(0)).max()
    assert body_gap < 12 and part_gap > 60
    assert np.mean(distractor_without_class) > 0.4, "the body texture appears without its classes"


def test_synthetic_class_correlated_context(synthetic: tuple[Dataset, float]) -> None:
    """boat appears on water far more often than water appears without boat; water is GT
    background, so a classifier's CAM for boat leaks into it."""
    dataset, _ = synthetic
    index = json.loads((dataset.directory / "index.json").read_text())
    boat = dataset.info.class_names.index("boat")
    with_boat, without_boat = [], []
    for s in samples_of(dataset.split("train")):
        water = index["samples"][s.id]["context"] == "water"
        (with_boat if s.labels[boat] else without_boat).append(water)
        if water:
            bottom = s.mask[-8:]
            assert (bottom == 0).mean() > 0.5, "the band is background in the GT"
    assert np.mean(with_boat) > 0.8 and np.mean(without_boat) < 0.4
    assert np.mean(with_boat) > 2.5 * np.mean(without_boat)


def test_synthetic_split_errors_and_pickling(synthetic: tuple[Dataset, float]) -> None:
    dataset, _ = synthetic
    with pytest.raises(ConfigError, match='Did you mean "train"'):
        dataset.split("trian")
    split = pickle.loads(pickle.dumps(dataset.split("val")))
    assert np.array_equal(split[0].image, dataset.split("val")[0].image)


# -- VOC --------------------------------------------------------------------------------------


@pytest.fixture()
def voc_root(shared_data: Path) -> Path:
    root = shared_data / "voc-mini" / "VOC2012"
    if not root.is_dir():
        pytest.skip(f"voc-mini not found at {root}")
    return root


def test_voc_mini_counts_and_masks(voc_root: Path, tmp_path: Path) -> None:
    dataset = create_dataset("voc", voc_root, tmp_path, {})
    assert dataset.info.class_names[0] == "aeroplane" and dataset.info.class_names[-1] == "tvmonitor"
    assert dataset.info.input_size == 224
    assert dataset.default_splits() == {"train": "train", "cam_eval": "train", "val": "val"}
    train, val = dataset.split("train"), dataset.split("val")
    assert (len(train), len(val)) == (330, 346)
    for split in (train, val):
        for i in range(0, len(split), 23):
            s = split[i]
            assert s.mask is not None and s.mask.shape == s.image.shape[:2]
            values = set(np.unique(s.mask).tolist())
            assert values <= set(range(21)) | {255}
            assert set(np.flatnonzero(s.labels).tolist()) == {v - 1 for v in values - {0, 255}}
            assert s.labels.sum() >= 1


def test_voc_root_variants(voc_root: Path, tmp_path: Path) -> None:
    devkit_parent = tmp_path / "data"
    (devkit_parent / "VOCdevkit").mkdir(parents=True)
    (devkit_parent / "VOCdevkit" / "VOC2012").symlink_to(voc_root)
    for root in (voc_root, voc_root.parent, devkit_parent):
        assert create_dataset("voc", root, tmp_path, {}).voc_root.resolve() == voc_root.resolve()


def test_voc_canonical_root_keeps_cls_labels_above_voc2012(voc_root: Path, tmp_path: Path) -> None:
    """The trial records the VOC2012 folder whichever spelling was passed; a cls_labels.npy
    next to VOCdevkit/ (beside a spelled root) is still found from there."""
    data = tmp_path / "data"
    (data / "VOCdevkit").mkdir(parents=True)
    (data / "VOCdevkit" / "VOC2012").symlink_to(voc_root)
    first = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    np.save(data / "cls_labels.npy", {first: one_hot("dog")})  # type: ignore[arg-type]
    spelled = create_dataset("voc", data, tmp_path, {})
    assert spelled.canonical_root() == str(voc_root.resolve())
    canonical = create_dataset("voc", data / "VOCdevkit" / "VOC2012", tmp_path, {})
    for dataset in (spelled, canonical):
        assert np.array_equal(dataset.split("train")[0].labels, one_hot("dog"))


def make_voc(voc_root: Path, target: Path, ids: list[str]) -> Path:
    """A small writable VOC2012 copy holding ``ids`` in train and val."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (target / folder).mkdir(parents=True)
    for i in ids:
        shutil.copy(voc_root / "JPEGImages" / f"{i}.jpg", target / "JPEGImages")
        shutil.copy(voc_root / "SegmentationClass" / f"{i}.png", target / "SegmentationClass")
    for split in ("train", "val"):
        (target / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return target


@pytest.fixture()
def small_voc(voc_root: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    ids = (voc_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:3]
    return make_voc(voc_root, tmp_path / "VOC2012", ids), ids


def one_hot(*classes: str) -> np.ndarray:
    labels = np.zeros(20, dtype=np.float32)
    for name in classes:
        labels[VOC_CLASSES.index(name)] = 1
    return labels


def write_xml(path: Path, names: list[str]) -> None:
    path.parent.mkdir(exist_ok=True)
    objects = "".join(f"<object><name>{n}</name><difficult>1</difficult></object>" for n in names)
    path.write_text(f"<annotation><filename>x.jpg</filename>{objects}</annotation>")


def test_voc_label_sources_and_precedence(small_voc: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, (a, b, c) = small_voc
    from_masks = [s.labels for s in create_dataset("voc", root, tmp_path, {}).split("train")]
    np.save(root / "cls_labels.npy", {a: one_hot("dog"), b: one_hot("cat")})  # type: ignore[arg-type]
    write_xml(root / "Annotations" / f"{b}.xml", ["horse"])
    write_xml(root / "Annotations" / f"{c}.xml", ["sheep", "person"])
    split = create_dataset("voc", root, tmp_path, {}).split("train")
    assert np.array_equal(split[0].labels, one_hot("dog")), "cls_labels.npy first"
    assert np.array_equal(split[1].labels, one_hot("cat")), "cls_labels.npy beats the XML"
    assert np.array_equal(split[2].labels, one_hot("sheep", "person")), "then the XML"
    forced = create_dataset("voc", root, tmp_path, {"labels": "masks"}).split("train")
    assert all(np.array_equal(s.labels, m) for s, m in zip(forced, from_masks))
    with pytest.raises(DataError, match=f"{c}"):
        create_dataset("voc", root, tmp_path, {"labels": "cls_labels"}).split("train")[2]
    write_xml(root / "Annotations" / f"{c}.xml", ["unicorn"])
    with pytest.raises(DataError, match="unicorn"):
        create_dataset("voc", root, tmp_path, {"labels": "annotations"}).split("train")[2]


def test_voc_without_masks_reads_no_mask_where_labels_come_from_a_file(small_voc: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A mask-free loop's split: same images and labels; no mask for ids with a label file
    (cls_labels.npy or XML), the mask (for its labels) for the others."""
    root, (a, b, c) = small_voc
    np.save(root / "cls_labels.npy", {a: one_hot("dog")})  # type: ignore[arg-type]
    write_xml(root / "Annotations" / f"{b}.xml", ["horse"])
    split = create_dataset("voc", root, tmp_path, {}).split("train")
    free = split.without_masks()
    for full, light in zip(split, free):
        assert np.array_equal(full.image, light.image) and np.array_equal(full.labels, light.labels)
    assert [light.mask is None for light in free] == [True, True, False]
    (root / "SegmentationClass" / f"{a}.png").write_bytes(b"not a png")  # never opened without masks
    assert free[0].mask is None
    with pytest.raises(DataError, match=f"{a}"):
        split[0]
    forced = create_dataset("voc", root, tmp_path, {"labels": "masks"}).split("train").without_masks()
    with pytest.raises(DataError, match=f"{a}"):
        forced[0]  # labels from masks: the mask is read (and checked) even here


def test_voc_train_aug_is_the_training_role(small_voc: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, ids = small_voc
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids]
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    dataset = create_dataset("voc", root, tmp_path, {})
    assert dataset.default_splits()["train"] == "train_aug"
    assert dataset.split("train_aug").ids == ids
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    Image.fromarray(np.zeros_like(dataset.split("train")[0].mask)).save(aug / f"{ids[0]}.png")
    assert dataset.split("train")[0].labels.sum() == 0, "SegmentationClassAug wins when present"


@pytest.mark.parametrize("damage", ["missing_image", "corrupt_image", "mask_size", "mask_value"])
def test_voc_bad_files_name_the_file(small_voc: tuple[Path, list[str]], tmp_path: Path, damage: str) -> None:
    root, ids = small_voc
    image = root / "JPEGImages" / f"{ids[1]}.jpg"
    mask_path = root / "SegmentationClass" / f"{ids[1]}.png"
    if damage == "missing_image":
        image.unlink()
        culprit, detail = image, "not found"
    elif damage == "corrupt_image":
        image.write_bytes(b"\x00garbage, not a jpeg" * 10)
        culprit, detail = image, "Cannot decode"
    else:
        with Image.open(mask_path) as original:
            palette = original.getpalette()
            mask = np.array(original)
        if damage == "mask_size":
            mask, detail = mask[:-5], "its image is"
        else:
            mask[0, 0], detail = 42, "values 42"
        broken = Image.fromarray(mask, mode="P")
        broken.putpalette(palette)
        broken.save(mask_path)
        culprit = mask_path
    split = create_dataset("voc", root, tmp_path, {}).split("train")
    split[0]  # undamaged samples still read
    with pytest.raises(DataError, match=detail) as error:
        split[1]
    assert str(culprit) in str(error.value)
    assert str(error.value).startswith(f"voc split train, image {ids[1]}: "), "a trial's failure line names the image"


def test_voc_bad_layout(small_voc: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = small_voc
    with pytest.raises(DataError, match="does not exist"):
        create_dataset("voc", tmp_path / "nowhere", tmp_path, {})
    with pytest.raises(DataError, match="needs a root"):
        create_dataset("voc", None, tmp_path, {})
    with pytest.raises(DataError, match="No VOC2012 layout"):
        create_dataset("voc", tmp_path / "VOC2012" / "JPEGImages", tmp_path, {})
    val_list = root / "ImageSets" / "Segmentation" / "val.txt"
    val_list.unlink()
    dataset = create_dataset("voc", root, tmp_path, {})
    with pytest.raises(DataError, match="Split list not found") as error:
        dataset.split("val")
    assert str(val_list) in str(error.value)
    val_list.write_text("\n\n")
    with pytest.raises(DataError, match="empty") as error:
        create_dataset("voc", root, tmp_path, {}).split("val")
    assert str(val_list) in str(error.value)
    with pytest.raises(ConfigError, match="Valid voc splits: train, train_aug, val"):
        dataset.split("test")


# -- COCO -------------------------------------------------------------------------------------


@pytest.fixture()
def coco_root(shared_data: Path) -> Path:
    root = shared_data / "coco-tiny"
    if not root.is_dir():
        pytest.skip(f"coco-tiny not found at {root}")
    return root


def test_coco_category_mapping() -> None:
    assert len(COCO_CLASSES) == 80
    assert sorted(CATEGORY_TO_INDEX.values()) == list(range(1, 81))
    assert CATEGORY_TO_INDEX[1] == 1 and CATEGORY_TO_INDEX[13] == 12 and CATEGORY_TO_INDEX[90] == 80
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[11] == "stop sign" and COCO_CLASSES[-1] == "toothbrush"


def test_coco_tiny(coco_root: Path, tmp_path: Path) -> None:
    dataset = create_dataset("coco", coco_root, tmp_path, {})
    train, val = dataset.split("train"), dataset.split("val")
    assert (len(train), len(val)) == (30, 6), "the 2 train images without annotations are left out"
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    assert [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])] == list(COCO_CLASSES)
    annotated = {Path(i["file_name"]).stem: i["id"] for i in data["images"]}
    for s in val:
        assert s.mask is not None and s.mask.shape == s.image.shape[:2]
        present = set(np.unique(s.mask).tolist())
        assert present <= set(range(81)), "crowd regions are background by default"
        assert set(np.flatnonzero(s.labels).tolist()) == {v - 1 for v in present - {0}}
        categories = {
            CATEGORY_TO_INDEX[a["category_id"]]
            for a in data["annotations"]
            if a["image_id"] == annotated[s.id] and not a["iscrowd"]
        }
        assert present - {0} <= categories


def test_coco_conversion_is_cached(coco_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = create_dataset("coco", coco_root, tmp_path, {})
    first.split("val")
    directory = first.cache_directory("val")
    assert directory.name.startswith("coco-val-")
    stamps = {p: p.stat().st_mtime_ns for p in directory.rglob("*.png")}
    assert len(stamps) == 6

    def no_conversion(*args: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(coco_module, "convert_split", no_conversion)
    again = create_dataset("coco", coco_root, tmp_path, {}).split("val")
    assert again[0].mask is not None
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*.png")} == stamps
    assert create_dataset("coco", coco_root, tmp_path, {"crowd": "ignore"}).cache_directory("val") != directory


def uncompressed_rle(binary: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = binary.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": list(binary.shape)}


def make_coco(root: Path, flat: bool = False, year: str = "2017") -> np.ndarray:
    """A hand-made COCO folder: image a (16x20) with a polygon person, a smaller polygon
    toothbrush on it (listed first), a compressed-RLE stop sign and an uncompressed-RLE crowd;
    image b without annotations; image c with only a crowd. Returns a's expected mask."""
    images = root / (f"val{year}" if flat else f"images/val{year}")
    images.mkdir(parents=True)
    (root / "annotations").mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.full((16, 20, 3), 128, np.uint8)).save(images / f"{name}.png")
    stop = np.zeros((16, 20), np.uint8)
    stop[12:16, 15:20] = 1
    rle = mask_utils.encode(np.asfortranarray(stop))
    crowd = np.zeros((16, 20), np.uint8)
    crowd[0:2, 0:6] = 1
    anns = [
        {"id": 1, "image_id": 1, "category_id": 90, "iscrowd": 0, "segmentation": [[8, 4, 12, 4, 12, 8, 8, 8]]},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]]},
        {"id": 3, "image_id": 1, "category_id": 13, "iscrowd": 0,
         "segmentation": {"size": [16, 20], "counts": rle["counts"].decode()}},
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(crowd)},
        {"id": 5, "image_id": 3, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(crowd)},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": i, "file_name": f"{name}.png", "height": 16, "width": 20}
            for i, name in ((1, "a"), (2, "b"), (3, "c"))
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}, {"id": 90, "name": "toothbrush"}],
    }
    (root / "annotations" / f"instances_val{year}.json").write_text(json.dumps(data))
    expected = np.zeros((16, 20), np.uint8)
    expected[2:12, 2:14] = 1
    expected[4:8, 8:12] = 80
    expected[12:16, 15:20] = 12
    return expected


def test_coco_rasterisation(tmp_path: Path) -> None:
    expected = make_coco(tmp_path / "coco")
    val = create_dataset("coco", tmp_path / "coco", tmp_path / "cache", {}).split("val")
    assert val.ids == ["a", "c"], "images without annotations are left out"
    assert np.array_equal(val[0].mask, expected)
    assert np.flatnonzero(val[0].labels).tolist() == [0, 11, 79]
    assert val[1].labels.sum() == 0 and not val[1].mask.any(), "crowd-only image: background"
    ignored = create_dataset("coco", tmp_path / "coco", tmp_path / "cache", {"crowd": "ignore"}).split("val")
    expected[0:2, 0:6] = 255
    assert np.array_equal(ignored[0].mask, expected)


def test_coco_flat_layout_and_2014(tmp_path: Path) -> None:
    expected = make_coco(tmp_path / "flat", flat=True, year="2014")
    dataset = create_dataset("coco", tmp_path / "flat", tmp_path / "cache", {})
    assert np.array_equal(dataset.split("val")[0].mask, expected)
    with pytest.raises(DataError, match="instances_train2017.json or .*instances_train2014.json"):
        dataset.split("train")
    with pytest.raises(DataError, match="instances_val2017.json"):
        create_dataset("coco", tmp_path / "flat", tmp_path / "cache", {"year": "2017"}).split("val")


def test_coco_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a root"):
        create_dataset("coco", None, tmp_path, {})
    with pytest.raises(DataError, match="annotations"):
        create_dataset("coco", tmp_path, tmp_path, {})
    make_coco(tmp_path / "coco")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "coco" / "images" / "val2017" / "a.png")
    # The JSON says a.png is 20 x 16; the file is 10 x 10: refused before any mask is
    # rasterised at the JSON's size (the entry, the file and both sizes are named).
    with pytest.raises(DataError, match=r"image id 1 \('a.png'\) says width 20 x height 16, .*a.png is 10 x 10"):
        create_dataset("coco", tmp_path / "coco", tmp_path / "cache", {}).split("val")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "coco" / "images" / "val2017" / "a.png")
    path = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 12
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown category_id 12"):
        create_dataset("coco", tmp_path / "coco", tmp_path / "cache2", {}).split("val")


def test_value_histogram_counts_each_mask_value_as_bincount_does():
    # By hand: [[0, 255], [3, 3]] -> 0 once, 3 twice, 255 once; a read-only uint8 array (as
    # PIL's np.asarray gives) and a wider dtype count the same.
    from harness.datasets.base import value_histogram

    mask = np.array([[0, 255], [3, 3]], dtype=np.uint8)
    mask.setflags(write=False)
    expected = np.zeros(256, np.int64)
    expected[[0, 3, 255]] = [1, 2, 1]
    assert np.array_equal(value_histogram(mask), expected)
    assert np.array_equal(value_histogram(mask.astype(np.int32)), expected)
    noise = np.random.default_rng(0).integers(0, 256, (37, 41), dtype=np.uint8)
    assert np.array_equal(value_histogram(noise), np.bincount(noise.ravel(), minlength=256))
