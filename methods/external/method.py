"""``external``: CAMs, pseudo masks or predictions made by other code, evaluated by the harness.

Nothing is trained from the files it is given: ``cams`` (required) are read per image;
``masks`` (optional) are read as the pseudo masks, else they come from the CAMs by the common
recipe (background threshold ``bg_threshold``, optional dense CRF: the same as the ``cam``
baseline); ``predictions`` (optional) are read as the segmentation output on the val split,
else the harness trains its common segmentation recipe (harness/common_seg.py) on the pseudo
masks. File layouts: methods/external/formats.py and README.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from methods.base import CRFParams, DatasetInfo, Method, MethodConfig, NoPrediction, SampleSource, StageContext, register, to_uint8_image
from methods.common.crf import dense_crf_labels
from methods.common.training import threshold_masks
from methods.external.formats import CAM_SUFFIXES, LABEL_SUFFIX, ExternalFileError, files_hash, list_ids, read_cam_file, read_label_png

NORMALIZE = ("none", "minmax")
ABSENT = ("error", "zero")
RANGE_TOLERANCE = 1e-5  # IRN divides by (max + 1e-5): maps just under 1; allow rounding above
PREDICTION_LOGIT = 20.0  # one-hot logits for a read prediction: softmax ~1 for its class


@dataclass
class ExternalConfig(MethodConfig):
    name: str = "external"  # the leaderboard row's name
    cams: str | None = None  # directory of <id>.npy / <id>.npz CAMs (required)
    masks: str | None = None  # directory of <id>.png pseudo masks of the train split
    predictions: str | None = None  # directory of <id>.png predictions of the val split
    normalize: str = "none"  # none: values must be in [0, 1]; minmax: each map scaled by its own min / max
    absent: str = "error"  # a non-zero map for a class absent from the image: error | zero (drop it)
    class_index_base: int = 0  # 0: class indices are foreground 0..C-1; 1: 0 is background (skipped)
    bg_threshold: float = 0.35  # pseudo masks from CAMs: background score
    pseudo_crf: bool = False  # pseudo masks from CAMs: + dense CRF
    files_hash: str = ""  # set when the sweep is planned: a hash of every file read (part of the trial id)


def _dirs(config: ExternalConfig) -> dict[str, Path]:
    return {role: Path(getattr(config, role)) for role in ("cams", "masks", "predictions") if getattr(config, role)}


def _scan(config: ExternalConfig) -> dict[str, dict[str, Path]]:
    """role -> {id: file} of every directory given."""
    return {role: list_ids(path, CAM_SUFFIXES if role == "cams" else (LABEL_SUFFIX,)) for role, path in _dirs(config).items()}


def _ids_text(ids: list[str]) -> str:
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


@register
class External(Method):
    name = "external"
    Config = ExternalConfig
    wants_ids = True

    def __init__(self, config: ExternalConfig, dataset: DatasetInfo, device: torch.device) -> None:
        super().__init__(config, dataset, device)
        self.has_segmenter = config.predictions is not None
        self._files: dict[str, dict[str, Path]] | None = None

    # -- planning ----------------------------------------------------------------------------
    @classmethod
    def check_inputs(cls, config: ExternalConfig, dataset: DatasetInfo, split_ids: dict[str, list[str]]) -> ExternalConfig:
        """Directories against the split ids: each must cover the ids it is read for
        (cams: cam_eval, and train when no masks are given; masks: train; predictions:
        val) and hold no id outside the dataset's splits. Returns the config with absolute
        directories and ``files_hash``. Raises ValueError naming the directory and ids."""
        if not config.cams:
            raise ValueError("method `external` needs `external.cams=DIR`, a directory of <id>.npy / <id>.npz CAMs "
                             "(optionally also external.masks=DIR and external.predictions=DIR).")
        if config.normalize not in NORMALIZE:
            raise ValueError(f"external.normalize must be one of {', '.join(NORMALIZE)}; got {config.normalize!r}.")
        if config.absent not in ABSENT:
            raise ValueError(f"external.absent must be one of {', '.join(ABSENT)}; got {config.absent!r}.")
        if config.class_index_base not in (0, 1):
            raise ValueError(f"external.class_index_base must be 0 or 1; got {config.class_index_base}.")
        config = dataclasses.replace(config, **{role: str(path.expanduser().resolve()) for role, path in _dirs(config).items()})
        files = _scan(config)
        needs = {"cams": ["cam_eval"] + ([] if config.masks else ["train"]), "masks": ["train"], "predictions": ["val"]}
        known = set(split_ids["known"])
        for role, found in files.items():
            for split_role in needs[role]:
                missing = sorted(set(split_ids[split_role]) - set(found))
                if missing:
                    raise ValueError(f"external.{role} directory {_dirs(config)[role]} has no file for {len(missing)} id(s) of the "
                                     f"{split_role} split: {_ids_text(missing)} (expected <id>{'.npy or .npz' if role == 'cams' else '.png'}).")
            extra = sorted(set(found) - known)
            if extra:
                raise ValueError(f"external.{role} directory {_dirs(config)[role]} holds {len(extra)} file(s) for ids in none of the "
                                 f"dataset's train / cam-eval / val splits: {_ids_text(extra)}. Wrong dataset or directory?")
        return dataclasses.replace(config, files_hash=files_hash(files))

    @classmethod
    def row_name(cls, config: dict[str, Any]) -> str:
        return str(config.get("name") or cls.name)

    # -- stages ------------------------------------------------------------------------------
    def _scanned(self) -> dict[str, dict[str, Path]]:
        if self._files is None:
            self._files = _scan(self.config)
        return self._files

    def train_cam(self, train: SampleSource, ctx: StageContext) -> None:
        """Nothing to train; the files must still be the ones the trial was planned with."""
        if self.config.files_hash:
            now = files_hash(self._scanned())
            if now != self.config.files_hash:
                dirs = ", ".join(str(p) for p in _dirs(self.config).values())
                raise RuntimeError(f"The files in {dirs} changed since this trial was planned (hash {self.config.files_hash}, now {now}); "
                                   "run the command again: changed files make a new trial.")

    @torch.no_grad()
    def cams(self, images: torch.Tensor, labels: torch.Tensor, ids: list[str] | None = None) -> torch.Tensor:
        """The read maps at image size, (B, C, H, W) in [0, 1], zero for absent classes.
        An id without a CAM file gives zeros only when pseudo masks are read from files
        (the CAMs of such an image are not used); otherwise it is an error."""
        if ids is None:
            raise RuntimeError("method `external` reads files by sample id; the harness must pass ids=")
        B, _, H, W = images.shape
        out = torch.zeros(B, self.dataset.num_classes, H, W)
        files = self._scanned()["cams"]
        for i, sample_id in enumerate(ids):
            if sample_id not in files:
                if self.config.masks:
                    continue
                raise ExternalFileError(f"external.cams: no CAM file for image {sample_id!r} in {self.config.cams}.")
            out[i] = torch.from_numpy(self._read_cam(files[sample_id], labels[i].cpu().numpy(), (H, W)))
        return out.to(images.device)

    def _read_cam(self, path: Path, labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """One file -> (C, H, W) float32, checked: size, classes present, value range."""
        cfg = self.config
        C = self.dataset.num_classes
        classes, maps = read_cam_file(path, C, cfg.class_index_base)
        if tuple(maps.shape[1:]) != tuple(size):
            raise ExternalFileError(f"CAM file {path}: maps are {maps.shape[2]}x{maps.shape[1]} (WxH) but the image is {size[1]}x{size[0]}; "
                                    "CAMs must be at image size (IRN: use `high_res`, not the strided `cam`).")
        if not np.isfinite(maps).all():
            raise ExternalFileError(f"CAM file {path} holds NaN or infinite values.")
        present = labels > 0
        absent = [int(c) for c, m in zip(classes, maps) if not present[c] and np.any(m != 0)]
        if absent and cfg.absent == "error":
            names = [self.dataset.class_names[c] for c in absent]
            raise ExternalFileError(f"CAM file {path} has a non-zero map for class(es) {names} (index {absent}), absent from the image's "
                                    "labels. Give maps of present classes only, or set external.absent=zero to drop them.")
        keep = present[classes]
        classes, maps = classes[keep], maps[keep]
        if cfg.normalize == "minmax" and maps.size:
            lo = maps.reshape(len(maps), -1).min(1)[:, None, None]
            hi = maps.reshape(len(maps), -1).max(1)[:, None, None]
            maps = (maps - lo) / np.maximum(hi - lo, 1e-12)  # a constant map becomes 0
        if maps.size and (maps.min() < 0 or maps.max() > 1 + RANGE_TOLERANCE):
            raise ExternalFileError(f"CAM file {path} has values in [{maps.min():.4g}, {maps.max():.4g}]; expected [0, 1]. "
                                    "Set external.normalize=minmax to scale each map by its own min and max.")
        out = np.zeros((C, *size), dtype=np.float32)
        out[classes] = np.clip(maps, 0.0, 1.0)
        return out

    @torch.no_grad()
    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor, ids: list[str] | None = None) -> torch.Tensor:
        """Read from ``masks`` when given, else the common recipe on the CAMs:
        argmax over [background plane ``bg_threshold``, present-class CAMs] (+ dense CRF)."""
        if self.config.masks:
            if ids is None:
                raise RuntimeError("method `external` reads files by sample id; the harness must pass ids=")
            files = self._scanned()["masks"]
            size = tuple(images.shape[-2:])
            masks = []
            for sample_id in ids:
                if sample_id not in files:
                    raise ExternalFileError(f"external.masks: no pseudo mask for image {sample_id!r} in {self.config.masks}.")
                masks.append(torch.from_numpy(read_label_png(files[sample_id], self.dataset.num_classes, size).astype(np.int64)))
            return torch.stack(masks).to(images.device)
        masks = threshold_masks(cams, labels, self.config.bg_threshold)
        if not self.config.pseudo_crf:
            return masks
        refined = []
        for image, mask, label in zip(images, masks, labels):
            present = [0] + (torch.nonzero(label).flatten() + 1).tolist()  # bg + present classes, compacted for the CRF
            compact = torch.searchsorted(torch.tensor(present), mask.cpu()).numpy()
            out = dense_crf_labels(to_uint8_image(image), compact, len(present), CRFParams())
            refined.append(torch.tensor(present)[torch.from_numpy(out)])
        return torch.stack(refined).to(masks.device)

    def train_seg(self, train: SampleSource, ctx: StageContext) -> None:
        """Nothing to train: predictions are read (without them the harness trains its
        common segmentation recipe instead and never calls this)."""

    @torch.no_grad()
    def segment(self, images: torch.Tensor, multiscale: bool = False, ids: list[str] | None = None) -> torch.Tensor:
        """Read predictions as one-hot logits (``PREDICTION_LOGIT`` for the read class; a
        255 pixel gets equal logits, i.e. background). No multi-scale protocol: ``multiscale``
        returns the same. Raises NoPrediction for an image without a file."""
        if ids is None:
            raise RuntimeError("method `external` reads files by sample id; the harness must pass ids=")
        files = self._scanned().get("predictions", {})
        C = self.dataset.num_classes
        size = tuple(images.shape[-2:])
        logits = torch.zeros(images.shape[0], C + 1, *size)
        for i, sample_id in enumerate(ids):
            if sample_id not in files:
                raise NoPrediction(f"external.predictions: no prediction for image {sample_id!r} in {self.config.predictions}.")
            pred = torch.from_numpy(read_label_png(files[sample_id], C, size).astype(np.int64))
            valid = pred != 255
            logits[i].scatter_(0, torch.where(valid, pred, 0)[None], PREDICTION_LOGIT * valid[None].float())
        return logits.to(images.device)

    # -- state -------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        return {}

    def cam_threshold(self) -> float | None:
        """The background threshold the pseudo masks use (``bg_threshold``), as every method
        declares its own for the fixed-threshold CAM number."""
        return self.config.bg_threshold
