"""Per-step training metrics off the training thread.

A training loop reports a loss every step through ``StageContext.log_metric``. Writing each
point to MLflow synchronously costs about 15 ms per call on the SQLite store (one HTTP round
trip on a tracking server), a third of a 30 ms GPU step. :class:`StepMetricBuffer` makes that
call a lock-protected list append (microseconds) and hands the points to a writer function on
a background thread every ``flush_s`` seconds and when closed.

What can be lost: nothing on a clean stop or an exception (``close`` flushes; use it as a
context manager); at most the last ``flush_s`` seconds of step metrics on ``kill -9``. A write
that fails (store unreachable) is retried at the next flush; after ``max_failures`` failures
in a row the pending points are dropped with a warning so training never blocks on
bookkeeping. Step metrics are curves for reading, never results: stage metrics are logged
synchronously by the tracker.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Sequence

Point = tuple[str, float, int]  # (metric name, value, step)
Writer = Callable[[Sequence[Point]], None]


class StepMetricBuffer:
    """Buffers ``(name, value, step)`` points and writes them in batches from a thread.

    Args:
        write: called with a batch of points on the background thread (e.g. one MLflow
            ``log_batch``); must be safe to call from a thread other than the creator's.
        flush_s: seconds between background flushes (> 0).
        max_failures: consecutive failed writes after which pending points are dropped.

    ``log(name, value, step)`` matches ``StageContext.log_metric``. ``value`` may be a
    Python number or a 0-d tensor: conversion to float happens on the writer thread, so a
    CUDA loss does not force a device synchronisation on the training thread.
    """

    def __init__(self, write: Writer, flush_s: float = 5.0, max_failures: int = 3) -> None:
        if flush_s <= 0:
            raise ValueError(f"flush_s must be > 0, got {flush_s}")
        self._write = write
        self._flush_s = flush_s
        self._max_failures = max_failures
        self._failures = 0
        self._pending: list[tuple[str, object, int]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one write at a time: order of batches kept
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wsss-step-metrics", daemon=True)
        self._thread.start()

    def log(self, name: str, value: object, step: int) -> None:
        """Queue one point; returns at once."""
        with self._lock:
            self._pending.append((name, value, int(step)))

    def flush(self) -> None:
        """Write everything queued so far (on the calling thread)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            points = [(name, float(value), step) for name, value, step in batch]
            try:
                self._write(points)
                self._failures = 0
            except Exception as exc:  # bookkeeping must not kill training
                self._failures += 1
                if self._failures >= self._max_failures:
                    warnings.warn(f"step metrics: {len(points)} points dropped after {self._failures} failed writes ({exc})", stacklevel=2)
                    self._failures = 0
                else:
                    with self._lock:
                        self._pending[:0] = batch

    def close(self) -> None:
        """Stop the background thread and write what is left."""
        self._stop.set()
        self._thread.join()
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self._flush_s):
            self.flush()

    def __enter__(self) -> "StepMetricBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
