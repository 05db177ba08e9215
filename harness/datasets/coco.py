"""``coco``: MS COCO 2014 or 2017 with semantic masks built from the instance annotations.

Layout (``root``)::

    images/{train2017,val2017}/<file_name>   (or train2014/val2014; also root/train2017/...)
    annotations/instances_{train2017,val2017}.json

Splits ``train`` and ``val`` map to the 2017 files when present, else 2014 (option ``year``).
Only images with at least one annotation are included (the WSSS convention behind the
82,081 / 40,137 COCO-2014 counts). Semantic masks: 0 background, category ids mapped to
1..80 in sorted-category-id order, polygons and RLEs rasterised with pycocotools, larger
instances painted first so a smaller overlapping instance stays on top. Crowd annotations
are left as background by default, as the papers' masks do (option ``crowd="ignore"``
paints them 255 instead, under the non-crowd instances). Image-level labels are the classes
present in the mask, so an image whose instances are all crowd has no label.

Masks are converted once per split into ``cache_dir/coco-<split>-<hash>/`` (the hash covers
the annotation file's path, size and mtime, the crowd option and the converter version);
every file is written atomically, so an interrupted conversion resumes and concurrent
workers never read a torn file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pycocotools import mask as mask_utils

from harness.datasets.base import (
    Dataset,
    Split,
    check_mask,
    image_header,
    labels_from_counts,
    png_bytes,
    read_image,
    read_mask,
    register_dataset,
    summarise_problems,
)
from harness.errors import DataError
from harness.files import atomic_write_bytes
from methods.base import IGNORE_INDEX, DatasetInfo, Sample

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1
YEARS = ("2017", "2014")

# The 80 COCO "things" categories (identical in 2014 and 2017): (category id, name).
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip
COCO_CLASSES: tuple[str, ...] = tuple(name for _, name in sorted(COCO_CATEGORIES))
CATEGORY_TO_INDEX: dict[int, int] = {cid: i + 1 for i, (cid, _) in enumerate(sorted(COCO_CATEGORIES))}


# -- locating files ------------------------------------------------------------------------


def locate_split(root: Path, split: str, year: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of a split; the first year found when ``year='auto'``."""
    tried = []
    for y in YEARS if year == "auto" else (year,):
        annotations = root / "annotations" / f"instances_{split}{y}.json"
        tried.append(annotations)
        if annotations.is_file():
            folders = [root / "images" / f"{split}{y}", root / f"{split}{y}"]
            for folder in folders:
                if folder.is_dir():
                    return annotations, folder
            raise DataError(
                f"COCO images for {annotations.name} not found: expected the folder "
                f"{folders[0]} or {folders[1]}."
            )
    raise DataError(
        f"COCO annotations for split {split!r} not found: expected {' or '.join(str(p) for p in tried)}."
    )


def cache_key(annotations: Path, crowd: str) -> str:
    """Short hash identifying one conversion: same file, same settings -> same cache."""
    stat = annotations.stat()
    text = json.dumps(
        [CONVERTER_VERSION, str(annotations.resolve()), stat.st_size, stat.st_mtime_ns, crowd]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# -- rasterising ---------------------------------------------------------------------------


def decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """A polygon list, uncompressed RLE or compressed RLE -> (H, W) bool."""
    if isinstance(segmentation, list):
        polygons = [[float(x) for x in poly] for poly in segmentation if len(poly) >= 6]
        if not polygons:  # degenerate (fewer than 3 points); pycocotools would misread it
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise DataError(f"{where}: RLE size {segmentation['size']} differs from the image's [{height}, {width}].")
        if isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise DataError(f"{where}: segmentation is neither a polygon list nor an RLE dict.")
    with warnings.catch_warnings():  # pycocotools' numpy-2 "copy keyword" deprecation noise
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def rasterise(annotations: list[dict[str, Any]], height: int, width: int, crowd: str, source: Path) -> np.ndarray:
    """The semantic mask of one image. Crowd regions (when kept) go first, then instances
    from the largest to the smallest, so small objects in front of large ones survive."""
    layers = []
    for ann in annotations:
        where = f"{source}, annotation {ann.get('id')}"
        is_crowd = bool(ann.get("iscrowd", 0))
        if is_crowd and crowd == "background":
            continue
        category = ann.get("category_id")
        if category not in CATEGORY_TO_INDEX:
            raise DataError(f"{where}: unknown category_id {category!r}; expected one of the 80 COCO category ids.")
        binary = decode_segmentation(ann.get("segmentation"), height, width, where)
        value = IGNORE_INDEX if is_crowd else CATEGORY_TO_INDEX[category]
        layers.append((not is_crowd, -int(binary.sum()), int(ann.get("id", 0)), value, binary))
    layers.sort(key=lambda layer: layer[:3])
    mask = np.zeros((height, width), dtype=np.uint8)
    for *_, value, binary in layers:
        mask[binary] = value
    return mask


def check_categories(categories: list[dict[str, Any]], source: Path) -> None:
    """The JSON's categories must be (a subset of) the standard 80, so the 1..80 mapping and
    the class names are the same for every COCO file."""
    standard = dict(COCO_CATEGORIES)
    for category in categories:
        cid, name = category.get("id"), category.get("name")
        if standard.get(cid) != name:
            raise DataError(
                f"{source}: category {cid!r} {name!r} is not a standard COCO category "
                f"(expected id {cid!r} to be {standard.get(cid)!r})."
            )


def load_annotations(annotations: Path) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """(annotated image entries sorted by id, annotations per image id) of a COCO JSON, its
    categories checked. DataError naming the file when it does not parse or lacks a key."""
    try:
        data = json.loads(annotations.read_text())
        images, anns = data["images"], data["annotations"]
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in anns:
            by_image.setdefault(ann["image_id"], []).append(ann)
        annotated = sorted((image for image in images if image["id"] in by_image), key=lambda item: item["id"])
        for image in annotated:
            image["file_name"], image["width"], image["height"]  # every key used later
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"Cannot read COCO annotations {annotations}: {err!r}.") from err
    check_categories(data.get("categories", []), annotations)
    return annotated, by_image


def check_image_entry(image: dict[str, Any], folder: Path, annotations: Path) -> None:
    """The image file of one JSON entry exists, is a readable image (header only) and has the
    entry's width and height. Some annotation tools export them swapped; masks rasterised at
    the JSON's size would then not fit their image."""
    path = folder / image["file_name"]
    entry = f"{annotations} image id {image['id']} ({image['file_name']!r})"
    try:
        width, height, _ = image_header(path)
    except DataError as err:
        raise DataError(f"{entry}: {err}") from err
    if (int(image["width"]), int(image["height"])) != (width, height):
        raise DataError(
            f"{entry} says width {image['width']} x height {image['height']}, but the image file "
            f"{path} is {width} x {height}. Fix the entry's width / height in the JSON (they may be swapped)."
        )


def convert_split(annotations: Path, directory: Path, crowd: str, folder: Path | None = None) -> dict[str, Any]:
    """Write the masks of every annotated image of one JSON into ``directory`` and return the
    index (written last). Masks already present (an interrupted run) are kept. With the
    image ``folder``, each entry's size is checked against its image file before converting."""
    log.info("Converting COCO masks from %s into %s (once).", annotations, directory)
    annotated, by_image = load_annotations(annotations)
    files: dict[str, str] = {}
    for image in annotated:
        if folder is not None:
            check_image_entry(image, folder, annotations)
        sample_id = Path(image["file_name"]).stem
        files[sample_id] = image["file_name"]
        target = directory / "masks" / f"{sample_id}.png"
        if not target.is_file():
            mask = rasterise(by_image[image["id"]], int(image["height"]), int(image["width"]), crowd, annotations)
            atomic_write_bytes(target, png_bytes(mask))
    index = {"version": CONVERTER_VERSION, "source": str(annotations), "crowd": crowd, "files": files}
    atomic_write_bytes(directory / "index.json", json.dumps(index, indent=1).encode())
    return index


def load_or_convert(annotations: Path, directory: Path, crowd: str, folder: Path | None = None) -> dict[str, Any]:
    """The conversion's index: reused when complete, otherwise (re)built."""
    try:
        return json.loads((directory / "index.json").read_text())
    except (OSError, ValueError):
        return convert_split(annotations, directory, crowd, folder)


# -- the dataset ---------------------------------------------------------------------------


@register_dataset
class COCODataset(Dataset):
    """MS COCO semantic segmentation from instance annotations (see the module docstring)."""

    name: ClassVar[str] = "coco"
    split_names: ClassVar[tuple[str, ...]] = ("train", "val")
    default_options: ClassVar[dict[str, Any]] = {"input_size": 224, "year": "auto", "crowd": "background"}
    option_choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "year": ("auto", *YEARS),
        "crowd": ("background", "ignore"),
    }

    def __init__(self, root: Path | None, cache_dir: Path, **options: Any) -> None:
        super().__init__(root, cache_dir, **options)
        if self.root is None:
            raise DataError(
                "Dataset coco needs a root folder: pass --data-root PATH with a folder holding "
                "annotations/instances_{train,val}2017.json and images/{train,val}2017/, or set `root` in the suite's [dataset]."
            )
        if not (self.root / "annotations").is_dir():
            raise DataError(
                f"COCO root {self.root} has no annotations/ folder; expected annotations/instances_*.json in it."
            )

    def _build_info(self) -> DatasetInfo:
        return DatasetInfo(self.name, COCO_CLASSES, input_size=self.options["input_size"])

    def default_splits(self) -> dict[str, str]:
        return {"train": "train", "cam_eval": "train", "val": "val"}

    def cache_directory(self, split: str) -> Path:
        """Where the masks of ``split`` are (or will be) cached."""
        annotations, _ = locate_split(self.root, split, self.options["year"])
        return self.cache_dir / f"coco-{split}-{cache_key(annotations, self.options['crowd'])}"

    def _make_split(self, name: str) -> Split:
        annotations, images = locate_split(self.root, name, self.options["year"])
        directory = self.cache_directory(name)
        files = load_or_convert(annotations, directory, self.options["crowd"], images)["files"]
        reader = partial(self._read, images=images, masks=directory / "masks", files=files)
        return Split(self.name, name, list(files), reader, str(annotations))

    def check_split(self, name: str) -> None:
        """Pre-flight: the JSON parses (standard categories, every key present) and every
        annotated image exists, is a readable image (header) and has the JSON's size. Once
        the masks are converted, the cached index's files are checked instead of re-parsing
        the JSON (hundreds of MB for the full train set)."""
        annotations, images = locate_split(self.root, name, self.options["year"])
        directory = self.cache_directory(name)
        try:
            files = json.loads((directory / "index.json").read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            files = None
        problems: list[str] = []
        if files is None:
            for image in load_annotations(annotations)[0]:
                try:
                    check_image_entry(image, images, annotations)
                except DataError as err:
                    problems.append(str(err))
        else:
            for sample_id, file_name in files.items():
                try:
                    self._check_cached(images / file_name, directory / "masks" / f"{sample_id}.png", annotations)
                except DataError as err:
                    problems.append(f"image {sample_id}: {err}")
        if problems:
            raise DataError(summarise_problems(problems, f"coco split {name} ({annotations})"))

    @staticmethod
    def _check_cached(image: Path, mask: Path, annotations: Path) -> None:
        """One converted image: the image file reads and its cached mask has its size (a cache
        converted before sizes were checked may hold masks at a wrong JSON size)."""
        width, height, _ = image_header(image)
        mask_width, mask_height, _ = image_header(mask, "Cached mask")
        if (mask_width, mask_height) != (width, height):
            raise DataError(
                f"Cached mask {mask} is {mask_width} x {mask_height} but the image file {image} is {width} x {height}: "
                f"its entry in {annotations} gives the wrong width / height. Fix the JSON, then delete {mask.parent.parent}."
            )

    def _read(self, sample_id: str, images: Path, masks: Path, files: dict[str, str]) -> Sample:
        image = read_image(images / files[sample_id])
        mask_path = masks / f"{sample_id}.png"
        mask = read_mask(mask_path)
        counts = check_mask(mask, image.shape, len(COCO_CLASSES), mask_path)
        return Sample(sample_id, image, labels_from_counts(counts, len(COCO_CLASSES)), mask)
