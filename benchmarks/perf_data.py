"""Training-loader throughput per method recipe (not a test).

For each training loop of the paper recipes in ``benchmarks/voc.toml`` (crop sizes, rescale
ranges, augmentation), reads the real VOC files of ``../shared/data/voc-mini`` (train split,
JPEG decoding included; its GT masks stand in for pseudo masks where a loop reads masks)
through :func:`methods.common.data.training_batches` with 0, 1 and 2 DataLoader workers,
and prints images per second and the loading hours each paper recipe would need at that rate
(samples drawn = epochs x 10,582 train_aug images, or iterations x batch). Beside the 0-worker
row, where one sample's time goes: ``read ms`` (decoding the files, and checking the mask and
deriving labels where the loop reads one) and ``augment ms`` (the recipe's augmentation on
already-decoded samples); their sum is the floor of a one-core loader.

    python benchmarks/perf_data.py
    python benchmarks/perf_data.py --workers 0 2 --images 200 --json data.json

On a machine with fewer cores than workers + 1 the worker rows measure contention, not the
loader; the core count is printed with the figures.

voc-mini has no ``Annotations/`` and no ``cls_labels.npy``, so its image-level labels come from
the GT masks, and every loop decodes a mask per sample. Full VOC has the XML annotations, so
the loops that need no mask (the CAM stages, AFA) read none there (``Split.without_masks``).
``--label-file`` adds that case: the mask-free loops again, on a temporary view of the same
files with a ``cls_labels.npy`` derived from the masks (rows marked ``labels: file``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.datasets import create_dataset  # noqa: E402
from methods.common.data import AugmentedSamples, sample_generator, training_batches  # noqa: E402
from methods.common.training import CropAugment, windowed_resize_is_exact  # noqa: E402
from methods.weaktr.augment import SegAugment, TimmCamAugment  # noqa: E402

TRAIN_AUG = 10_582


def recipes(suite: dict) -> dict[str, tuple[object, int, bool, int]]:
    """name -> (augment, batch size, reads masks, samples the paper recipe draws)."""
    m = suite["methods"]
    w, a, d, c = m["weaktr"], m["afa"], m["adcam"], m["cam"]
    return {
        "weaktr cam (timm 224)": (TimmCamAugment(w["cam_crop"]), w["cam_batch_size"], False, w["cam_epochs"] * TRAIN_AUG),
        "weaktr retrain (480, cat_max_ratio)": (
            SegAugment(w["seg_crop"], w["seg_base_size"], tuple(w["seg_scale_range"]), w["seg_cat_max_ratio"], True),
            w["seg_batch_size"], True, w["seg_epochs"] * TRAIN_AUG),
        "afa (512)": (CropAugment(a["crop"], tuple(a["scale_range"])), a["batch_size"], False, a["iterations"] * a["batch_size"]),
        "adcam cam (384)": (CropAugment(d["crop"], tuple(d["scale_range"])), d["batch_size"], False, d["epochs"] * TRAIN_AUG),
        "adcam deeplab (321)": (CropAugment(d["seg_crop"], tuple(d["seg_scale_range"])), d["seg_batch_size"], True,
                                d["seg_iterations"] * d["seg_batch_size"]),
        "cam (224)": (CropAugment(c["crop"], tuple(c["scale_range"])), c["batch_size"], False, c["epochs"] * TRAIN_AUG),
    }


def images_per_second(split, augment, batch: int, masks: bool, workers: int, images: int) -> float:
    """Steady-state img/s of the loop's loader. With N workers the first batches arrive side
    by side (each worker builds one), so timing from the first batch over a few batches
    overstates the rate; the first 2 x max(1, N) batches (start-up included) are not timed,
    and at least 4 batches per worker (and ``images``) are."""
    warm = 2 * max(1, workers)
    timed = max(2, images // batch, 4 * max(1, workers))
    loader = training_batches(split, batch, augment, seed=0, total_steps=warm + timed, with_masks=masks, num_workers=workers)
    start = 0.0
    for step, _ in loader:
        if step == warm - 1:
            start = time.perf_counter()
    return timed * batch / (time.perf_counter() - start)


def time_split(source, augment, masks: bool, images: int) -> tuple[float, float]:
    """(ms to read one sample, ms to augment one decoded sample), over the first ``images``."""
    source = AugmentedSamples(source, augment, 0, masks).source  # the reader the loader uses
    n = min(images, len(source))
    start = time.perf_counter()
    samples = [source[i] for i in range(n)]
    read = (time.perf_counter() - start) / n
    inputs = [(torch.from_numpy(s.image.copy()).permute(2, 0, 1),
               torch.from_numpy(s.mask.copy()) if masks and s.mask is not None else None) for s in samples]
    start = time.perf_counter()
    for i, (image, mask) in enumerate(inputs):
        augment(image, mask, sample_generator(0, 0, i))
    return 1e3 * read, 1e3 * (time.perf_counter() - start) / n


def labelled_view(data: Path, out: Path, split) -> Path:
    """A VOC2012 folder in ``out`` whose JPEGImages / SegmentationClass / ImageSets link to
    ``data``'s, plus a ``cls_labels.npy`` of ``split``'s image-level labels as the reader
    derives them from the masks (as full VOC's XML annotations give them)."""
    import numpy as np

    view = out / "VOC2012"
    view.mkdir(parents=True, exist_ok=True)
    for name in ("JPEGImages", "SegmentationClass", "ImageSets"):
        (view / name).symlink_to(data / name)
    np.save(view / "cls_labels.npy", {sample_id: split[i].labels for i, sample_id in enumerate(split.ids)})
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "voc-mini" / "VOC2012")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=256, help="images timed per loader and worker count, at least (and at least 4 batches per worker); "
                        "read / augment ms average over this many samples of the split")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--label-file", action="store_true",
                        help="also time the mask-free loops with labels from a cls_labels.npy (full VOC's case)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"perf_data: {args.data} not found (the voc-mini files); pass --data VOC2012-folder")
    torch.set_num_threads(1)  # the training thread's share; workers get one thread each
    dataset = create_dataset("voc", args.data, Path(os.environ.get("TMPDIR", "/tmp")) / "wsss-perf-cache", {})
    split = dataset.split("train")
    suite = tomllib.loads((ROOT / "benchmarks" / "voc.toml").read_text())
    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {len(split)} voc-mini train images")
    if not windowed_resize_is_exact():
        print("torch's uint8 resize is not separable here: crops resize the whole image (slower, same pixels)")
    print(f"{'loop':44s} {'workers':>7s} {'img/s':>8s} {'read ms':>8s} {'augment ms':>10s} {'paper recipe: samples':>22s} {'loading h':>10s}")
    cases = [("masks", split)]
    if args.label_file:
        scratch = tempfile.TemporaryDirectory(prefix="wsss-perf-labels-")
        view = labelled_view(args.data, Path(scratch.name), split)
        cases.append(("file", create_dataset("voc", view, Path(scratch.name) / "cache", {}).split("train")))
    for labels, source in cases:
        for name, (augment, batch, masks, samples) in recipes(suite).items():
            if labels == "file" and masks:
                continue  # reads masks either way
            loop = name if labels == "masks" else f"{name} [labels: file]"
            read_ms, augment_ms = time_split(source, augment, masks, args.images)
            for workers in args.workers:
                rate = images_per_second(source, augment, batch, masks, workers, args.images)
                hours = samples / rate / 3600
                parts = (read_ms, augment_ms) if workers == 0 else (None, None)
                rows.append({"loop": loop, "workers": workers, "img_per_s": round(rate, 1), "samples": samples,
                             "loading_hours": round(hours, 2), "read_ms": parts[0], "augment_ms": parts[1]})
                shown = f"{read_ms:8.2f} {augment_ms:10.2f}" if workers == 0 else f"{'':8s} {'':10s}"
                print(f"{loop:44s} {workers:7d} {rate:8.1f} {shown} {samples:22,d} {hours:10.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
