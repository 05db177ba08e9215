"""Per-step metric logging cost on the training thread (not a test).

A training loop reports its losses every step (``StageContext.log_metric``). This measures
what one step's logging costs the thread that trains, on a real MLflow SQLite store in a
temporary directory:

* before: each point written synchronously (``Tracker.log_metric_points``, one ``log_batch``
  per call, as the harness did until the buffer existed);
* after: :class:`harness.step_metrics.StepMetricBuffer` (an append; a background thread
  writes batches every ``--flush-s`` seconds), including the final ``close()`` amortised over
  the steps, and a check that every point reached the store.

Each step logs ``--metrics`` points (4 by default: a total loss and three terms, as AFA does).
Target: <= 0.1 ms per step on the training thread.

    python benchmarks/perf_logging.py
    python benchmarks/perf_logging.py --steps 2000 --metrics 4 --json logging.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.step_metrics import StepMetricBuffer  # noqa: E402
from harness.tracking import Tracker, default_tracking_uri  # noqa: E402


def _per_step_ms(log, steps: int, metrics: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        for k in range(metrics):
            log(f"train/loss_{k}", 1.0 / (step + 1), step)
    return (time.perf_counter() - start) * 1e3 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="steps timed synchronously (each ~15 ms on SQLite)")
    parser.add_argument("--buffered-steps", type=int, default=20000, help="steps timed through the buffer")
    parser.add_argument("--metrics", type=int, default=4, help="points per step")
    parser.add_argument("--flush-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(default_tracking_uri(Path(tmp)), "perf-logging")
        sync_run = tracker.client.create_run(tracker.experiment_id).info.run_id
        buffered_run = tracker.client.create_run(tracker.experiment_id).info.run_id

        def sync_log(name, value, step):
            tracker.log_metric_points(sync_run, [(name, value, step)])

        sync_ms = _per_step_ms(sync_log, args.steps, args.metrics)

        buffer = StepMetricBuffer(lambda points: tracker.log_metric_points(buffered_run, points), flush_s=args.flush_s)
        start = time.perf_counter()
        append_ms = _per_step_ms(buffer.log, args.buffered_steps, args.metrics)
        close_start = time.perf_counter()
        buffer.close()
        close_ms = (time.perf_counter() - close_start) * 1e3
        total_ms = (time.perf_counter() - start) * 1e3
        history = tracker.client.get_metric_history(buffered_run, "train/loss_0")
        complete = len(history) == args.buffered_steps

    figures = {
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "metrics_per_step": args.metrics,
        "sync_ms_per_step": round(sync_ms, 4),
        "buffered_ms_per_step": round(append_ms, 5),
        "buffered_close_ms": round(close_ms, 1),
        "buffered_close_ms_per_step": round(close_ms / args.buffered_steps, 5),
        "buffered_total_s": round(total_ms / 1e3, 2),
        "speedup_on_training_thread": round(sync_ms / append_ms, 1),
        "all_points_written": complete,
    }
    print(f"per-step logging cost on the training thread ({args.metrics} metrics/step, SQLite store)")
    print(f"  synchronous log_batch per point : {sync_ms:9.3f} ms/step  ({args.steps} steps)")
    print(f"  StepMetricBuffer.log            : {append_ms:9.5f} ms/step  ({args.buffered_steps} steps)")
    print(f"  final close() (last flush)      : {close_ms:9.1f} ms once (here every point; in training at most --flush-s seconds of points)")
    print(f"  speed-up on the training thread : {sync_ms / append_ms:9.0f}x; every point in the store: {complete}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
