"""``voc``: PASCAL VOC 2012 (+ SBD ``train_aug``) in the standard VOCdevkit layout.

Layout under the VOC2012 folder (``root`` may also be the VOCdevkit folder or a folder
holding ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        palette PNG; read as palette indices (0..20, 255)
    SegmentationClassAug/<id>.png     optional (SBD); preferred for an id when present
    Annotations/<id>.xml              optional; object names give image-level labels
    ImageSets/Segmentation/{train,train_aug,val}.txt
    cls_labels.npy                    optional {id: float32[20]} image-level labels

Image-level labels, per image, from the first source that has the image (option ``labels``
can force one): ``cls_labels.npy``, then ``Annotations/<id>.xml`` (every object, difficult
and truncated included), then the classes present in the mask.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.datasets.base import (
    Dataset,
    Split,
    MASK_MODES,
    check_mask,
    image_header,
    labels_from_counts,
    read_image,
    read_mask,
    register_dataset,
    summarise_problems,
)
from harness.errors import DataError
from methods.base import DatasetInfo, Sample

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
LABEL_SOURCES = ("auto", "cls_labels", "annotations", "masks")


def find_voc_root(root: Path | None) -> Path:
    """The VOC2012 folder for ``root`` = VOC2012, VOCdevkit, or a folder holding VOCdevkit."""
    if root is None:
        raise DataError(
            "Dataset voc needs a root folder: pass --data-root PATH with the path of VOCdevkit/VOC2012 "
            "(holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/), or set `root` in the suite's [dataset]."
        )
    if not root.is_dir():
        raise DataError(f"VOC root {root} does not exist or is not a folder; expected VOCdevkit/VOC2012. "
                        "Pass --data-root PATH (it overrides the root a suite file names, which is relative to that file).")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() or (candidate / "ImageSets").is_dir():
            return candidate
    raise DataError(
        f"No VOC2012 layout under {root}: expected JPEGImages/ and ImageSets/Segmentation/ in it, "
        "in VOC2012/ or in VOCdevkit/VOC2012/."
    )


def read_id_list(path: Path) -> list[str]:
    """Ids of a split list. Accepts plain ids and the DeepLab style
    ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` lines (first column's stem)."""
    if not path.is_file():
        raise DataError(f"Split list not found: {path}. Expected a text file with one image id per line.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"Cannot read split list {path}: {err}. Expected a text file with one image id per line.") from err
    ids = []
    for line in text.splitlines():
        if line.strip():
            ids.append(Path(line.split()[0]).stem)
    return ids


def parse_annotation(path: Path) -> np.ndarray:
    """(20,) multi-hot of the object names in a VOC XML annotation."""
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as err:
        raise DataError(f"Cannot parse annotation {path}: {err}.") from err
    labels = np.zeros(len(VOC_CLASSES), dtype=np.float32)
    for node in tree.getroot().iter("object"):
        name = (node.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataError(f"Annotation {path} names an unknown class {name!r}; expected one of the 20 VOC classes.")
        labels[VOC_CLASSES.index(name)] = 1.0
    return labels


def load_cls_labels(path: Path) -> dict[str, np.ndarray]:
    """The ``{id: float32[20]}`` dictionary of a cls_labels.npy file, checked."""
    try:
        table = np.load(path, allow_pickle=True).item()
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"Cannot read {path}: {err}. Expected a pickled dict {{id: float32[20]}}.") from err
    if not isinstance(table, dict):
        raise DataError(f"{path} holds a {type(table).__name__}; expected a dict {{id: float32[20]}}.")
    checked = {}
    for key, value in table.items():
        array = np.asarray(value, dtype=np.float32)
        if array.shape != (len(VOC_CLASSES),):
            raise DataError(f"{path}: labels of {key!r} have shape {array.shape}; expected (20,).")
        checked[str(key)] = array
    return checked


@register_dataset
class VOCDataset(Dataset):
    """PASCAL VOC 2012 semantic segmentation (see the module docstring for the layout)."""

    name: ClassVar[str] = "voc"
    split_names: ClassVar[tuple[str, ...]] = ("train", "train_aug", "val")
    default_options: ClassVar[dict[str, Any]] = {"input_size": 224, "labels": "auto"}
    option_choices: ClassVar[dict[str, tuple[Any, ...]]] = {"labels": LABEL_SOURCES}

    def __init__(self, root: Path | None, cache_dir: Path, **options: Any) -> None:
        super().__init__(root, cache_dir, **options)
        self.voc_root = find_voc_root(self.root)
        self._cls_labels: dict[str, np.ndarray] | None = None

    def _build_info(self) -> DatasetInfo:
        return DatasetInfo(self.name, VOC_CLASSES, input_size=self.options["input_size"])

    def default_splits(self) -> dict[str, str]:
        has_aug = self.list_path("train_aug").is_file()
        return {"train": "train_aug" if has_aug else "train", "cam_eval": "train", "val": "val"}

    def canonical_root(self) -> str | None:
        """The VOC2012 folder itself, whichever of its documented spellings was given."""
        return str(self.voc_root.resolve())

    def split_fallback(self, name: str) -> str | None:
        """``train_aug`` -> ``train`` when there is no train_aug list (VOC without SBD), as the
        role table documents, even where a suite pins train_aug."""
        if name == "train_aug" and not self.list_path(name).is_file() and self.list_path("train").is_file():
            return "train"
        return None

    def check_split(self, name: str) -> None:
        """Pre-flight: the list parses and is not empty, JPEGImages/ exists, and for every id
        the JPEG exists, is not empty or truncated, has a mask (train, val) of a mask mode and
        its image's size, and has labels from some source. Headers only: mask values and
        pixel data are checked when the trial reads them."""
        images = self.voc_root / "JPEGImages"
        if not images.is_dir():
            raise DataError(f"VOC folder {images} is missing; expected the images as JPEGImages/<id>.jpg under {self.voc_root}.")
        ids = self.split(name).ids
        problems: list[str] = []
        for sample_id in ids:
            try:
                self._check_sample(sample_id, require_mask=name != "train_aug")
            except DataError as err:
                problems.append(f"image {sample_id}: {err}")
        if problems:
            raise DataError(summarise_problems(problems, f"voc split {name} ({self.list_path(name)}, {len(ids)} ids)"))

    def _check_sample(self, sample_id: str, require_mask: bool) -> None:
        width, height, _ = image_header(self.voc_root / "JPEGImages" / f"{sample_id}.jpg")
        path = self.mask_path(sample_id)
        if path is None:
            if require_mask:
                raise DataError(f"Mask not found: expected {self.voc_root / 'SegmentationClass' / (sample_id + '.png')}.")
            if self.options["labels"] == "masks" or not self._has_labels_without_mask(sample_id):
                raise DataError(
                    f"No mask and no image-level labels: no {self.voc_root / 'SegmentationClassAug' / (sample_id + '.png')}, "
                    f"no entry in cls_labels.npy and no {self.voc_root / 'Annotations' / (sample_id + '.xml')}."
                )
            return
        mask_width, mask_height, mode = image_header(path, "Mask")
        if mode not in MASK_MODES:
            raise DataError(f"Mask {path} has image mode {mode!r}; expected a palette ('P') or grayscale ('L') PNG of class indices.")
        if (mask_width, mask_height) != (width, height):
            raise DataError(f"Mask {path} is {mask_width}x{mask_height} (WxH) but its image is {width}x{height}.")

    def _has_labels_without_mask(self, sample_id: str) -> bool:
        table = self._cls_label_table() if self.options["labels"] in ("auto", "cls_labels") else None
        if table is not None and sample_id in table:
            return True
        return self.options["labels"] in ("auto", "annotations") and (self.voc_root / "Annotations" / f"{sample_id}.xml").is_file()

    def list_path(self, split: str) -> Path:
        return self.voc_root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def _make_split(self, name: str) -> Split:
        path = self.list_path(name)
        reader = partial(self._read, require_mask=name != "train_aug")
        mask_free = partial(self._read, require_mask=name != "train_aug", with_mask=False)
        return Split(self.name, name, read_id_list(path), reader, str(path), mask_free_reader=mask_free)

    # -- reading one sample ----------------------------------------------------------------

    def _read(self, sample_id: str, require_mask: bool = True, with_mask: bool = True) -> Sample:
        """Image, labels and mask of one id. The official segmentation lists (train, val)
        must have a mask (it is the evaluation GT); train_aug ids may lack one. Without
        ``with_mask`` (``Split.without_masks``), an id whose labels come from cls_labels.npy or
        its XML is read without its mask (``mask`` None); the others still read it for the labels."""
        image = read_image(self.voc_root / "JPEGImages" / f"{sample_id}.jpg")
        if not with_mask and self._has_labels_without_mask(sample_id):
            return Sample(sample_id, image, self._labels(sample_id, None), None)
        mask, counts = self._read_mask(sample_id, image.shape)
        if mask is None and require_mask:
            raise DataError(
                f"Mask not found for {sample_id}: expected "
                f"{self.voc_root / 'SegmentationClass' / (sample_id + '.png')} (or the same in SegmentationClassAug/)."
            )
        labels = self._labels(sample_id, counts)
        return Sample(sample_id, image, labels, mask)

    def mask_path(self, sample_id: str) -> Path | None:
        """SegmentationClassAug/<id>.png if present, else SegmentationClass/<id>.png, else None."""
        for folder in ("SegmentationClassAug", "SegmentationClass"):
            path = self.voc_root / folder / f"{sample_id}.png"
            if path.is_file():
                return path
        return None

    def _read_mask(self, sample_id: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The validated mask and its value histogram; (None, None) when the id has no mask
        (train_aug ids without SBD masks: labels must then come from another source)."""
        path = self.mask_path(sample_id)
        if path is None:
            return None, None
        mask = read_mask(path)
        return mask, check_mask(mask, shape, len(VOC_CLASSES), path)

    def _labels(self, sample_id: str, counts: np.ndarray | None) -> np.ndarray:
        source = self.options["labels"]
        if source in ("auto", "cls_labels"):
            table = self._cls_label_table()
            if table is not None and sample_id in table:
                return table[sample_id].copy()
            if source == "cls_labels":
                where = self._cls_labels_path() or self.voc_root / "cls_labels.npy"
                raise DataError(f"No image-level labels for {sample_id} in {where} (option labels=cls_labels).")
        if source in ("auto", "annotations"):
            xml = self.voc_root / "Annotations" / f"{sample_id}.xml"
            if xml.is_file():
                return parse_annotation(xml)
            if source == "annotations":
                raise DataError(f"Annotation not found: {xml} (option labels=annotations).")
        if counts is None:
            raise DataError(
                f"No image-level labels for {sample_id}: no entry in cls_labels.npy, no "
                f"{self.voc_root / 'Annotations' / (sample_id + '.xml')} and no mask in "
                f"{self.voc_root / 'SegmentationClassAug'} or {self.voc_root / 'SegmentationClass'}."
            )
        return labels_from_counts(counts, len(VOC_CLASSES))

    def _cls_labels_path(self) -> Path | None:
        """cls_labels.npy in VOC2012/, else in the folders above it that are documented
        spellings of the root (VOCdevkit/, the folder holding VOCdevkit/): the same file is
        found whichever spelling was passed, so the canonical root changes nothing."""
        folders = [self.voc_root]
        if self.voc_root.name == "VOC2012":
            folders.append(self.voc_root.parent)
            if self.voc_root.parent.name == "VOCdevkit":
                folders.append(self.voc_root.parent.parent)
        for folder in folders:
            if (folder / "cls_labels.npy").is_file():
                return folder / "cls_labels.npy"
        return None

    def _cls_label_table(self) -> dict[str, np.ndarray] | None:
        if self._cls_labels is None:
            path = self._cls_labels_path()
            self._cls_labels = load_cls_labels(path) if path is not None else {}
        return self._cls_labels or None
