"""PAR speed: the fast implementation against the straightforward formulation (not a test).

Same inputs for both: B = 2 images 3 x 256 x 256 in [0, 1], 21-class masks at 64 x 64
(``--mask-size``) that PAR first resizes up to the images (bilinear, align_corners=True, as the
authors' code) and refines at image resolution (output 2 x 21 x 256 x 256), the paper's
dilations (1, 2, 4, 8, 12, 24) (48 neighbours), w1 = 0.3, w2 = 0.01, 10 iterations.

* baseline: :func:`methods.afa.par.reference_par`, the straightforward version: masks resized
  up to the images, the kernel computed once from conv-gathered neighbours, then per
  iteration replicate-pad per dilation, gather the 48 neighbours with a fixed one-hot
  dilated 3x3 convolution, stack them into a (B, K, 48, H, W) tensor, multiply by the kernel
  and sum (what the authors' code does).
* ours: :class:`methods.afa.par.PAR` (``impl="sparse"``, the CPU default: kernel by one shifted-
  slice gather, then a CSR matrix product per iteration), and ``impl="slice"`` (n shifted
  views of the padded masks accumulated per iteration) for comparison.

Reports the median wall time in ms over ``--reps`` runs after one warm-up, the speed-up over
the baseline and the max absolute difference to it. Runs on CPU, and on CUDA when available.

``--lreg`` also times the optional L_reg (:func:`methods.afa.losses.dense_energy_loss`,
forward + backward, as in a training step: the head's stride-4 logits resized to the crop,
softmax, the loss) at ``--lreg-batch`` x ``--lreg-crop`` (default VOC training size: B = 4,
21 classes, 512 x 512 crops) for the given ``--lreg-sides`` (the grid's largest side: half
the crop at most; N = side^2 pixels, an N x N kernel per image).

    python benchmarks/perf_par.py
    python benchmarks/perf_par.py --threads 1 --reps 5 --json par.json
    python benchmarks/perf_par.py --lreg --lreg-sides 48 64 96
    python benchmarks/perf_par.py --lreg-only --lreg-batch 8 --lreg-crop 96 --lreg-classes 6 --lreg-sides 48
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

from methods.afa.losses import dense_energy_loss, lreg_grid  # noqa: E402
from methods.afa.par import DEFAULT_DILATIONS, PAR, reference_par  # noqa: E402


def timed(fn: Callable[[], torch.Tensor], reps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median wall time (ms) of ``fn`` over ``reps`` runs after one warm-up run."""
    out = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def bench(
    device: torch.device, batch: int, size: int, mask_size: int, classes: int, iters: int, reps: int, baseline_reps: int
) -> dict:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    masks = torch.rand(batch, classes, mask_size, mask_size, generator=gen).to(device)
    with torch.no_grad():
        base_ms, base = timed(lambda: reference_par(images, masks, DEFAULT_DILATIONS, iters, 0.3, 0.01), baseline_reps, device)
        assert tuple(base.shape) == (batch, classes, size, size)  # image resolution
        row = {
            "device": str(device),
            "shape": f"B={batch} 3x{size}x{size} K={classes} masks {mask_size}x{mask_size} upsampled, iters={iters}",
            "baseline_ms": round(base_ms, 1),
        }
        for impl in ("sparse", "slice"):
            par = PAR(DEFAULT_DILATIONS, iters, 0.3, 0.01, impl=impl).to(device)
            ms, out = timed(lambda: par(images, masks), reps, device)
            row[f"{impl}_ms"] = round(ms, 1)
            row[f"{impl}_speedup"] = round(base_ms / ms, 1)
            row[f"{impl}_max_abs_diff"] = float((out - base).abs().max())
    return row


def bench_lreg(device: torch.device, side: int, reps: int, batch: int = 4, classes: int = 21, size: int = 512) -> dict:
    """Forward + backward of L_reg as in a training step: stride-4 logits resized to the
    crop, softmax, the loss gated by a target with a quarter of the pixels 255."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(device)
    # the segmentation head's logits are at stride 4
    logits = torch.randn(batch, classes, size // 4, size // 4, generator=gen).to(device).requires_grad_(True)
    valid = torch.ones(batch, size, size, dtype=torch.bool, device=device)
    target = torch.randint(0, classes, (batch, size, size), generator=gen).to(device)
    target[:, : size // 4] = 255

    def step() -> torch.Tensor:
        probs = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False).softmax(1)
        loss = dense_energy_loss(images, probs, valid, target, max_side=side)
        loss.backward()
        return loss

    ms, _ = timed(step, reps, device)
    grid = lreg_grid((size, size), side)
    return {
        "device": str(device), "lreg_grid": f"{grid[0]}x{grid[1]}", "pixels": grid[0] * grid[1],
        "kernel_MiB_per_image": round((grid[0] * grid[1]) ** 2 * 4 / 2**20, 1), "lreg_fwd_bwd_ms": round(ms, 1),
        "shape": f"B={batch} K={classes} crop {size}x{size}, logits {size // 4}x{size // 4}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mask-size", type=int, default=64, help="masks' side (upsampled to --size by PAR)")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline-reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--lreg", action="store_true", help="also time L_reg (dense CRF energy loss)")
    parser.add_argument("--lreg-only", action="store_true", help="time L_reg only (no PAR)")
    parser.add_argument("--lreg-sides", type=int, nargs="+", default=[48, 64])
    parser.add_argument("--lreg-batch", type=int, default=4)
    parser.add_argument("--lreg-crop", type=int, default=512)
    parser.add_argument("--lreg-classes", type=int, default=21)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for device in devices if not args.lreg_only else []:
        row = bench(device, args.batch, args.size, args.mask_size, args.classes, args.iters, args.reps, args.baseline_reps)
        row.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
        if device.type == "cuda":
            row["gpu"] = torch.cuda.get_device_name(device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if rows:
        print_table(rows)
    if args.lreg or args.lreg_only:
        print()
        for device in devices:
            for side in args.lreg_sides:
                row = bench_lreg(device, side, max(1, args.reps // 2), args.lreg_batch, args.lreg_classes, args.lreg_crop)
                row.update(threads=torch.get_num_threads())
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_table(rows: list[dict]) -> None:
    print()
    print(f"{'device':8} {'baseline ms':>12} {'sparse ms':>10} {'x':>6} {'slice ms':>9} {'x':>6} {'max |diff|':>11}")
    for r in rows:
        diff = max(r["sparse_max_abs_diff"], r["slice_max_abs_diff"])
        print(
            f"{r['device']:8} {r['baseline_ms']:12.1f} {r['sparse_ms']:10.1f} {r['sparse_speedup']:6.1f}"
            f" {r['slice_ms']:9.1f} {r['slice_speedup']:6.1f} {diff:11.2e}"
        )


if __name__ == "__main__":
    main()
