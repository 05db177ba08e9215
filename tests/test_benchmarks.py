"""Smoke runs of the benchmark scripts that no other test imports (they print figures; these
tests only check that they still run end to end on the smallest setting)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_gpu_figures_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_figures.sh")]).returncode == 0
