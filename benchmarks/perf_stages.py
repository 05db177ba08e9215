"""Inference-stage throughput per method (not a test): the stages the training benchmarks leave
out, timed through the five-stage interface with each suite's recipe.

For each method of ``--methods`` with its ``[methods.<name>]`` table of ``--suite`` (networks
at random init: every ``pretrained`` / ``*_pretrained`` key is set to ``"none"``, which does not
change the speed), on the first ``--images`` images of a split, one image at a time as the
harness runs variable-size data (train-side rows read the suite's CAM-eval split, whose images
stand for train_aug's):

* ``cams``: ``Method.cams(image, labels)`` on train images (stage 2 on the CAM-eval images,
  stage 3 on the others: every train_aug image's CAMs are computed once);
* ``pseudo masks``: ``Method.pseudo_masks(image, cams, labels)`` given the CAMs (stage 3);
* ``segment ss`` / ``segment ms``: ``Method.segment(image, multiscale=False / True)`` on val
  images (stage 5; the dense CRF on the CPU is not included).

It prints ms per image and, for a VOC suite, the hours each would take over VOC (10,582
train_aug images for CAMs and pseudo masks, 1,449 val images for stage 5; "-" for other
suites, whose images are not VOC-sized). The first image of each row is a warm-up.
The training stages have their own benchmarks (``perf_weaktr.py``, ``perf_afa.py``,
``perf_adcam.py``).

    python benchmarks/perf_stages.py --suite synthetic --methods weaktr,afa,adcam --images 4
    python benchmarks/perf_stages.py --suite voc --methods cam,weaktr,afa,adcam --threads 2 --images 3
    python benchmarks/perf_stages.py --suite voc --device cuda --images 20 [--bf16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.config import build_method_config, load_suite  # noqa: E402
from harness.datasets import create_dataset  # noqa: E402
from harness.sweep import PER_METHOD_EVAL  # noqa: E402
from methods import load_all  # noqa: E402
from methods.base import Method, to_tensor_image  # noqa: E402

VOC_MINI = ROOT.parent / "shared" / "data" / "voc-mini" / "VOC2012"
VOC_IMAGES = {"train": 10_582, "val": 1_449}


def random_init(params: dict[str, Any]) -> dict[str, Any]:
    """The method table's hyper-parameters (not the harness's per-method eval keys) with every
    pretrained source set to "none" (no download, same speed)."""
    return {k: "none" if k == "pretrained" or k.endswith("_pretrained") else v
            for k, v in params.items() if k not in PER_METHOD_EVAL}


def build(name: str, params: dict[str, Any], dataset, device: torch.device, bf16: bool) -> Method:
    cls = load_all()[name]
    values = random_init(params) | ({"bf16": True} if bf16 else {})
    return cls(build_method_config(cls.Config, values, f"method {name}"), dataset.info, device)


Inputs = Callable[[torch.Tensor, torch.Tensor], tuple]


def time_per_image(samples, inputs: Inputs, run: Callable[..., Any], device: torch.device) -> float:
    """ms per image of ``run(*inputs(image (1, 3, H, W) in [0, 1], labels (1, C)))`` over
    ``samples`` (``inputs`` untimed), the first one untimed."""
    def timed(sample) -> float:
        image = to_tensor_image(sample.image)[None].to(device)
        labels = torch.as_tensor(sample.labels, dtype=torch.float32)[None].to(device)
        with torch.no_grad():
            args = inputs(image, labels)
            _sync(device)
            start = time.perf_counter()
            run(*args)
            _sync(device)
        return time.perf_counter() - start

    timed(samples[0])
    return 1e3 * sum(timed(s) for s in samples[1:]) / max(1, len(samples) - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stages(method: Method) -> dict[str, tuple[str, Inputs, Callable[..., Any]]]:
    """row -> (split it reads, untimed inputs of one image, the timed call)."""
    as_is: Inputs = lambda x, y: (x, y)  # noqa: E731
    with_cams: Inputs = lambda x, y: (x, method.cams(x, y), y)  # noqa: E731
    return {
        "cams": ("train", as_is, method.cams),
        "pseudo masks": ("train", with_cams, method.pseudo_masks),
        "segment ss": ("val", as_is, lambda x, y: method.segment(x, multiscale=False)),
        "segment ms": ("val", as_is, lambda x, y: method.segment(x, multiscale=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="synthetic", help="a suite name of benchmarks/ (voc reads --data)")
    parser.add_argument("--methods", default="weaktr,afa,adcam")
    parser.add_argument("--data", type=Path, default=VOC_MINI, help="VOC2012 folder for a voc suite")
    parser.add_argument("--images", type=int, default=4, help="images per stage (the first is a warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--bf16", action="store_true", help="set every method's bf16 option")
    args = parser.parse_args()
    if args.images < 2:
        parser.error("--images must be at least 2: the first image of each row is a warm-up")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    suite = load_suite(args.suite)
    if suite.dataset == "voc" and not args.data.is_dir():
        sys.exit(f"perf_stages: {args.data} not found (the voc-mini files); pass --data VOC2012-folder")
    voc = suite.dataset == "voc"  # projected VOC hours only from VOC-sized images
    with tempfile.TemporaryDirectory(prefix="wsss-perf-stages-") as scratch:
        root = args.data if suite.dataset == "voc" else None
        dataset = create_dataset(suite.dataset, root, Path(scratch), suite.dataset_options)
        # The CAM-eval split (VOC: train, which voc-mini has) stands for train_aug's images.
        splits = {"train": dataset.split(suite.splits.get("cam_eval", "train")), "val": dataset.split(suite.splits.get("val", "val"))}
        print(f"{suite.name} suite, {device}, {args.threads} thread(s), {'bf16' if args.bf16 else 'fp32'}, "
              f"torch {torch.__version__}, {args.images} images a stage (1 warm-up), random init")
        print(f"{'method':8s} {'stage':14s} {'ms/image':>9s} {'VOC images':>10s} {'hours':>7s}")
        for name in args.methods.split(","):
            method = build(name, suite.method_params.get(name, {}), dataset, device, args.bf16)
            for stage, (role, inputs, run) in stages(method).items():
                split = splits[role]
                samples = [split[i] for i in range(min(args.images, len(split)))]
                ms = time_per_image(samples, inputs, run, device)
                n = VOC_IMAGES[role]
                hours = f"{ms * n / 3.6e6:7.2f}" if voc else f"{'-':>7s}"
                print(f"{name:8s} {stage:14s} {ms:9.1f} {n:10,d} {hours}")
            refine = suite.method_params.get(name, {}).get("refine", "none")
            if refine != "none":
                print(f"{'':8s} (the suite makes {name}'s pseudo masks with refine = {refine!r}, harness/refine.py: not timed here)")


if __name__ == "__main__":
    main()
