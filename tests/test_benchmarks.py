"""Smoke runs of the benchmark scripts that no other test imports (they print figures; these
tests only check that they still run end to end on the smallest setting)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_perf_afa_runs_one_synthetic_step_fed_by_the_loader():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "perf_afa.py"), "--suite", "synthetic", "--device", "cpu", "--steps", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    header, figures = done.stdout.strip().splitlines()[-2:]
    assert header.split()[:2] == ["loop", "img/s"]
    loop_ips, s_per_step, step_ips, peak_mib, gpu, iterations, hours = figures.split()
    assert float(loop_ips) > 0 and float(step_ips) > 0 and float(s_per_step) > 0
    assert gpu == "-"  # on the CPU the column says so rather than a number
    assert iterations == "400"  # the synthetic recipe's AFA iterations


@pytest.mark.slow
def test_perf_stages_times_every_inference_stage_of_each_method():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "perf_stages.py"), "--suite", "synthetic", "--methods", "weaktr,adcam",
         "--device", "cpu", "--images", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.strip().splitlines()[2:]]
    stages = ["cams", "pseudo masks", "segment ss", "segment ms"]
    assert [(r[0], " ".join(r[1:-3])) for r in rows] == [(m, s) for m in ("weaktr", "adcam") for s in stages]
    for row in rows:
        ms, images, hours = row[-3:]
        assert float(ms) > 0 and images in ("10,582", "1,449") and hours == "-"  # synthetic images: no VOC hours


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run its 10-minute measurement")
def test_gpu_figures_stops_at_once_without_a_cuda_device(tmp_path):
    """No GPU: exit 2 with a one-line reason before any benchmark runs (no half-empty logs)."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_figures.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert "sees no CUDA device" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
