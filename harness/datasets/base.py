"""Dataset and split abstractions shared by every dataset (synthetic, VOC, COCO).

A :class:`Dataset` knows where its files are and which splits it has; a :class:`Split` is an
indexable list of sample ids that reads one :class:`~methods.base.Sample` at a time. Reading
is lazy and validating: a broken file is reported when it is first read, by a
:class:`~harness.errors.DataError` that names the file and what was expected, so a user with
10,582 images learns about the one bad mask instead of a shape mismatch deep in a method.
"""

from __future__ import annotations

import abc
import io
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np
from PIL import Image

from harness.errors import ConfigError, DataError, suggest, unknown
from methods.base import IGNORE_INDEX, DatasetInfo, Sample, add_to_registry

SampleReader = Callable[[str], Sample]

ROLES = ("train", "cam_eval", "val")
"""What a trial uses splits for: training, CAM / pseudo-mask evaluation, segmentation eval."""


# -- splits ------------------------------------------------------------------------------


class Split:
    """One split of a dataset: its ids, and a reader that loads and validates a sample.

    Satisfies :class:`methods.base.SampleSource`. Picklable as long as the reader is (a bound
    method of a dataset is), so it can cross process boundaries (DataLoader workers, Ray).
    """

    def __init__(self, dataset: str, name: str, ids: list[str], reader: SampleReader, source: str = "",
                 mask_free_reader: SampleReader | None = None) -> None:
        self.dataset = dataset
        self.name = name
        self.ids = ids
        self.source = source  # where the ids came from, for messages (a list file, a JSON, ...)
        self._reader = reader
        self._mask_free_reader = mask_free_reader

    def without_masks(self) -> "Split":
        """The same samples for a loop that reads no mask (image-level training): read by the
        dataset's mask-free reader when it has one, which takes the labels from a label file
        and leaves ``mask`` None where it can (VOC with ``cls_labels.npy`` / XML annotations:
        no PNG decoded, no mask checked, ~1 ms per VOC image); else this split as it is.
        Images and labels are the same as this split's."""
        if self._mask_free_reader is None:
            return self
        return Split(self.dataset, self.name, self.ids, self._mask_free_reader, self.source)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Sample:
        return self._read(self.ids[i])

    def __iter__(self) -> Iterator[Sample]:
        for sample_id in self.ids:
            yield self._read(sample_id)

    def _read(self, sample_id: str) -> Sample:
        """The reader's sample; a DataError is prefixed with the split and image id, so a
        trial's one-line failure names both the image and its file."""
        try:
            return self._reader(sample_id)
        except DataError as err:
            raise DataError(f"{self.dataset} split {self.name}, image {sample_id}: {err}") from err

    def __repr__(self) -> str:
        return f"Split({self.dataset}/{self.name}, {len(self)} samples)"


class MaskFolderSource:
    """A split with each sample's mask replaced by ``<folder>/<id>.png`` (pseudo masks for
    stage 4, IRN's confident-region labels): a :class:`methods.base.SampleSource`."""

    def __init__(self, split: Split, folder: Path) -> None:
        self.split, self.folder = split, folder

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Sample:
        from harness.visualize import load_label_png

        sample = self.split[index]
        sample.mask = load_label_png(self.folder / f"{sample.id}.png")
        return sample


# -- validated file access -----------------------------------------------------------------


def read_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; DataError naming the file if it is missing or
    cannot be decoded (truncated download, HTML error page saved as .jpg, ...)."""
    if not path.is_file():
        raise DataError(f"Image not found: {path}. Expected an image file (JPEG or PNG) at this path.")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot decode image {path}: {err}. The file is corrupt or not an image.") from err


MASK_MODES = ("P", "L", "I", "I;16")
"""PIL modes a mask of class indices may have (palette or grayscale, never colour)."""


def summarise_problems(problems: list[str], where: str, limit: int = 5) -> str:
    """One paragraph for a pre-flight failure: where, how many problems, the first few."""
    shown = " ".join(f"({i + 1}) {p.rstrip('.')}." for i, p in enumerate(problems[:limit]))
    more = f" ... and {len(problems) - limit} more." if len(problems) > limit else ""
    return f"Data check of {where} found {len(problems)} problem(s): {shown}{more}"


def image_header(path: Path, what: str = "Image") -> tuple[int, int, str]:
    """(width, height, mode) of an image file from its header alone (no pixel decoding, about
    0.1 ms per file), for the pre-flight check. DataError naming the file when it is missing,
    empty, not an image, or a JPEG without its end-of-image marker (a truncated download)."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path}.")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{what} {path} is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            width, height, mode, kind = image.width, image.height, image.mode, image.format
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{what} {path} is not a readable image ({err}).") from err
    if kind == "JPEG":
        # A JPEG ends with FF D9; a download cut short does not. Some writers pad after the
        # marker, so look at the last bytes rather than the last two.
        with path.open("rb") as handle:
            handle.seek(max(0, size - 64))
            tail = handle.read()
        if b"\xff\xd9" not in tail:
            raise DataError(f"{what} {path} is a truncated JPEG ({size} bytes, no end-of-image marker).")
    return width, height, mode


def read_mask(path: Path) -> np.ndarray:
    """A label mask as (H, W) uint8 class indices.

    Palette PNGs (VOC SegmentationClass) are read as their palette indices, never as colours;
    grayscale PNGs (SegmentationClassAug, our caches) as their values. A colour PNG would
    silently give wrong classes, so it is rejected.
    """
    if not path.is_file():
        raise DataError(f"Mask not found: {path}. Expected a PNG of class indices at this path.")
    try:
        with Image.open(path) as mask:
            if mask.mode not in MASK_MODES:
                raise DataError(
                    f"Mask {path} has image mode {mask.mode!r}; expected a palette ('P') or grayscale ('L') "
                    "PNG holding class indices, not colours."
                )
            values = np.asarray(mask)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot decode mask {path}: {err}. The file is corrupt or not a PNG.") from err
    if values.dtype != np.uint8:
        bad = np.unique(values[(values < 0) | (values > 255)])
        if bad.size:
            raise DataError(f"Mask {path} holds values {_list_values(bad)} outside 0..255.")
        values = values.astype(np.uint8)
    return values


def value_histogram(mask: np.ndarray) -> np.ndarray:
    """(256,) int64 counts of each value of a uint8 mask: ``np.bincount(mask.ravel(),
    minlength=256)``. torch's kernel counts uint8 in place, about twice as fast as numpy's,
    which first widens every pixel to int64 (this runs once per mask read, in every loader)."""
    import torch

    if mask.dtype != np.uint8:
        return np.bincount(mask.ravel(), minlength=256)
    # A writable array (np.require copies a read-only one, e.g. PIL's): torch warns on others.
    pixels = torch.from_numpy(np.require(mask, requirements=("C", "W"))).view(-1)
    return torch.bincount(pixels, minlength=256).numpy()


def check_mask(mask: np.ndarray, image_shape: tuple[int, ...], num_classes: int, path: Path) -> np.ndarray:
    """Validate a mask against its image and the class count; return its per-value histogram
    (256 bins), which callers reuse to derive image-level labels without a second pass."""
    if mask.shape != tuple(image_shape[:2]):
        raise DataError(
            f"Mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{image_shape[1]}x{image_shape[0]}; a mask must have its image's size."
        )
    counts = value_histogram(mask)
    valid = np.zeros(256, dtype=bool)
    valid[: num_classes + 1] = True
    valid[IGNORE_INDEX] = True
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        raise DataError(
            f"Mask {path} holds values {_list_values(bad)}; expected 0 (background), "
            f"1..{num_classes} (classes) or {IGNORE_INDEX} (ignore)."
        )
    return counts


def labels_from_counts(counts: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) float32 multi-hot of the foreground classes with at least one pixel."""
    return (counts[1 : num_classes + 1] > 0).astype(np.float32)


def _list_values(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({values.size} distinct)" if values.size > limit else "")


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an (H, W) uint8 or (H, W, 3) uint8 array as PNG (lossless, deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# -- options -------------------------------------------------------------------------------


def coerce_option(dataset: str, key: str, value: Any, default: Any, choices: tuple[Any, ...] | None) -> Any:
    """Bring an override (possibly the string from ``key=value`` on the command line) to the
    type of its default, and check it against the allowed choices."""
    expected = type(default)
    try:
        if isinstance(value, str) and expected is not str:
            value = _parse_string(value, expected)
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
    except ValueError:
        pass  # reported below as a type error
    if type(value) is not expected:
        raise ConfigError(
            f'Option "{key}" of dataset "{dataset}" must be a {expected.__name__} '
            f"(default {default!r}), got {value!r}."
        )
    if choices is not None and value not in choices:
        shown = ", ".join(str(c) for c in choices)
        raise ConfigError(
            f'Option "{key}" of dataset "{dataset}" must be one of {shown}, got {value!r}.'
            f"{suggest(str(value), [str(c) for c in choices])}"
        )
    return value


def _parse_string(text: str, expected: type) -> Any:
    if expected is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    return expected(text.strip())


# -- datasets ------------------------------------------------------------------------------


class Dataset(abc.ABC):
    """A dataset: class names, input size, named splits and which split plays which role.

    Subclasses declare ``name``, ``split_names``, ``default_options`` (the option names and
    their defaults, which also fix each option's type) and optionally ``option_choices``;
    they implement :meth:`_build_info`, :meth:`_make_split` and :meth:`default_splits`.
    """

    name: ClassVar[str] = ""
    split_names: ClassVar[tuple[str, ...]] = ()
    default_options: ClassVar[Mapping[str, Any]] = {}
    option_choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}

    def __init__(self, root: Path | None, cache_dir: Path, **options: Any) -> None:
        # No "~" expansion here: harness.config.expand_data_root does it once, where the user's
        # text enters, so the trial spec and every worker see the same absolute path.
        self.root = Path(root) if root is not None else None
        self.cache_dir = Path(cache_dir).expanduser()
        self.options = self._resolve_options(options)
        self._validate_options()
        self.info: DatasetInfo = self._build_info()
        self._splits: dict[str, Split] = {}

    def split(self, name: str) -> Split:
        """The split called ``name`` (built once, then reused)."""
        if name not in self.split_names:
            raise unknown(f"{self.name} split", name, self.split_names)
        if name not in self._splits:
            split = self._make_split(name)
            if not split.ids:
                where = f" ({split.source})" if split.source else ""
                raise DataError(f'Split "{name}" of dataset "{self.name}" is empty: no sample ids{where}.')
            self._splits[name] = split
        return self._splits[name]

    def canonical_root(self) -> str | None:
        """The data root as the dataset resolved it (absolute, symlinks resolved), so every
        spelling of ``--data-root`` that reaches the same files gives the same trial id."""
        return str(self.root.resolve()) if self.root is not None else None

    def split_fallback(self, name: str) -> str | None:
        """A split to use instead of ``name`` when ``name``'s files are absent (a documented
        fallback), else None."""
        return None

    def check_split(self, name: str) -> None:
        """Pre-flight check of split ``name``: what is cheap (lists, file existence, headers).
        DataError naming the file on the first problems found. Generated datasets: nothing."""

    @abc.abstractmethod
    def default_splits(self) -> dict[str, str]:
        """Split name per role: ``{"train": ..., "cam_eval": ..., "val": ...}``."""

    @abc.abstractmethod
    def _build_info(self) -> DatasetInfo:
        """The :class:`DatasetInfo` for the resolved options."""

    @abc.abstractmethod
    def _make_split(self, name: str) -> Split:
        """Build split ``name`` (a valid split name); may be empty (the caller checks)."""

    def _validate_options(self) -> None:
        """Check ranges and combinations of ``self.options`` (types are already checked)."""

    def _resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        resolved = dict(self.default_options)
        for key, value in options.items():
            if key not in self.default_options:
                valid = ", ".join(sorted(self.default_options)) or "(none)"
                raise ConfigError(
                    f'Unknown option "{key}" for dataset "{self.name}".'
                    f"{suggest(key, self.default_options)} Valid options: {valid}."
                )
            resolved[key] = coerce_option(
                self.name, key, value, self.default_options[key], self.option_choices.get(key)
            )
        return resolved

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root}, options={self.options})"


DATASETS: dict[str, type[Dataset]] = {}


def register_dataset(cls: type[Dataset]) -> type[Dataset]:
    """Class decorator: make a dataset available under ``cls.name``."""
    return add_to_registry(DATASETS, cls, "dataset")


def create_dataset(name: str, root: Path | None, cache_dir: Path, options: Mapping[str, Any]) -> Dataset:
    """Instantiate dataset ``name`` with user options (unknown name or option -> ConfigError)."""
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    return DATASETS[name](root, cache_dir, **dict(options))


def dataset_options(name: str) -> dict[str, Any]:
    """The option names of dataset ``name`` with their defaults."""
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS)
    return dict(DATASETS[name].default_options)
