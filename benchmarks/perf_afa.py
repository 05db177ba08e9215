"""AFA training throughput with the data loader feeding it (not a test; prints a table).

Runs :meth:`methods.afa.method.AFA.training_step` (MiT + decoder forward, classification,
multi-scale CAMs, PAR, random-walk label, affinity and segmentation losses; backward; AdamW)
with the suite's AFA recipe (``--suite voc``: MiT-B1, 512 px crops, batch 4, 20k iterations;
``--suite synthetic``: mit_synth, 96 px) in the step's most expensive phase (after
``rw_switch_iter``, where most of the paper's iterations are), on batches read from files by
:func:`methods.common.data.training_batches` (voc: the voc-mini images; synthetic: the generated
train split) with ``--workers`` DataLoader workers, pinned memory on CUDA.

Per row: images/s of the whole loop (loader + step), seconds per step, images/s of the step
alone (one batch reused: the loader's share is the difference), peak memory (CUDA
``max_memory_allocated``; CPU the process's peak RSS), GPU utilisation (mean of
``nvidia-smi`` samples every 0.5 s during the timed steps; "-" without a GPU), and the
projected hours of the recipe's iterations at that speed. Backbones start from random init:
weights do not change the speed. Options as ``methods/common/precision.py``: ``--bf16``,
``--channels-last``, ``--compile`` (give ``--warmup 3`` or more: warm-up pays compilation).
``--profile N`` then profiles N steps: the device's busy share, host syncs per step and the
operators with the most self time (where a GPU step waits on the host).

    python benchmarks/perf_afa.py --suite synthetic --steps 5
    python benchmarks/perf_afa.py --suite voc --device cpu --steps 2 --warmup 1
    python benchmarks/perf_afa.py --suite voc --device cuda --workers 8 --steps 50 --bf16
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.config import build_method_config  # noqa: E402
from harness.datasets import create_dataset  # noqa: E402
from methods.afa.method import AFA, AFAConfig  # noqa: E402
from methods.common.data import training_batches  # noqa: E402
from methods.common.training import CropAugment  # noqa: E402

VOC_MINI = ROOT.parent / "shared" / "data" / "voc-mini" / "VOC2012"


class GpuSampler:
    """Mean GPU utilisation (%) from ``nvidia-smi`` every ``period`` seconds while running;
    None when there is no ``nvidia-smi`` (or no sample came back)."""

    def __init__(self, index: int, period: float = 0.5) -> None:
        self.command = None
        if shutil.which("nvidia-smi"):
            self.command = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            done = subprocess.run(self.command, capture_output=True, text=True, check=False)
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.samples.append(int(done.stdout.strip()))

    def __enter__(self) -> "GpuSampler":
        if self.command:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.command:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def recipe(suite: str, args: argparse.Namespace) -> AFAConfig:
    """The suite's AFA section as an AFAConfig, random init, with the precision options."""
    values = dict(tomllib.loads((ROOT / "benchmarks" / f"{suite}.toml").read_text())["methods"]["afa"])
    values.update(pretrained=None, bf16=args.bf16, channels_last=args.channels_last, compile=args.compile)
    return build_method_config(AFAConfig, values, f"benchmarks/{suite}.toml [methods.afa]")


def train_data(suite: str, data: Path, scratch: Path):
    """(the dataset, its train split): the VOC files in ``data``, or the generated synthetic split."""
    if suite == "synthetic":
        dataset = create_dataset("synthetic", None, scratch, {})
    elif not data.is_dir():
        sys.exit(f"perf_afa: {data} not found (the voc-mini files); pass --data VOC2012-folder or use --suite synthetic")
    else:
        dataset = create_dataset("voc", data, scratch, {})
    return dataset, dataset.split("train")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["voc", "synthetic"], default="synthetic")
    parser.add_argument("--data", type=Path, default=VOC_MINI, help="VOC2012 folder read by --suite voc")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N steps (torch.profiler): busy share, host syncs, top operators")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = recipe(args.suite, args)
    with tempfile.TemporaryDirectory(prefix="wsss-perf-afa-") as scratch:
        dataset, split = train_data(args.suite, args.data, Path(scratch))
        method = AFA(cfg, dataset.info, device)
        row = measure(method, cfg, split, device, args)
    options = ", ".join(n for n in ("bf16", "channels_last", "compile") if getattr(cfg, n)) or "fp32"
    gpu = f"{row['gpu_util']:.0f}" if row["gpu_util"] is not None else "-"
    print(f"afa ({args.suite}: {cfg.backbone}, crop {cfg.crop}, batch {cfg.batch_size}), {device}, "
          f"{args.threads} thread(s), {args.workers} loader worker(s), {options}, torch {torch.__version__}")
    print(f"{'loop img/s':>10s} {'s/step':>8s} {'step-only img/s':>15s} {'peak MiB':>9s} {'GPU util %':>10s} "
          f"{'recipe iterations':>17s} {'projected h':>11s}")
    print(f"{row['loop_ips']:10.2f} {row['s_per_step']:8.3f} {row['step_ips']:15.2f} {row['peak_mib']:9.0f} {gpu:>10s} "
          f"{cfg.iterations:17,d} {cfg.iterations * row['s_per_step'] / 3600:11.2f}")
    if args.profile:
        profile(method, cfg, row.pop("batch"), device, args.profile)


def measure(method: AFA, cfg: AFAConfig, split, device: torch.device, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` loop steps (after ``args.warmup``) in the random-walk phase, then
    the same number of steps on one reused batch."""
    optimizer = torch.optim.AdamW(method.net.parameters(), lr=cfg.lr)
    method.net.train()
    first = cfg.rw_switch_iter  # the phase with every loss term on

    def step(batch, index: int) -> None:
        losses = method.training_step(batch.images_on(method.device), batch.labels, batch.valid, first + index)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    total = args.warmup + args.steps
    batches = training_batches(split, cfg.batch_size, CropAugment(cfg.crop, tuple(cfg.scale_range)), seed=0,
                               total_steps=total, num_workers=args.workers, pin_memory=device.type == "cuda")
    last = None
    for index, batch in batches:
        if index == args.warmup:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sampler = GpuSampler(device.index or 0).__enter__()
            start = time.perf_counter()
        step(batch, index)
        last = batch
    _sync(device)
    loop_s = (time.perf_counter() - start) / args.steps
    sampler.__exit__()
    start = time.perf_counter()
    for index in range(args.steps):
        step(last, index)
    _sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    return {"loop_ips": cfg.batch_size / loop_s, "s_per_step": loop_s, "step_ips": cfg.batch_size / step_s,
            "peak_mib": _peak_mib(device), "gpu_util": sampler.mean, "batch": last}


def profile(method: AFA, cfg: AFAConfig, batch, device: torch.device, steps: int) -> None:
    """Where a step's time goes, on one reused batch: wall time against the summed self time
    of the device kernels (the device's busy share; low = the host is the bottleneck), host
    to device synchronisations per step (CUDA's sync debug mode counts each ``.item()``,
    ``nonzero``, shape-dependent index), and the operators with the most self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def step() -> None:
        method.training_step(batch.images_on(method.device), batch.labels, batch.valid, cfg.rw_switch_iter)["loss"].backward()
        method.net.zero_grad(set_to_none=True)

    syncs = "-"
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode("default")
        syncs = str(sum("synchroniz" in str(w.message) for w in caught))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # the kernels themselves, not their launchers
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 / steps if device.type == "cuda" else None
    print(f"\nprofile, {steps} step(s) (forward + backward, no optimizer): {wall:.3f} s/step under the profiler; "
          f"device kernels {busy:.3f} s/step ({100 * busy / wall:.0f} % busy); host syncs per step: {syncs}"
          if busy is not None else f"\nprofile, {steps} step(s): {wall:.3f} s/step under the profiler")
    for key in ("self_cpu_time_total",) + (("self_device_time_total",) if busy is not None else ()):
        print(events.table(sort_by=key, row_limit=15, max_name_column_width=48))


if __name__ == "__main__":
    main()
