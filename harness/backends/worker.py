"""What every backend runs for one trial, in whatever process it lands in.

A worker gets plain data (a task dict: the TrialSpec as a dict, the results directory, the
tracking URI, the device) and imports nothing from the driver's state; it calls
:func:`harness.sweep.execute_trial`. Around it, the worker keeps files in the trial's
directory that let anyone tell a live trial from a dead one without asking the scheduler:

``heartbeat.json``  who runs the trial (host, pid, backend, job id, attempt), its current
                    stage and progress, rewritten every few seconds while it runs
``outcome.json``    how the last attempt ended (state, metrics, error, MLflow run id, timing)
``attempts.jsonl``  one line per attempt (a Ray retry, a SLURM requeue)
``.lock``           an exclusive lock held while the trial runs, so two workers (a requeued
                    job and a stale one, two drivers) never run one trial at once; forked
                    children (CRF pool, data loaders) never keep it (closed at fork)
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from harness.tracking import hold_point

HEARTBEAT = "heartbeat.json"
OUTCOME = "outcome.json"
ATTEMPTS = "attempts.jsonl"
SUBMISSION = "submission.json"
LOCK = ".lock"
HEARTBEAT_S = float(os.environ.get("WSSS_HEARTBEAT_S", "10"))


def make_task(spec, results_dir: Path, tracking_uri: str, device: str = "cpu", parent_run_id: str | None = None,
              backend: str = "local", plugins: tuple[str, ...] = (), threads: int | None = None) -> dict[str, Any]:
    """The plain-data description of one trial that a worker needs (picklable, JSON-able)."""
    return {
        "spec": spec.to_dict(),
        "trial_id": spec.trial_id,
        "results_dir": str(Path(results_dir).resolve()),
        "tracking_uri": tracking_uri,
        "device": device,
        "parent_run_id": parent_run_id,
        "backend": backend,
        "plugins": list(plugins),
        "threads": threads,
        "submitted_at": time.time(),
    }


def trial_root(results_dir: str | Path, trial_id: str) -> Path:
    return Path(results_dir) / "trials" / trial_id


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    from harness.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


# -- plugins: extra method modules a worker must import (tests, benchmarks) --------------------

def load_plugins(plugins: list[str] | tuple[str, ...]) -> None:
    """Import each plugin once: a module name, or a .py file path (skipped when a module from
    the same file is already loaded, e.g. as ``__main__`` / ``__mp_main__``)."""
    for item in plugins:
        if item.endswith(".py") or os.sep in item:
            path = Path(item).resolve()
            if any(getattr(m, "__file__", None) and Path(m.__file__).resolve() == path for m in list(sys.modules.values())):
                continue
            name = f"wsss_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import plugin {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(item)


# -- the trial lock ---------------------------------------------------------------------------

# Lock fds held by this process. A forked child (the dense-CRF pool, DataLoader workers)
# shares the open file description, and with it the flock: a child that outlived a killed
# driver would keep the trial "running" for ever. Every fork closes them in the child.
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


@contextmanager
def trial_lock(root: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the trial's exclusive lock (flock; on NFS Linux maps it to a POSIX lock; released by the
    kernel when the holder dies). Yields False without waiting when ``wait`` is False and
    another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    # Read-only: flock needs no write access, and an open-for-write file would stop an admin's
    # read-only remount of a full results disk. O_CLOEXEC: never inherited by exec'd children.
    fd = os.open(root / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not wait:
                yield False
                return
            holder = read_json(root / HEARTBEAT) or {}
            print(f"[wsss-bench] trial {root.name} is being run by pid {holder.get('pid')} on {holder.get('host')}; waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # releases the lock


def lock_held(root: Path) -> bool:
    """True when a live process holds the trial's lock (it is running right now)."""
    if not (root / LOCK).exists():
        return False
    with trial_lock(root, wait=False) as got:
        return not got


# -- heartbeat --------------------------------------------------------------------------------

class Heartbeat:
    """Rewrites heartbeat.json every ``interval`` seconds and on every stage change."""

    def __init__(self, root: Path, info: dict[str, Any], interval: float = HEARTBEAT_S) -> None:
        self.path = root / HEARTBEAT
        self.info = dict(info, state="running", stage=None, done=0, total=0, started=time.time(), first_stage_at=None, last_stage_at=None)
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._loop, name="wsss-heartbeat", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        with self._lock:
            self.info["updated"] = time.time()
            data = dict(self.info)
        try:
            write_json(self.path, data)
        except OSError:
            pass  # a full disk must not kill the trial; status then reports it stale

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        with self._lock:
            changed = stage != self.info["stage"]
            self.info.update(stage=stage, done=done, total=total)
            if done == total == 0:  # a stage starts
                self.info["first_stage_at"] = self.info["first_stage_at"] or now
                self.info["last_stage_at"] = now
        if changed:
            self._write()

    def close(self, state: str) -> None:
        self._stop.set()
        with self._lock:
            self.info["state"] = state
        self._write()


# -- the worker entry point ---------------------------------------------------------------------

def run_trial(task: dict[str, Any], job_id: str | None = None, progress=None) -> dict[str, Any]:
    """Run one trial from a task dict; return its outcome as a dict (never raises for an
    error in the trial: it is recorded. Interrupts and SystemExit propagate)."""
    t0 = time.time()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run at" lines per trial
    if task.get("threads") and "torch" not in sys.modules:  # a fresh worker: size OpenMP before torch loads
        os.environ["OMP_NUM_THREADS"] = str(task["threads"])
    load_plugins(task.get("plugins") or ())
    import torch

    previous_threads = torch.get_num_threads()
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    try:
        return _run(task, job_id, progress, t0)
    finally:
        torch.set_num_threads(previous_threads)  # matters when the driver runs trials in-process


def _run(task: dict[str, Any], job_id: str | None, progress, t0: float) -> dict[str, Any]:
    from harness.config import TrialSpec

    spec = TrialSpec.from_dict(task["spec"])
    results = Path(task["results_dir"])
    root = trial_root(results, spec.trial_id)
    info = {"trial_id": spec.trial_id, "host": socket.gethostname(), "pid": os.getpid(), "backend": task.get("backend"),
            "job_id": job_id, "device": task["device"], "submitted_at": task.get("submitted_at"), "worker_started": t0}
    try:
        return _run_locked(task, spec, results, root, info, job_id, progress, t0)
    except OSError as exc:  # the lock or attempt file cannot be written (read-only / full results dir)
        from harness.sweep import disk_error

        problem = disk_error(exc) or f"{type(exc).__name__}: {exc}"
        return {"trial_id": spec.trial_id, "state": "failed", "metrics": {}, "run_id": None, "resumed_from": None,
                "error": f"results directory: {problem}", "disk_error": problem, "system_failure": True}


def _run_locked(task: dict[str, Any], spec, results: Path, root: Path, info: dict[str, Any], job_id: str | None, progress,
                t0: float) -> dict[str, Any]:
    from harness.sweep import disk_error, execute_trial

    with trial_lock(root):
        attempts = _append_attempt(root, info)
        beat = Heartbeat(root, dict(info, attempt=attempts))

        def report(stage: str, done: int, total: int) -> None:
            beat.progress(stage, done, total)
            if progress is not None:
                progress(stage, done, total)

        outcome: dict[str, Any]
        try:
            result = execute_trial(spec, results, task["tracking_uri"], task["device"], False, task.get("parent_run_id"), report)
            outcome = {"state": result.state, "metrics": result.metrics, "error": result.error, "run_id": result.run_id,
                       "resumed_from": result.resumed_from, "disk_error": result.disk_error}
        except Exception as exc:  # raised outside the runner (tracking store, trial dir): still recorded
            message = f"{type(exc).__name__}: {exc}"
            try:
                from harness.files import atomic_write_text

                atomic_write_text(root / "error.txt", traceback.format_exc())
            except OSError:
                pass
            outcome = {"state": "failed", "metrics": {}, "error": message, "run_id": None, "resumed_from": None,
                       "disk_error": disk_error(exc)}
        except BaseException as exc:  # Ctrl-C, a SLURM requeue (SystemExit), a kill: resumable
            beat.close("requeued" if isinstance(exc, SystemExit) else "interrupted")
            raise
        timing = {"submitted_at": task.get("submitted_at"), "worker_started": t0, "first_stage_at": beat.info["first_stage_at"],
                  "last_stage_at": beat.info["last_stage_at"], "done_at": time.time()}
        outcome.update(trial_id=spec.trial_id, host=info["host"], pid=info["pid"], job_id=job_id, backend=task.get("backend"),
                       attempt=attempts, timing=timing)
        hold_point("worker.outcome")  # tests: the results directory turns read-only here
        try:
            write_json(root / OUTCOME, outcome)
        except OSError as exc:  # bookkeeping only: MLflow has the trial's end; the driver reports it
            outcome["disk_error"] = outcome.get("disk_error") or disk_error(exc, root / OUTCOME) or f"{type(exc).__name__}: {exc}"
        beat.close(outcome["state"])
    return outcome


def _append_attempt(root: Path, info: dict[str, Any]) -> int:
    path = root / ATTEMPTS
    with open(path, "a") as handle:
        handle.write(json.dumps(dict(info, at=time.time()), default=str) + "\n")
    with open(path) as handle:
        return sum(1 for line in handle if line.strip())


def outcome_from_dict(spec, data: dict[str, Any]):
    from harness.sweep import TrialOutcome

    return TrialOutcome(spec, data.get("state", "failed"), dict(data.get("metrics") or {}), data.get("error") or "",
                        data.get("run_id"), data.get("resumed_from"), data.get("disk_error") or "")


def failed_outcome(spec, message: str):
    from harness.sweep import TrialOutcome

    return TrialOutcome(spec, "failed", error=message)
