"""StepMetricBuffer: per-step metrics written in batches from a background thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from harness.step_metrics import StepMetricBuffer


def test_close_writes_every_point_in_order():
    written = []
    with StepMetricBuffer(written.extend, flush_s=60) as buffer:
        for step in range(5):
            buffer.log("loss", 1.0 / (step + 1), step)
        buffer.log("acc", torch.tensor(0.5), 4)  # a 0-d tensor is converted on the writer side
    assert written == [("loss", 1.0, 0), ("loss", 0.5, 1), ("loss", 1 / 3, 2), ("loss", 0.25, 3), ("loss", 0.2, 4), ("acc", 0.5, 4)]


def test_background_thread_flushes_without_close():
    arrived = threading.Event()

    def write(points):
        arrived.set()

    buffer = StepMetricBuffer(write, flush_s=0.05)
    buffer.log("loss", 1.0, 0)
    assert arrived.wait(5), "the background flush never ran"
    buffer.close()


def test_log_does_not_wait_for_a_slow_writer():
    release = threading.Event()
    calls = []

    def slow_write(points):
        calls.append(list(points))
        release.wait(5)

    buffer = StepMetricBuffer(slow_write, flush_s=0.01)
    buffer.log("loss", 1.0, 0)
    while not calls:  # the writer thread is now blocked inside slow_write
        time.sleep(0.005)
    start = time.perf_counter()
    for step in range(1, 101):
        buffer.log("loss", 1.0, step)
    blocked = time.perf_counter() - start
    release.set()
    buffer.close()
    assert blocked < 1.0  # 100 appends, never waiting on the 5 s writer
    assert sum(len(c) for c in calls) == 101


def test_a_failing_writer_is_retried_then_dropped_with_a_warning():
    attempts = []

    def write(points):
        attempts.append(len(points))
        if len(attempts) < 2:
            raise OSError("store unreachable")

    buffer = StepMetricBuffer(write, flush_s=60, max_failures=3)
    buffer.log("loss", 1.0, 0)
    buffer.flush()  # fails, points kept
    buffer.log("loss", 2.0, 1)
    buffer.close()  # succeeds with both points
    assert attempts == [1, 2]

    def broken(points):
        raise OSError("gone")

    buffer = StepMetricBuffer(broken, flush_s=60, max_failures=2)
    buffer.log("loss", 1.0, 0)
    buffer.flush()
    with pytest.warns(UserWarning, match="1 points dropped"):
        buffer.close()


def test_flush_interval_must_be_positive():
    with pytest.raises(ValueError, match="flush_s"):
        StepMetricBuffer(lambda points: None, flush_s=0)
