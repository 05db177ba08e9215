"""Reading (and writing) per-image files made by other WSSS code: CAMs, pseudo masks and
predictions, each ``<dir>/<image id>.<ext>``. Pure numpy / PIL; every error names the file.

CAM files (``read_cam_file``) hold, for one image, the maps of the classes present in it, at
image size, in one of these layouts (class indices are foreground indices ``0..C-1``, i.e. no
background, unless ``class_index_base=1``):

* IRN style (``step/make_cam.py``): a pickled dict ``{"keys": present class indices,
  "high_res": (K, H, W) maps at image size, "cam": (K, h, w) maps at stride 4}``; ``keys``
  may be a torch tensor. ``high_res`` is read when present, else ``cam`` (which then must be
  at image size). Maps are divided by their max (+1e-5): values in [0, 1).
* WeakTr / MCTformer style (``engine.py --gen-attention-maps``): a pickled dict
  ``{class index (int): (H, W) map}``, one entry per present class, min-max normalised.
* Dense: a plain ``(C, H, W)`` array, one map per foreground class; absent classes must be
  all zero (or ``absent="zero"`` drops them).
* The harness's own ``cams/<id>.npz`` (``classes``: present indices, ``cams``: (K, H, W)).

Pickled dicts are unpickled with an allow-list (numpy arrays, scalars, torch tensors), so a
CAM file cannot run code when it is read.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any, Iterable

import numpy as np

CAM_SUFFIXES = (".npy", ".npz")
LABEL_SUFFIX = ".png"
CAM_STYLES = ("npz", "dense", "irn", "weaktr")


class ExternalFileError(ValueError):
    """A file made elsewhere is missing or malformed; the message names it."""


# -- safe unpickling of CAM dicts ------------------------------------------------------------

def _torch_storage_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` without pickle's code execution (weights_only)."""
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import collections

    allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    reconstruct, scalar = np.zeros(1).__reduce__()[0], np.float32(0).__reduce__()[0]  # numpy 1 and 2 alike
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    import codecs

    allowed[("_codecs", "encode")] = codecs.encode
    try:
        import torch

        allowed[("torch._utils", "_rebuild_tensor_v2")] = torch._utils._rebuild_tensor_v2
        allowed[("torch.storage", "_load_from_bytes")] = _torch_storage_from_bytes
    except ImportError:  # pragma: no cover - torch is a dependency of the harness
        pass
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module.startswith(("numpy", "numpy._core")) and name.endswith("DType"):  # numpy >= 2 dtype classes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays, scalars and torch tensors are read)")


def _load_npy(path: Path) -> Any:
    """An ``.npy`` file: a plain array, or the object pickled into it (a dict of CAMs)."""
    fmt = np.lib.format
    with open(path, "rb") as handle:
        version = fmt.read_magic(handle)
        shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(handle)
        if not dtype.hasobject:
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        array = _SafeUnpickler(handle).load()  # numpy writes an object array as one pickle after the header
    if isinstance(array, np.ndarray) and array.shape == () and shape == ():
        return array.item()
    return array


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# -- CAMs -------------------------------------------------------------------------------------

def read_cam_file(path: Path, num_classes: int, class_index_base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One CAM file -> ``(classes (K,) int64 foreground indices 0..C-1, maps (K, H, W) float32)``.

    A dense ``(C, H, W)`` array gives every class (absent ones are checked by the caller).
    ``class_index_base``: 0 when the file's class indices are foreground indices (IRN,
    WeakTr, the harness), 1 when they count background as 0 (a key 0 is then skipped);
    it does not apply to dense arrays (channel c is class c).
    Raises ExternalFileError naming the file for anything it cannot interpret.
    """
    base = class_index_base
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "classes" not in data or "cams" not in data:
                    raise ExternalFileError(f"CAM file {path}: an .npz must hold arrays `classes` and `cams` (the harness's format); it holds {sorted(data.files)}.")
                classes, maps = data["classes"], data["cams"]
        else:
            content = _load_npy(path)
            classes, maps = _cam_content(content, path, num_classes)
            base = 0 if isinstance(content, np.ndarray) else base  # a dense array's channels are the classes
    except ExternalFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy / pickle raise many types for a bad file
        raise ExternalFileError(f"CAM file {path} cannot be read: {exc}.") from None
    classes = _to_numpy(classes).astype(np.int64).reshape(-1) - base
    maps = _to_numpy(maps).astype(np.float32)
    if base:
        keep = classes >= 0  # a background entry is not a class map
        classes, maps = classes[keep], maps[keep] if maps.ndim == 3 and maps.shape[0] == keep.size else maps
    if maps.ndim == 2 and classes.size == 1:
        maps = maps[None]
    if maps.ndim != 3 or maps.shape[0] != classes.size:
        raise ExternalFileError(f"CAM file {path}: {classes.size} class index(es) but maps of shape {tuple(maps.shape)}; expected (K, H, W) with K = {classes.size}.")
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if bad.size:
        raise ExternalFileError(f"CAM file {path}: class index(es) {sorted(set(bad.tolist()))} outside 0..{num_classes - 1} "
                                f"(foreground classes, no background; set external.class_index_base=1 if 0 means background).")
    if len(set(classes.tolist())) != classes.size:
        raise ExternalFileError(f"CAM file {path}: a class index appears twice ({classes.tolist()}).")
    return classes, maps


def _cam_content(content: Any, path: Path, num_classes: int) -> tuple[Any, Any]:
    if isinstance(content, np.ndarray):
        if content.ndim != 3:
            raise ExternalFileError(f"CAM file {path}: a dense array must be (C, H, W) with C = {num_classes}; got shape {content.shape}.")
        if content.shape[0] != num_classes:
            extra = " (one more than the classes: drop the background channel)" if content.shape[0] == num_classes + 1 else ""
            raise ExternalFileError(f"CAM file {path}: a dense array must have C = {num_classes} channels, one per foreground class; got {content.shape[0]}{extra}.")
        return np.arange(num_classes), content
    if not isinstance(content, dict):
        raise ExternalFileError(f"CAM file {path} holds a {type(content).__name__}; expected a dict (IRN: keys + high_res, WeakTr: class -> map) or a (C, H, W) array.")
    if "keys" in content:
        for name in ("high_res", "cam"):
            if name in content:
                return content["keys"], content[name]
        raise ExternalFileError(f"CAM file {path}: a dict with `keys` needs `high_res` or `cam` maps; it holds {sorted(map(str, content))}.")
    if content and all(isinstance(k, (int, np.integer)) for k in content):
        keys = sorted(content)
        return np.array(keys, dtype=np.int64), np.stack([_to_numpy(content[k]) for k in keys]) if keys else np.zeros((0, 1, 1))
    raise ExternalFileError(f"CAM file {path}: unknown dict layout with keys {sorted(map(str, content))[:8]}; expected `keys` + `high_res` "
                            "(IRN) / `cam`, or integer class indices -> maps (WeakTr).")


def write_cam_file(directory: Path, sample_id: str, classes: np.ndarray, maps: np.ndarray, num_classes: int, style: str) -> Path:
    """Write one image's present-class maps in ``style`` (see CAM_STYLES); returns the path.

    ``classes`` (K,) foreground indices, ``maps`` (K, H, W) float32, written unchanged
    (float32, so a round trip through the files is exact).
    """
    maps = np.asarray(maps, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64)
    if style == "npz":
        path = directory / f"{sample_id}.npz"
        np.savez_compressed(path, classes=classes, cams=maps)
        return path
    path = directory / f"{sample_id}.npy"
    if style == "dense":
        dense = np.zeros((num_classes, *maps.shape[1:]), dtype=np.float32)
        dense[classes] = maps
        np.save(path, dense)
    elif style == "irn":
        np.save(path, {"keys": classes, "high_res": maps}, allow_pickle=True)
    elif style == "weaktr":
        np.save(path, {int(c): m for c, m in zip(classes, maps)}, allow_pickle=True)
    else:
        raise ValueError(f"unknown CAM style {style!r}; expected one of {', '.join(CAM_STYLES)}")
    return path


# -- label PNGs -------------------------------------------------------------------------------

def read_label_png(path: Path, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """A palette or grey PNG of class indices -> (H, W) uint8 in {0..C, 255}.

    Palette PNGs are read as palette indices (never colours); colour PNGs are refused.
    Raises ExternalFileError naming the file for a wrong mode, size or value.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise ExternalFileError(f"Label PNG {path} has image mode {image.mode!r}; expected a palette ('P') or grey ('L') PNG of class indices.")
            values = np.asarray(image)
    except ExternalFileError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ExternalFileError(f"Label PNG {path} cannot be read: {exc}.") from None
    if values.shape != tuple(size):
        raise ExternalFileError(f"Label PNG {path} is {values.shape[1]}x{values.shape[0]} (WxH); its image is {size[1]}x{size[0]}.")
    bad = np.unique(values[(values > num_classes) & (values != 255)])
    if bad.size or values.min() < 0:
        raise ExternalFileError(f"Label PNG {path} holds values {bad[:8].tolist()}; expected 0 (background), 1..{num_classes} (classes) or 255 (ignore).")
    return values.astype(np.uint8)


# -- directories ------------------------------------------------------------------------------

def list_ids(directory: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    """``{id: path}`` of the files in ``directory`` with one of ``suffixes`` (hidden files
    skipped). Raises ExternalFileError if the directory is missing or an id has two files."""
    if not directory.is_dir():
        raise ExternalFileError(f"Directory {directory} does not exist (or is not a directory).")
    suffixes = tuple(suffixes)
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix not in suffixes or not path.is_file():
            continue
        if path.stem in found:
            raise ExternalFileError(f"Directory {directory}: id {path.stem!r} has two files ({found[path.stem].name}, {path.name}); keep one.")
        found[path.stem] = path
    return found


def files_hash(groups: dict[str, dict[str, Path]]) -> str:
    """SHA-256 (first 16 hex digits) over every file's role, id and content, in sorted
    order: any added, removed, renamed or changed file changes it."""
    digest = hashlib.sha256()
    for role in sorted(groups):
        for sample_id, path in sorted(groups[role].items()):
            digest.update(f"{role}\0{sample_id}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]
