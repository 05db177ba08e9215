"""The trial runner: executes a method's five stages in order, checkpointing after each so an
interrupted trial resumes at the last finished stage, and evaluating each stage's output.

Nothing here depends on which method runs: the method is looked up in the registry and
driven only through :class:`methods.base.Method`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from harness.common_seg import CHECKPOINT as COMMON_SEG_CHECKPOINT
from harness.common_seg import CommonSegConfig, CommonSegmenter, common_seg_config
from harness.config import TrialSpec, build_method_config
from harness.datasets import create_dataset
from harness.datasets.base import Dataset, MaskFolderSource, Split
from harness.errors import ConfigError, DataError
from harness.evaluation import SWEEP_LIMIT, CamThresholdSweep, SegmentationMetric, default_thresholds, extend_until_interior
from harness.pretrain import install as install_pretraining
from harness.profiling import count_macs, count_params, measure
from harness.trial import STAGES, StageRecord, TrialDir
from harness.visualize import heatmap, save_label_png, save_rgb_png
from methods import load_all
from methods.common.crf import dense_crf_many
from methods.base import IGNORE_INDEX, Method, NoPrediction, Sample, StageContext, stack_samples, to_uint8_image

# (stage, done, total) progress callback; done == total == 0 announces a stage start.
ProgressFn = Callable[[str, int, int], None]
MetricFn = Callable[[str, float, int], None]


def seed_everything(seed: int) -> None:
    """Seed every generator a method might touch and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={value!r}: expected a number >= 0.") from None
    if number < 0:
        raise ConfigError(f"Environment variable {name}={value!r}: expected a number >= 0.")
    return number


def loader_workers(device: torch.device) -> int:
    """DataLoader worker processes per training loop: ``$WSSS_LOADER_WORKERS``, else on CUDA
    the trial's threads (``--cpus-per-trial``) minus one for the training thread (at least
    1), else 0 (CPU training keeps every core busy itself)."""
    default = max(1, torch.get_num_threads() - 1) if device.type == "cuda" else 0
    return int(_env_number("WSSS_LOADER_WORKERS", default))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_method(spec: TrialSpec, dataset: Dataset, device: torch.device) -> Method:
    cls = load_all()[spec.method]
    config = build_method_config(cls.Config, spec.method_config, f"method {spec.method}")
    return cls(config, dataset.info, device)


@dataclass
class TrialResult:
    spec: TrialSpec
    records: dict[str, StageRecord]
    resumed_from: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def flat_metrics(records: dict[str, StageRecord]) -> dict[str, float]:
    """All stage metrics plus cost, under the documented names (see harness/tracking.py)."""
    out: dict[str, float] = {}
    for stage, record in records.items():
        out.update(record.metrics)
        out[f"time_{stage}_s"] = record.wall_s
        out[f"cpu_{stage}_s"] = record.cpu_s
        out[f"peak_rss_{stage}_mb"] = record.peak_rss_mb
        if record.peak_gpu_mb:
            out[f"peak_gpu_{stage}_mb"] = record.peak_gpu_mb
    out["time_total_s"] = sum(r.wall_s for r in records.values())
    return out


def _ids(target, batch: Sequence[Sample]) -> dict[str, list[str]]:
    """``ids=`` for a method that asks for sample ids (``Method.wants_ids``), else nothing."""
    return {"ids": [s.id for s in batch]} if getattr(target, "wants_ids", False) else {}


def _size_groups(split: Split, indices: Sequence[int], batch_size: int) -> Iterator[list[Sample]]:
    """Batches of consecutive samples with the same image size (variable-size data -> B=1)."""
    batch: list[Sample] = []
    for index in indices:
        sample = split[index]
        if batch and (len(batch) == batch_size or batch[0].image.shape != sample.image.shape):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def _gt_masks(batch: Sequence[Sample], what: str, split: Split) -> torch.Tensor:
    """The batch's ground-truth masks as a ``(B, H, W)`` int64 tensor for scoring ``what``.

    DataError naming the image and split when one has no mask: scoring must not silently
    skip images (a val set that lost its masks would otherwise score nothing)."""
    for sample in batch:
        if sample.mask is None:
            raise DataError(
                f"Image {sample.id} of split '{split.name}' has no ground-truth mask, but {what} mIoU is scored on "
                f"it. Every image of the {what} role must have a mask; check the dataset's masks or choose another "
                "split in the suite's [splits] table."
            )
    return torch.from_numpy(np.stack([s.mask for s in batch]).astype(np.int64))


def _require_labelled(num_pixels: int, what: str, role: str, split: Split, num_images: int) -> None:
    """DataError when nothing was scored: ground truth with no labelled pixel (every pixel
    255) gives no mIoU at all, and a trial must not finish with a nan and threshold 0.00.

    Policy (README "Metrics"): stop the trial with this error naming the split; it is
    recorded as failed, and its finished stages are kept for a resume after the fix."""
    if num_pixels == 0:
        raise DataError(
            f"{what} mIoU cannot be computed: the {num_images} image(s) of split '{split.name}' ({role} role) "
            f"have no labelled ground-truth pixel (every mask pixel is {IGNORE_INDEX} = ignore). Fix the masks or "
            "choose another split in the suite's [splits] table."
        )


class TrialRunner:
    """Runs one trial from its last finished stage to the end."""

    def __init__(
        self,
        spec: TrialSpec,
        results_dir: Path,
        device: str = "cpu",
        progress: ProgressFn | None = None,
        log_metric: MetricFn | None = None,
        cache_dir: Path | None = None,
        stop_after: str | None = None,
        flush_metrics: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.dir = TrialDir(results_dir, spec)
        self.device = resolve_device(device)
        self.progress = progress or (lambda stage, done, total: None)
        self.log_metric = log_metric or (lambda name, value, step: None)
        # Called before a stage is recorded as done: a buffered metric logger writes the
        # stage's step metrics then, so a finished stage never lacks its loss curves.
        self.flush_metrics = flush_metrics or (lambda: None)
        self.cache_dir = cache_dir or results_dir / "cache"
        self.stop_after = stop_after  # testing / debugging: stop cleanly after this stage
        self.eval = spec.eval
        self._dataset: Dataset | None = None
        self._method: Method | None = None

    # -- lazily built pieces ---------------------------------------------------------------
    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            root = Path(self.spec.data_root) if self.spec.data_root else None
            self._dataset = create_dataset(self.spec.dataset, root, self.cache_dir, dict(self.spec.dataset_options))
        return self._dataset

    def split(self, role: str) -> Split:
        name = self.spec.splits.get(role) or self.dataset.default_splits()[role]
        return self.dataset.split(name)

    @property
    def method(self) -> Method:
        if self._method is None:
            seed_everything(self.spec.seed)
            install_pretraining(self.cache_dir)  # pretrained="synthetic" -> <cache>/pretrained
            method = build_method(self.spec, self.dataset, self.device)
            checkpoint = self.dir.latest_checkpoint()
            if checkpoint is not None:
                method.load_state_dict(torch.load(checkpoint, map_location=self.device, weights_only=True))
            self._method = method
        return self._method

    def gallery_ids(self, split: Split) -> set[str]:
        return set(sorted(split.ids)[: self.eval["gallery_size"]])

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> TrialResult:
        resumed_from = self.dir.next_stage() if self.dir.records() else None
        for index, stage in enumerate(STAGES):
            if stage in self.dir.records():
                continue
            self.progress(stage, 0, 0)
            # Seeding per stage makes a resumed stage identical to an uninterrupted one.
            seed_everything(self.spec.seed * 100 + index)
            with measure(self.device) as cost:
                status, metrics, curves = getattr(self, f"_stage_{stage}")()
            record = StageRecord(stage, status, cost.wall_s, cost.cpu_s, cost.peak_rss_mb, cost.peak_gpu_mb, metrics, curves)
            self.flush_metrics()
            self.dir.mark_done(record)
            if self.stop_after == stage:
                break
        records = self.dir.records()
        return TrialResult(self.spec, records, resumed_from, flat_metrics(records))

    def _context(self, stage: str) -> StageContext:
        def report(done: int, total: int) -> None:
            self.progress(stage, done, total)

        return StageContext(
            self.device, self.spec.seed, self.dir.workdir(stage), self.log_metric, report,
            num_workers=loader_workers(self.device),
            checkpoint_every_steps=int(_env_number("WSSS_CHECKPOINT_STEPS", 0)),
            checkpoint_every_s=_env_number("WSSS_CHECKPOINT_S", 600.0),
            score_cams=self._score_cams,
        )

    def _score_cams(self) -> float:
        """``StageContext.score_cams``: CAM mIoU (%) of the method's current ``cams()`` on the
        cam-eval split at the best threshold of the eval sweep (an oracle: pixel labels)."""
        ev, split = self.eval, self.split("cam_eval")
        grid = default_thresholds(ev["threshold_start"], SWEEP_LIMIT, ev["threshold_step"])  # as the cams stage
        sweep = CamThresholdSweep(num_classes=self.dataset.info.num_classes, thresholds=grid, convention=ev["convention"])
        for batch in _size_groups(split, self._limited(split, ev["max_cam_eval"]), ev["batch_size"]):
            images, labels = stack_samples(batch)
            with torch.no_grad():
                cams = self.method.cams(images.to(self.device), labels.to(self.device), **_ids(self.method, batch)).float().cpu()
            sweep.update(cams, labels, _gt_masks(batch, "cam_eval", split))
        return extend_until_interior(sweep.compute(), ev["threshold_stop"]).best_miou * 100

    # -- stages ----------------------------------------------------------------------------
    def _stage_train_cam(self):
        method = self.method
        method.train_cam(self.split("train"), self._context("train_cam"))
        self.dir.save_checkpoint("train_cam", method.state_dict())
        return "done", self._cost_metrics(method), {}

    def _cost_metrics(self, method: Method) -> dict[str, float]:
        out: dict[str, float] = {}
        inputs = method.macs_inputs()
        params_total, macs_total = 0, 0
        for name, net in method.networks().items():
            params = count_params(net)
            out[f"params_{name}"] = float(params)
            params_total += params
            if name in inputs:
                args = tuple(a.to(self.device) if torch.is_tensor(a) else a for a in inputs[name])
                macs = count_macs(net, args)
                out[f"gmacs_{name}"] = macs / 1e9
                macs_total += macs
        out["params_total"] = float(params_total)
        out["gmacs_total"] = macs_total / 1e9
        return out

    def _limited(self, split: Split, limit: int) -> list[int]:
        indices = sorted(range(len(split)), key=lambda i: split.ids[i])
        return indices[:limit] if limit else indices

    def _stage_cams(self):
        split = self.split("cam_eval")
        info = self.dataset.info
        ev = self.eval
        conv = ev["convention"]
        # The grid runs to SWEEP_LIMIT so the range can widen past threshold_stop without a
        # second pass over the CAMs (extend_until_interior picks the range actually used).
        grid = default_thresholds(ev["threshold_start"], SWEEP_LIMIT, ev["threshold_step"])
        sweep = CamThresholdSweep(num_classes=info.num_classes, thresholds=grid, convention=conv)
        declared = self.method.cam_threshold()  # the method's own threshold, else the suite's
        fixed_t = float(ev["fixed_threshold"] if declared is None else declared)
        if not 0.0 <= fixed_t <= 1.0:
            raise RuntimeError(f"method {self.spec.method!r}: cam_threshold() returned {fixed_t}, expected a value in [0, 1]")
        fixed_sweep = CamThresholdSweep(num_classes=info.num_classes, thresholds=[fixed_t], convention=conv)
        gallery = self.gallery_ids(split)
        indices = self._limited(split, ev["max_cam_eval"])
        done = 0
        for batch in _size_groups(split, indices, ev["batch_size"]):
            images, labels = stack_samples(batch)
            with torch.no_grad():
                cams = self.method.cams(images.to(self.device), labels.to(self.device), **_ids(self.method, batch)).float().cpu()
            self._check_cams(cams, images, labels)
            targets = _gt_masks(batch, "cam_eval", split)
            sweep.update(cams, labels, targets)
            fixed_sweep.update(cams, labels, targets)
            for sample, cam in zip(batch, cams):
                present = np.flatnonzero(sample.labels > 0)
                np.savez_compressed(self.dir.root / "cams" / f"{sample.id}.npz", classes=present, cams=cam[present].numpy().astype(np.float16))
                if sample.id in gallery:
                    g = self.dir.root / "gallery"
                    save_rgb_png(sample.image, g / f"{sample.id}_image.png")
                    save_label_png(sample.mask, g / f"{sample.id}_gt.png")
                    save_rgb_png(heatmap(cam[present].numpy(), sample.image), g / f"{sample.id}_cam.png")
            done += len(batch)
            self.progress("cams", done, len(indices))
        full = sweep.compute()
        _require_labelled(full.num_pixels, "CAM", "cam_eval", split, len(indices))
        result = extend_until_interior(full, ev["threshold_stop"])
        fixed = fixed_sweep.compute().scores_at_best
        metrics = {
            "cam_miou": result.best_miou * 100,
            "cam_best_threshold": float(result.best_threshold),
            "cam_threshold_start": float(result.thresholds[0]),
            "cam_threshold_stop": float(result.thresholds[-1]),
            "cam_miou_fixed": fixed.miou(conv) * 100,
            "cam_fixed_threshold": fixed_t,
            "cam_miou_gt": result.scores_at_best.miou("gt") * 100,
            "cam_miou_present": result.scores_at_best.miou("present") * 100,
        }
        metrics.update(self._per_class("cam", result.scores_at_best.per_class_iou))
        curve = [[float(t), float(m) * 100] for t, m in zip(result.thresholds, result.curve)]
        return "done", metrics, {"cam_curve": curve}

    def _check_cams(self, cams: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
        B, _, H, W = images.shape
        expected = (B, self.dataset.info.num_classes, H, W)
        if tuple(cams.shape) != expected:
            raise RuntimeError(f"method {self.spec.method!r}: cams() returned shape {tuple(cams.shape)}, expected {expected}")
        if cams.min() < 0 or cams.max() > 1 + 1e-5:
            raise RuntimeError(f"method {self.spec.method!r}: cams() values outside [0, 1] ({cams.min():.3g}..{cams.max():.3g})")

    def _per_class(self, prefix: str, ious: np.ndarray) -> dict[str, float]:
        names = ("background",) + self.dataset.info.class_names
        return {f"iou_{prefix}/{name}": float(v) * 100 for name, v in zip(names, ious) if not np.isnan(v)}

    def _load_cams(self, sample: Sample) -> torch.Tensor | None:
        path = self.dir.root / "cams" / f"{sample.id}.npz"
        if not path.exists():
            return None
        data = np.load(path)
        cams = torch.zeros(self.dataset.info.num_classes, *sample.image.shape[:2])
        cams[torch.from_numpy(data["classes"])] = torch.from_numpy(data["cams"].astype(np.float32))
        return cams

    def _mask_eval_ids(self, train: Split) -> set[str]:
        """Ids whose pseudo mask is scored: the cam-eval images CAM mIoU is scored on (the
        papers score pseudo masks on VOC train, the cam-eval role, not on all of train_aug).
        DataError when none of them is in the train split (nothing could be scored)."""
        cam_split = self.split("cam_eval")
        ids = {cam_split.ids[i] for i in self._limited(cam_split, self.eval["max_cam_eval"])}
        scored = ids & set(train.ids)
        if not scored:
            raise DataError(
                f"Pseudo-mask mIoU is scored on the cam-eval images that are in the train split, but none of the "
                f"{len(ids)} cam-eval image(s) of split '{cam_split.name}' is in train split '{train.name}' "
                f"(dataset {self.spec.dataset}). Choose a cam_eval split that is a subset of the train split in the "
                "suite's [splits] table."
            )
        return scored

    def _stage_pseudo_masks(self):
        split = self.split("train")
        from harness.refine import pseudo_mask_refiner  # eval.refine: IRN replaces method.pseudo_masks

        refiner = pseudo_mask_refiner(self, split)
        C = self.dataset.info.num_classes
        scored_ids = self._mask_eval_ids(split)
        # mask_miou: a pseudo mask's 255 ("unsure") pixels count as background (dropping them
        # can only help a method that abstains); mask_miou_ignore255: AFA's evaluator, which
        # does not score them. Their share of all training masks is mask_ignored_pct.
        as_background = SegmentationMetric(num_classes=C, pred_ignore_as=0)
        dropped = SegmentationMetric(num_classes=C, drop_pred_ignore=True)
        ignored, total_px = 0, 0
        gallery = self.gallery_ids(self.split("cam_eval"))
        indices = list(range(len(split)))
        done = 0
        for batch in _size_groups(split, indices, self.eval["batch_size"]):
            images, labels = stack_samples(batch)
            images, labels = images.to(self.device), labels.to(self.device)
            stored = [self._load_cams(s) for s in batch]
            with torch.no_grad():
                if all(c is not None for c in stored):
                    cams = torch.stack(stored).to(self.device)
                else:
                    cams = self.method.cams(images, labels, **_ids(self.method, batch))
                if refiner is not None:
                    masks = refiner.pseudo_masks(images, cams, labels).cpu()
                else:
                    masks = self.method.pseudo_masks(images, cams, labels, **_ids(self.method, batch)).cpu()
            self._check_masks(masks, images)
            for sample, mask in zip(batch, masks):
                arr = mask.numpy().astype(np.uint8)
                save_label_png(arr, self.dir.root / "pseudo" / f"{sample.id}.png")
                ignored += int((mask == 255).sum())
                total_px += mask.numel()
                if sample.id in scored_ids:
                    target = _gt_masks([sample], "cam_eval", split)
                    as_background.update(mask[None], target)
                    dropped.update(mask[None], target)
                if sample.id in gallery:
                    save_label_png(arr, self.dir.root / "gallery" / f"{sample.id}_mask.png")
            done += len(batch)
            self.progress("pseudo_masks", done, len(indices))
        scores = as_background.compute()
        _require_labelled(scores.num_pixels, "pseudo-mask", "cam_eval", split, len(scored_ids))
        conv = self.eval["convention"]
        ignore255 = dropped.compute()
        metrics: dict[str, float] = {
            "mask_ignored_pct": 100.0 * ignored / max(1, total_px),
            "mask_eval_images": float(len(scored_ids)),
            "mask_miou": scores.miou(conv) * 100,
            "mask_miou_gt": scores.miou("gt") * 100,
            "mask_miou_present": scores.miou("present") * 100,
        }
        if ignore255.num_pixels:  # else every scored pixel is 255 in the pseudo masks: undefined
            metrics["mask_miou_ignore255"] = ignore255.miou(conv) * 100
            metrics["mask_miou_ignore255_gt"] = ignore255.miou("gt") * 100
            metrics["mask_miou_ignore255_present"] = ignore255.miou("present") * 100
        metrics.update(self._per_class("mask", scores.per_class_iou))
        metrics.update(refiner.metrics if refiner is not None else {})
        return "done", metrics, {}

    def _check_masks(self, masks: torch.Tensor, images: torch.Tensor) -> None:
        B, _, H, W = images.shape
        C = self.dataset.info.num_classes
        if tuple(masks.shape) != (B, H, W):
            raise RuntimeError(f"method {self.spec.method!r}: pseudo_masks() returned shape {tuple(masks.shape)}, expected {(B, H, W)}")
        bad = masks[(masks != 255) & ((masks < 0) | (masks > C))]
        if bad.numel():
            raise RuntimeError(f"method {self.spec.method!r}: pseudo_masks() returned values {sorted(set(bad.tolist()))[:5]} outside {{0..{C}, 255}}")

    def _common_seg_config(self) -> CommonSegConfig | None:
        """The suite's common recipe, or its defaults for a method without a segmenter."""
        config = common_seg_config(self.eval)
        return config if config is not None or self.method.has_segmenter else CommonSegConfig()

    def _stage_train_seg(self):
        common = self._common_seg_config()
        if common is not None:  # the harness's shared recipe instead of the method's own
            return self._train_common_seg(common)
        method = self.method
        if method.fused_segmentation:
            return "fused", {}, {}
        source = MaskFolderSource(self.split("train"), self.dir.root / "pseudo")
        method.train_seg(source, self._context("train_seg"))
        self.dir.save_checkpoint("train_seg", method.state_dict())
        return "done", {}, {}

    def _train_common_seg(self, config: CommonSegConfig):
        """train_seg with harness/common_seg.py: the method's state is left as it is."""
        segmenter = CommonSegmenter(config, self.dataset.info, self.device)
        source = MaskFolderSource(self.split("train"), self.dir.root / "pseudo")
        segmenter.train(source, self._context("train_seg"))
        self.dir.save_checkpoint(COMMON_SEG_CHECKPOINT, segmenter.state_dict())
        self._common_segmenter = segmenter
        return "common", segmenter.cost_metrics(), {}

    def _segmenter(self):
        """What the segment stage evaluates: the method, or the common segmenter."""
        config = self._common_seg_config()
        if config is None:
            return self.method
        if getattr(self, "_common_segmenter", None) is None:
            segmenter = CommonSegmenter(config, self.dataset.info, self.device)
            path = self.dir.checkpoint_path(COMMON_SEG_CHECKPOINT)
            segmenter.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
            self._common_segmenter = segmenter
        return self._common_segmenter

    def _stage_segment(self):
        split = self.split("val")
        C = self.dataset.info.num_classes
        ev = self.eval
        protocols = ["ss"] + (["ms"] if ev["multiscale"] else []) + (["ms_crf"] if ev["crf"] else [])
        metrics_by = {p: SegmentationMetric(num_classes=C) for p in protocols}
        indices = self._limited(split, ev["max_val"])
        crf_images: list[np.ndarray] = []
        crf_probs: list[np.ndarray] = []
        crf_targets: list[np.ndarray] = []
        done = 0
        for batch in _size_groups(split, indices, ev["batch_size"]):
            images, _ = stack_samples(batch)
            images = images.to(self.device)
            targets = _gt_masks(batch, "val", split)
            with torch.no_grad():
                ids = _ids(self._segmenter(), batch)
                logits = {"ss": self._segmenter().segment(images, multiscale=False, **ids).float().cpu()}
                if "ms" in protocols or "ms_crf" in protocols:
                    logits["ms"] = self._segmenter().segment(images, multiscale=True, **ids).float().cpu()
            for name in ("ss", "ms"):
                if name in metrics_by:
                    metrics_by[name].update(logits[name].argmax(1), targets)
            if "ms_crf" in protocols:
                probs = logits["ms"].softmax(1).numpy()
                for i, sample in enumerate(batch):
                    crf_images.append(sample.image)
                    crf_probs.append(probs[i])
                    crf_targets.append(sample.mask)
                if len(crf_images) >= 16:
                    self._crf_flush(metrics_by["ms_crf"], crf_images, crf_probs, crf_targets)
            done += len(batch)
            self.progress("segment", done, len(indices))
        if crf_images:
            self._crf_flush(metrics_by["ms_crf"], crf_images, crf_probs, crf_targets)
        metrics: dict[str, float] = {}
        for name, metric in metrics_by.items():
            scores = metric.compute()
            _require_labelled(scores.num_pixels, "val", "val", split, len(indices))
            metrics[f"val_miou_{name}"] = scores.miou(ev["convention"]) * 100
            metrics[f"val_miou_{name}_gt"] = scores.miou("gt") * 100
            metrics[f"val_miou_{name}_present"] = scores.miou("present") * 100
            metrics.update(self._per_class(f"val_{name}", scores.per_class_iou))
        self._gallery_predictions()
        return "done", metrics, {}

    def _crf_flush(self, metric, images, probs, targets) -> None:
        from methods.base import crf_inputs_all_classes  # the shared segmenter has no crf_inputs hook

        segmenter = self._segmenter()
        inputs = [getattr(segmenter, "crf_inputs", crf_inputs_all_classes)(p) for p in probs]
        refined_probs = dense_crf_many(images, [unary for unary, _ in inputs], segmenter.crf_params(), self.eval["crf_workers"])
        for refined, (_, classes), target in zip(refined_probs, inputs, targets):
            metric.update(torch.from_numpy(classes[refined.argmax(0)])[None], torch.from_numpy(target.astype(np.int64))[None])
        images.clear()
        probs.clear()
        targets.clear()

    def _gallery_predictions(self) -> None:
        split = self.split("cam_eval")
        wanted = self.gallery_ids(split)
        for index, sample_id in enumerate(split.ids):
            if sample_id not in wanted:
                continue
            sample = split[index]
            images, _ = stack_samples([sample])
            try:
                with torch.no_grad():
                    pred = self._segmenter().segment(images.to(self.device), multiscale=False, **_ids(self._segmenter(), [sample]))
            except NoPrediction:  # e.g. predictions read from files exist for val images only
                continue
            pred = pred.argmax(1)[0].cpu().numpy()
            save_label_png(pred.astype(np.uint8), self.dir.root / "gallery" / f"{sample.id}_pred.png")
