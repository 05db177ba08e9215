"""AD-CAM performance: co-neighbour refinement + diffusion at realistic token counts, and the
Conformer training step.

1. Refinement (Eqs. 6-7: S = sqrt(A) sqrt(A)^T, TOP-k, product, row norm) + T steps of
   diffusion (Eq. 8) for N = 576 (384 px / 16), 1024 (512 px) and 2304 (768 px) tokens,
   C = 20 classes, k = 50, T = 2, batch 1: median wall time and peak memory. CPU peak memory is
   the increase of the process's peak RSS, measured in a fresh subprocess per N; CUDA peak is
   ``torch.cuda.max_memory_allocated`` above the inputs.
2. Conformer training step (forward + backward + AdamW, both BCE heads, stop-gradient on):
   images/s for a given arch, crop and batch (defaults: Conformer-S, 224 px, batch 2 on CPU),
   with the options of ``methods/common/precision.py``: ``--bf16`` (autocast; losses in
   float32), ``--channels-last`` (NHWC convolutions: the Conformer's CNN branch) and
   ``--compile`` (``torch.compile`` of the training forward; give it ``--warmup 3`` or more,
   the warm-up pays the compilation). The options are printed with the figure.

Usage::

    python benchmarks/perf_adcam.py                      # both parts, CPU (+ CUDA if present)
    python benchmarks/perf_adcam.py --part diffusion --tokens 576 1024
    python benchmarks/perf_adcam.py --part train --arch conformer_s --crop 384 --batch 8 --device cuda
    python benchmarks/perf_adcam.py --part train --device cuda --batch 16 --bf16 --channels-last --compile --warmup 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.adcam.diffusion import diffuse, refine_attention  # noqa: E402
from methods.adcam.model import build_cam_net  # noqa: E402
from methods.common.precision import Precision  # noqa: E402


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def refine_and_diffuse(attention: torch.Tensor, cams: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    return diffuse(cams, refine_attention(attention, k), steps)


def time_diffusion(n: int, device: str, k: int, steps: int, classes: int, reps: int) -> dict:
    """One measurement (run in a fresh process for CPU so peak RSS is this N's)."""
    gen = torch.Generator().manual_seed(0)
    attention = torch.randn(1, n, n, generator=gen).mul(2).softmax(-1).to(device)
    cams = torch.rand(1, classes, n, generator=gen).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base_rss = _rss_kib()  # before the first call: freed blocks may stay mapped afterwards
    refine_and_diffuse(attention, cams, k, steps)  # warm-up
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        refine_and_diffuse(attention, cams, k, steps)
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"tokens": n, "device": device, "median_ms": 1000 * statistics.median(times), "peak_mib": peak_mib,
            "inputs_mib": (attention.numel() + cams.numel()) * 4 / 2**20}  # fmt: skip


def run_diffusion(args: argparse.Namespace) -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    print(f"refinement + diffusion: k={args.k}, T={args.steps}, C={args.classes}, batch 1, "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"{'device':>6} {'N':>6} {'median ms':>10} {'peak MiB':>9} {'inputs MiB':>10}")
    for device in devices:
        for n in args.tokens:
            if device == "cpu":  # fresh process: ru_maxrss is a high-water mark
                cmd = [sys.executable, __file__, "--one", str(n), "--k", str(args.k), "--steps", str(args.steps),
                       "--classes", str(args.classes), "--reps", str(args.reps)]  # fmt: skip
                row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            else:
                row = time_diffusion(n, device, args.k, args.steps, args.classes, args.reps)
            print(f"{device:>6} {n:>6} {row['median_ms']:>10.1f} {row['peak_mib']:>9.1f} {row['inputs_mib']:>10.1f}")


def run_train(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    prec = Precision(device, args.bf16, args.channels_last, args.compile)
    torch.manual_seed(0)
    net = build_cam_net(args.arch, 20, img_size=args.crop, last_stage="drop", stop_gradient=True).to(device).train()
    net = prec.module(net)
    forward = prec.train_forward(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    labels = (torch.rand(args.batch, 20, device=device) > 0.8).float()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        cnn, trans = prec.forward(forward, images)  # as AD-CAM's training loop: float32 logits
        loss = torch.nn.functional.binary_cross_entropy_with_logits(cnn, labels)
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(trans, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in net.parameters()) / 1e6
    options = f"bf16 {prec.bf16}, channels_last {prec.channels_last}, compile {prec.compile}"
    print(f"train step: {args.arch} ({params:.1f}M params, 20 classes), crop {args.crop}, batch {args.batch}, "
          f"{args.device} ({torch.get_num_threads()} threads): {args.iters * args.batch / elapsed:.2f} images/s, "
          f"{elapsed / args.iters:.2f} s/step over {args.iters} steps after {args.warmup} warm-up [{options}]")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "diffusion", "train"], default="all")
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 1024, 2304])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--arch", default="conformer_s")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="train step under bf16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions in the train step")
    parser.add_argument("--compile", action="store_true", help="torch.compile the train step's forward")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = parser.parse_args()
    if args.one:
        print(json.dumps(time_diffusion(args.one, "cpu", args.k, args.steps, args.classes, args.reps)))
        return
    if args.part in ("all", "diffusion"):
        run_diffusion(args)
    if args.part in ("all", "train"):
        run_train(args)


if __name__ == "__main__":
    main()
