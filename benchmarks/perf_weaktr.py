"""Throughput and memory of WeakTr's two training steps (not a test; prints a table).

Measures images/s of one CAM-training step (C-class-token ViT with attention capture on every
block + AAF + three losses, AdamW) and of one online-retraining step (Segmenter + gradient-
clipping loss, SGD), at the paper's sizes (DeiT-S, CAM 224 px batch 64, retraining 480 px
batch 4, VOC's 20 classes) and at the fast synthetic config (vit_synth, 96 px), on CPU and on
CUDA when available. Options (those of ``methods/common/precision.py``, printed with every
row): ``--bf16`` also measures each device with bf16 autocast, ``--channels-last`` stores the
convolutions NHWC, ``--compile`` runs the training forward through ``torch.compile`` (the
warm-up steps pay the compilation: use ``--warmup 3`` or more). Peak memory: CUDA ``max_memory_allocated``
per measurement, CPU the process's peak RSS (``resource``; monotonic, so read it in order).

It also reports what capturing attention costs: the bytes of the captured tensors per image
(K layers x H heads x (C+N)^2 attention floats + K x (C+N) x D branch floats), and, on CUDA,
the peak memory of a backbone step with capture against one without (fused attention).

    python benchmarks/perf_weaktr.py                      # both configs, every device
    python benchmarks/perf_weaktr.py --config paper --device cpu --cam-batch 8
    python benchmarks/perf_weaktr.py --config paper --device cuda --bf16 --channels-last --compile --warmup 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.common.precision import Precision  # noqa: E402
from methods.common.vit import run_blocks  # noqa: E402
from methods.weaktr.cam import weaktr_loss  # noqa: E402
from methods.weaktr.gradient_clipping import gradient_clipping_loss  # noqa: E402
from methods.weaktr.model import WeakTrCAMNet  # noqa: E402
from methods.weaktr.segmenter import Segmenter  # noqa: E402

CONFIGS = {
    # name: (arch, classes, cam size, cam batch, seg size, seg batch, clip patch S)
    "paper": ("deit_small", 20, 224, 64, 480, 4, 120),
    "synthetic": ("vit_synth", 5, 96, 16, 96, 8, 48),
}


@dataclass
class Row:
    config: str
    step: str
    device: str
    dtype: str
    batch: int
    size: int
    images_per_s: float
    seconds_per_step: float
    peak_mem_mib: float
    options: str = ""  # channels_last / compile when on
    note: str = ""


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def _options(prec: Precision) -> str:
    return ",".join(n for n in ("channels_last", "compile") if getattr(prec, n)) or "-"


def bench_cam(name: str, device: torch.device, batch: int, prec: Precision, warmup: int, iters: int) -> list[Row]:
    arch, classes, size, _, _, _, _ = CONFIGS[name]
    bf16 = prec.bf16
    torch.manual_seed(0)
    net = prec.module(WeakTrCAMNet(classes, arch, size, drop_path=0.1).to(device).train())
    forward = prec.train_forward(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.03)
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, classes, device=device) > 0.8).float()
    dtype = "bf16" if bf16 else "fp32"

    def step() -> None:
        out = prec.forward(forward, x)  # as WeakTr's training loop: float32 outputs, float32 losses
        loss, _ = weaktr_loss(out.cls_logits, out.coarse_logits, out.fine_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _peak_reset(device)
    sec = _time(step, device, warmup, iters)
    rows = [Row(name, "cam_train", device.type, dtype, batch, size, batch / sec, sec, _peak_mib(device), _options(prec))]

    # What capture costs: bytes captured per image, and (CUDA) peak of backbone steps with/without.
    captured = net.captured_bytes_per_image(size, size, 2 if bf16 else 4)
    with torch.no_grad(), prec.autocast():
        probe = run_blocks(net.backbone, x[:1], capture=range(net.num_layers), final_norm=False)
    measured = sum(t.numel() * t.element_size() for d in (probe.attentions, probe.branch_outputs) for t in d.values())
    note = f"captured/image: formula {captured / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB"
    if device.type == "cuda":
        peaks = {}
        for capture in (True, False):
            def backbone_step(capture: bool = capture) -> None:
                with prec.autocast():
                    idx = range(net.num_layers) if capture else ()
                    tokens = run_blocks(net.backbone, x, capture=idx, final_norm=False).tokens
                tokens.float().mean().backward()
                net.zero_grad(set_to_none=True)

            _peak_reset(device)
            _time(backbone_step, device, 1, 2)
            peaks[capture] = _peak_mib(device)
        note += f"; backbone fwd+bwd peak: capture {peaks[True]:.0f} MiB vs fused {peaks[False]:.0f} MiB"
    rows[0].note = note
    return rows


def bench_seg(name: str, device: torch.device, batch: int, prec: Precision, warmup: int, iters: int) -> list[Row]:
    arch, classes, _, _, size, _, patch = CONFIGS[name]
    torch.manual_seed(0)
    net = prec.module(Segmenter(classes + 1, arch, size).to(device).train())
    forward = prec.train_forward(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, classes + 1, (batch, size, size), device=device)

    def step() -> None:
        logits = prec.forward(forward, x)
        loss = gradient_clipping_loss(logits, target, tau=1e9, patch_size=patch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _peak_reset(device)
    sec = _time(step, device, warmup, iters)
    dtype = "bf16" if prec.bf16 else "fp32"
    return [Row(name, "seg_train", device.type, dtype, batch, size, batch / sec, sec, _peak_mib(device), _options(prec))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--cam-batch", type=int, default=0, help="CAM batch (default: config's; 64 for paper)")
    parser.add_argument("--seg-batch", type=int, default=0, help="retraining batch (default: config's; 4 for paper)")
    parser.add_argument("--bf16", action="store_true", help="also measure with bf16 autocast (every selected device)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions (patch embedding)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("perf_weaktr: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]  # "all": the ones present
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    rows: list[Row] = []
    for dev in devices:
        device = torch.device(dev)
        for dtype_bf16 in ([False, True] if args.bf16 else [False]):
            prec = Precision(device, dtype_bf16, args.channels_last, args.compile)
            for name in configs:
                cam_batch = args.cam_batch or CONFIGS[name][3]
                seg_batch = args.seg_batch or CONFIGS[name][5]
                rows += bench_cam(name, device, cam_batch, prec, args.warmup, args.iters)
                rows += bench_seg(name, device, seg_batch, prec, args.warmup, args.iters)
                for row in rows[-2:]:
                    print(_format(row), flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# torch {torch.__version__}, CPU threads {torch.get_num_threads()}, GPU {gpu}; options: bf16 {args.bf16} "
          f"(fp32 rows too), channels_last {args.channels_last}, compile {args.compile}, warm-up {args.warmup}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def _format(row: Row) -> str:
    text = (
        f"{row.config:9s} {row.step:9s} {row.device:4s} {row.dtype:4s} batch {row.batch:3d} @ {row.size:3d}px: "
        f"{row.images_per_s:8.2f} img/s ({row.seconds_per_step:.3f} s/step), peak {row.peak_mem_mib:8.0f} MiB"
        f" [{row.options}]"
    )
    return text + (f"\n    {row.note}" if row.note else "")


if __name__ == "__main__":
    raise SystemExit(main())
