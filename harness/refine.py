"""Pseudo-mask refinement shared by every method: ``eval.refine = "none" | "irn"``.

With ``eval.refine = "irn"`` the ``pseudo_masks`` stage no longer calls
``method.pseudo_masks``; it runs IRN (:mod:`methods.common.irn`, Ahn et al., CVPR 2019) on the
method's CAMs of the training split instead:

1. confident-region labels from each training image's CAMs (the stored ``cams/<id>.npz`` when
   the cams stage wrote one, else ``method.cams``), cached as ``work/irn/labels/<id>.png``;
2. IRN trained on them (mid-stage checkpoints ``work/irn/irn.pt``; when done
   ``checkpoints/irn.pt``, so a trial interrupted after training does not train again);
3. each pseudo mask = IRN's random walk from the method's CAMs.

The method's own networks are untouched. Metrics added to the stage: ``time_irn_s`` (wall
seconds of steps 1-2, kept across resumes; the random walk itself is in
``time_pseudo_masks_s``) and ``params_irn``. IRN's settings are ``eval.irn``: a suite's
``[eval.irn]`` table or ``eval.irn=key=value,key=value`` on the command line, fields of
:class:`methods.common.irn.config.IRNConfig`. ``<method>.refine`` / ``<method>.irn`` (override or
``[methods.<method>]`` key) set them for one method's trials (``harness.sweep.PER_METHOD_EVAL``).

The runner hands itself in (``pseudo_mask_refiner(runner, split)``) and this module uses its
``eval``, ``dir``, ``device``, ``method``, ``_context`` and ``_load_cams``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from harness.config import build_method_config
from harness.errors import ConfigError, suggest
from harness.datasets.base import MaskFolderSource
from harness.visualize import save_label_png
from methods.base import stack_samples
from methods.common import weights
from methods.common.crf import map_forked
from methods.common.irn import IRNConfig, build_model, irn_masks, train_irn
from methods.common.irn.labels import confident_labels, confident_labels_crf
from methods.common.irn.model import ARCHS

REFINERS = ("none", "irn")
CHECKPOINT = "irn"  # checkpoints/irn.pt in the trial directory
LABEL_CHUNK = 8  # confident-region labels made per CRF worker between writes


def _crf_label_job(job: tuple[Any, Any, float, float]):
    """One image's CRF-refined confident-region labels (a worker of :func:`map_forked`)."""
    image, cams, fg_threshold, bg_threshold = job
    return confident_labels_crf(image, cams, fg_threshold, bg_threshold)


def refine_name(eval_settings: dict[str, Any]) -> str:
    """``eval.refine``, checked: one of :data:`REFINERS` (ConfigError otherwise)."""
    name = str(eval_settings.get("refine", "none") or "none").strip().lower()
    if name not in REFINERS:
        raise ConfigError(f"eval option `refine` must be one of {', '.join(REFINERS)}; got {name!r}.{suggest(name, REFINERS)}")
    return name


def irn_settings(value: Any) -> dict[str, Any]:
    """An ``eval.irn`` value (a dict, or ``"key=value,key=value"``) as a dict of the keys it
    sets, values as given (ConfigError for an item that is not key=value or another type)."""
    value = value or {}
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
        bad = [part for part in items if "=" not in part]
        if bad:
            raise ConfigError(f"eval option `irn`: {bad[0]!r} is not key=value; write e.g. eval.irn=epochs=5,crop=128.")
        value = dict(part.split("=", 1) for part in items)
    if not isinstance(value, dict):
        raise ConfigError(f"eval option `irn` must be a table of IRN settings; got {value!r}.")
    return {str(k).strip(): v for k, v in value.items()}


def merge_irn(base: Any, update: Any) -> Any:
    """``update``'s IRN settings over ``base``'s, key by key (a suite's ``[eval.irn]`` table,
    then a method's ``irn``, then an override, so ``adcam.irn=pretrained=none`` changes one key
    and keeps the suite's recipe). Either side empty: the other, unchanged."""
    if not update:
        return base
    if not base:
        return update
    return {**irn_settings(base), **irn_settings(update)}


def irn_config(eval_settings: dict[str, Any]) -> IRNConfig:
    """``eval.irn`` (a dict, or ``"key=value,key=value"``) as an :class:`IRNConfig` (ConfigError
    for an unknown key, a bad value, an unknown arch, a ``pretrained`` value that names no
    registered checkpoint (``auto`` for an arch without one) and no existing file, or thresholds
    out of order)."""
    config = build_method_config(IRNConfig, irn_settings(eval_settings.get("irn")), "eval.irn")
    if config.arch not in ARCHS:
        raise ConfigError(f"eval.irn: unknown arch {config.arch!r}.{suggest(config.arch, ARCHS)} Valid: {', '.join(ARCHS)}.")
    _check_pretrained(config)
    if not 0 <= config.bg_threshold <= config.fg_threshold <= 1:
        raise ConfigError(f"eval.irn: need 0 <= bg_threshold <= fg_threshold <= 1; got {config.bg_threshold} and {config.fg_threshold}.")
    return config


def _check_pretrained(config: IRNConfig) -> None:
    """IRN's ``pretrained``: random init, a registry value (``auto`` = ImageNet ResNet-50 for
    ``arch = "resnet50"``; fetched before the first trial) or an existing local file."""
    if str(config.pretrained).strip().lower() in weights.AUTO and config.arch not in weights.ARCH_WEIGHTS:
        raise ConfigError(f"IRN settings (eval.irn, or <method>.irn): pretrained={config.pretrained!r} needs an architecture with "
                          f"ImageNet weights, and arch={config.arch!r} (IRN's small synthetic ResNet) has none. Set arch=resnet50 "
                          f"with it (e.g. `adcam.irn=arch=resnet50,pretrained=auto`: torchvision's ImageNet ResNet-50), "
                          f"or pretrained=none for random init.")
    try:
        source = weights.source_for(config.pretrained, config.arch)
    except weights.WeightsError as exc:
        raise ConfigError(f"eval.irn: {exc}") from None
    if source is None and not weights.is_random_init(config.pretrained) and not Path(str(config.pretrained)).expanduser().is_file():
        raise ConfigError(f"eval.irn: pretrained checkpoint {config.pretrained!r} does not exist; pass \"auto\" (ImageNet "
                          f"ResNet-50 from the weights registry, arch=resnet50), a registered name (`wsss-bench weights list`) "
                          f"or the path of a local ImageNet ResNet-50 state dict (torchvision or timm key names).")


def check_refine(eval_settings: dict[str, Any]) -> None:
    """Validate ``eval.refine`` / ``eval.irn`` before any trial starts."""
    if refine_name(eval_settings) == "irn":
        irn_config(eval_settings)


class IRNRefiner:
    """IRN trained on one trial's CAMs; ``pseudo_masks`` has the Method signature."""

    def __init__(self, runner: Any, split: Any, config: IRNConfig) -> None:
        self.runner, self.split, self.config = runner, split, config
        self.device = runner.device
        self.ctx = dataclasses.replace(runner._context("pseudo_masks"), workdir=runner.dir.workdir("irn"))
        self.model = build_model(config, self.ctx.stream_seed(17))
        path = runner.dir.checkpoint_path(CHECKPOINT)
        if path.exists():  # trained in an earlier, interrupted run of this stage
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            elapsed = float(state["time_irn_s"])
        else:
            start = time.monotonic()
            labels_dir = self._write_labels()
            train_irn(self.model, MaskFolderSource(split, labels_dir), config, self.ctx)
            elapsed = time.monotonic() - start
            runner.dir.save_checkpoint(CHECKPOINT, {"model": self.model.state_dict(), "time_irn_s": elapsed})
        self.model.to(self.device).eval()
        self.metrics = {"time_irn_s": elapsed, "params_irn": float(sum(p.numel() for p in self.model.parameters()))}

    def _write_labels(self):
        """Confident-region label PNGs for the split (those already written are kept; each is
        written atomically, so a killed run resumes with whole files). With ``label_crf`` the
        dense CRFs run ``eval.crf_workers`` at a time (:func:`methods.common.crf.map_forked`):
        two CRFs per image over a VOC train_aug set are hours on one core."""
        out = self.ctx.workdir / "labels"
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        todo = [index for index, sample_id in enumerate(self.split.ids) if not (out / f"{sample_id}.png").exists()]
        workers = int(self.runner.eval.get("crf_workers") or 1) if cfg.label_crf else 1
        for start in range(0, len(todo), LABEL_CHUNK * workers):
            samples = [self.split[index] for index in todo[start:start + LABEL_CHUNK * workers]]
            cams = [self._cams(sample) for sample in samples]
            if cfg.label_crf:
                jobs = [(sample.image, c.numpy(), cfg.fg_threshold, cfg.bg_threshold) for sample, c in zip(samples, cams)]
                labels = map_forked(_crf_label_job, jobs, workers)
            else:
                labels = [confident_labels(c, cfg.fg_threshold, cfg.bg_threshold).numpy() for c in cams]
            for sample, label in zip(samples, labels):
                save_label_png(label, out / f"{sample.id}.png")
        return out

    def _cams(self, sample) -> torch.Tensor:
        """(C, H, W) float CAMs of one training sample: the stored ones, else the method's."""
        cams = self.runner._load_cams(sample)
        if cams is None:
            images, labels = stack_samples([sample])
            with torch.no_grad():
                cams = self.runner.method.cams(images.to(self.device), labels.to(self.device))[0].float().cpu()
        return cams

    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B, C, H, W), (B, C) -> (B, H, W) int64 in {0..C}."""
        return irn_masks(self.model, images, cams.float(), labels, self.config)


def pseudo_mask_refiner(runner: Any, split: Any) -> IRNRefiner | None:
    """What replaces ``method.pseudo_masks`` for this trial: None (``eval.refine = "none"``)
    or a trained :class:`IRNRefiner` (trains it, or loads ``checkpoints/irn.pt``)."""
    if refine_name(runner.eval) == "none":
        return None
    return IRNRefiner(runner, split, irn_config(runner.eval))


__all__ = ["REFINERS", "check_refine", "irn_config", "irn_settings", "merge_irn", "pseudo_mask_refiner", "refine_name"]
