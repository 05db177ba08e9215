"""The local backend: trials in this process one at a time (``--max-parallel 1``, the
default), or on a pool of N worker processes, each pinned to its own device slot.

Device pool: with ``--device cuda`` every slot gets its own GPU(s) through
``CUDA_VISIBLE_DEVICES`` (set before the worker touches CUDA), so two trials never share a
GPU by accident; asking for more parallel trials than there are GPUs is an error, not a
silent oversubscription. CPU slots hide every GPU and get ``cpus // N`` threads each.

Workers are spawned (never forked from a driver that has imported torch), stay alive across
trials (imports are paid once per slot) and die with the driver: a ``kill -9`` of the driver
takes them down too, and the next run resumes their trials from the last finished stage.
A worker that dies mid-trial (OOM killer, segfault) is replaced; its trial is recorded as
failed with the exit code and the sweep goes on.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from harness.environment import cpu_count
from harness.errors import ConfigError


@dataclass
class Slot:
    index: int
    device: str  # what the trial sees: "cpu" or "cuda" (the slot's first visible GPU)
    env: dict[str, str] = field(default_factory=dict)
    threads: int | None = None

    @property
    def label(self) -> str:
        gpus = self.env.get("CUDA_VISIBLE_DEVICES")
        return f"slot {self.index} ({'cpu' if not gpus else 'GPU ' + gpus})"


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else all that torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPUs
        return []


def plan_slots(max_parallel: int, device: str, devices: list[str] | None = None, gpus_per_trial: int | None = None,
               cpus_per_trial: int | None = None) -> list[Slot]:
    """One slot per parallel worker with a disjoint set of GPUs (or none)."""
    if max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {max_parallel}.")
    wants_gpu = device.startswith("cuda") or (device == "auto" and bool(devices or visible_gpus()))
    if device.startswith("cuda:") and max_parallel > 1:
        raise ConfigError(f"--device {device} pins every trial to one GPU, so {max_parallel} parallel trials would share it. "
                          "Use --device cuda with --max-parallel (each worker gets its own GPU), and --devices to choose which GPUs.")
    threads = cpus_per_trial or max(1, cpu_count() // max_parallel)
    if not wants_gpu:
        if devices:
            raise ConfigError(f"--devices {','.join(devices)} lists GPUs for the local pool, but --device is {device}: pass --device cuda.")
        if gpus_per_trial:
            raise ConfigError(f"--gpus-per-trial {gpus_per_trial} needs --device cuda (or auto on a machine with GPUs).")
        return [Slot(i, "cpu", {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}, threads)
                for i in range(max_parallel)]
    pool = list(devices) if devices else visible_gpus()
    per = gpus_per_trial or 1
    if not pool:
        raise ConfigError(f"--device {device} asks for GPUs but none is visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
                          "Use --device cpu, or pass --devices with the GPU ids to use.")
    if max_parallel * per > len(pool):
        raise ConfigError(f"--max-parallel {max_parallel} x {per} GPU(s) per trial needs {max_parallel * per} GPUs, but only "
                          f"{len(pool)} are available ({','.join(pool)}); trials would share a GPU. Lower --max-parallel, "
                          "or list more GPUs with --devices.")
    slots = []
    for i in range(max_parallel):
        gpus = ",".join(pool[i * per:(i + 1) * per])
        slots.append(Slot(i, "cuda", {"CUDA_VISIBLE_DEVICES": gpus, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}, threads))
    return slots


# -- the worker process ---------------------------------------------------------------------------

def _die_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="wsss-parent-watch", daemon=True).start()


def _serve(conn, env: dict[str, str]) -> None:
    """A pool worker: run the tasks the driver sends until it sends None."""
    os.environ.update(env)
    _die_with_parent()
    from harness.backends.worker import run_trial

    conn.send(("ready", None, None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        last = [0.0, None]

        def progress(stage: str, done: int, total: int, _id=task["trial_id"]) -> None:
            now = time.monotonic()
            if stage != last[1] or now - last[0] > 0.5 or done == total:
                last[0], last[1] = now, stage
                conn.send(("progress", _id, (stage, done, total)))

        outcome = run_trial(task, job_id=f"local-{os.getpid()}", progress=progress)
        conn.send(("done", task["trial_id"], outcome))


class _Worker:
    def __init__(self, ctx, slot: Slot) -> None:
        self.slot = slot
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, slot.env), name=f"wsss-worker-{slot.index}", daemon=False)  # trials may use process pools (CRF)
        self.proc.start()
        child.close()
        self.task: dict[str, Any] | None = None
        self.ready = False
        self.dead = False


def run_pool(tasks: list[dict[str, Any]], slots: list[Slot],
             on_start: Callable[[dict[str, Any]], None] | None = None,
             on_progress: Callable[[str, str, int, int], None] | None = None,
             on_done: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run every task on the pool; returns trial_id -> outcome dict. A worker that dies
    yields ``{"state": "failed", "error": "worker process died ..."}`` for its trial."""
    ctx = multiprocessing.get_context("spawn")
    pending = deque(tasks)
    workers = [_Worker(ctx, slot) for slot in slots[: max(1, min(len(slots), len(tasks)))]]
    outcomes: dict[str, dict[str, Any]] = {}
    try:
        while pending or any(w.task for w in workers):
            if pending and all(w.dead for w in workers):
                workers = [_Worker(ctx, w.slot) for w in workers]
            for worker in workers:
                if worker.ready and worker.task is None and pending:
                    task = dict(pending.popleft(), device=worker.slot.device, threads=worker.slot.threads)
                    worker.task = task
                    worker.conn.send(task)
                    if on_start:
                        on_start(task)
            live = [w for w in workers if not w.dead]
            waitables = [w.conn for w in live] + [w.proc.sentinel for w in live]
            for ready in multiprocessing.connection.wait(waitables, timeout=1.0):
                for index, worker in enumerate(workers):
                    if ready is worker.conn:
                        try:
                            kind, trial_id, payload = worker.conn.recv()
                        except (EOFError, OSError):
                            continue  # the sentinel below reports the death
                        if kind == "ready":
                            worker.ready = True
                        elif kind == "progress" and on_progress:
                            on_progress(trial_id, *payload)
                        elif kind == "done":
                            outcomes[trial_id] = payload
                            worker.task = None
                            if on_done:
                                on_done(payload)
                    elif not worker.dead and ready == worker.proc.sentinel and not worker.proc.is_alive():
                        worker.proc.join()
                        worker.dead = True
                        code = worker.proc.exitcode
                        if worker.task is not None:
                            task = worker.task
                            what = f"signal {-code} ({signal.Signals(-code).name})" if code and code < 0 else f"exit code {code}"
                            outcome = {"trial_id": task["trial_id"], "state": "failed", "metrics": {}, "run_id": None, "resumed_from": None,
                                       "error": f"worker process died ({what}) on {worker.slot.label}; its finished stages are kept and a re-run resumes it",
                                       "system_failure": True}
                            outcomes[task["trial_id"]] = outcome
                            if on_done:
                                on_done(outcome)
                        elif not worker.ready:
                            raise RuntimeError(f"local worker {worker.slot.label} failed to start (exit code {code})")
                        worker.task = None
                        if pending:
                            workers[index] = _Worker(ctx, worker.slot)
    finally:
        _shutdown(workers)
    return outcomes


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.proc.is_alive():
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + 10
    for worker in workers:
        if worker.task is not None and worker.proc.is_alive():
            worker.proc.terminate()  # interrupted mid-trial (Ctrl-C / error in the driver)
        worker.proc.join(max(0.1, deadline - time.monotonic()))
        if worker.proc.is_alive():
            worker.proc.kill()
            worker.proc.join(5)
        worker.conn.close()
