"""Sweep orchestration: what happens around the backends when ``wsss-bench run`` runs a
sweep (:func:`run_sweep`). The backends (harness/backends/local.py, ray_backend.py,
slurm.py) only submit trials and watch them; every one ends in :func:`worker.run_trial`.
:func:`run_sweep` is what ``wsss-bench run`` calls. Before anything runs it

* skips trials MLflow already holds as finished by the code running now; a trial finished
  with older code (another ``wsss.code_tree``) is re-run, its old run kept but marked
  superseded, unless ``--reuse-older-code``; ``--force`` supersedes every finished trial,
* never resubmits a trial whose job is still queued or running (SLURM) or whose worker is
  alive on this machine,
* creates the experiment in this process and, when several processes will write at once,
  starts one MLflow tracking server on 127.0.0.1 that every worker logs through. On SLURM
  the server is detached (it outlives the driver, ``--wait`` or not: jobs keep running when
  the driver is killed) and stopped once nothing is queued.

A sweep that leaves a trial unfinished (interrupted, or held by a live worker elsewhere) is
not a success: :attr:`SweepResult.unfinished` lists them and ``wsss-bench run`` exits 1.
Writes the results directory refuses (read-only, full) are recorded where they can be (MLflow)
and listed in :attr:`SweepResult.disk_errors`; the remaining trials are still attempted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from harness.errors import ConfigError

if TYPE_CHECKING:  # the face (harness/backends/__init__.py) imports this module at run time
    from harness.backends import BackendOptions

@dataclass
class SweepResult:
    outcomes: list[Any] = field(default_factory=list)  # TrialOutcome, in the order of the specs
    submitted: list[tuple[Any, str]] = field(default_factory=list)  # (spec, job id): queued, not waited for
    already_queued: list[tuple[Any, str]] = field(default_factory=list)  # (spec, where) left alone
    server: Any = None  # a detached tracking server left running for queued jobs
    worker_uri: str | None = None
    waits: bool = True  # False for SLURM without --wait: queued trials are expected to stay unfinished

    @property
    def failed(self) -> bool:
        return any(o.state == "failed" for o in self.outcomes)

    @property
    def unfinished(self) -> list[Any]:
        """Specs this command was meant to finish but did not: interrupted trials, and trials
        held by a live worker (not SLURM jobs this command does not wait for)."""
        out = [o.spec for o in self.outcomes if o.state not in ("finished", "skipped", "failed")]
        if self.waits:  # a queued trial waited for (SLURM --wait re-attaches) has its outcome
            ended = {o.spec.trial_id for o in self.outcomes if o.state in ("finished", "skipped", "failed")}
            out += [spec for spec, _ in self.already_queued if spec.trial_id not in ended]
        return out

    @property
    def disk_errors(self) -> list[tuple[Any, str]]:
        """(spec, what could not be written) for every trial the results directory refused."""
        return [(o.spec, o.disk_error) for o in self.outcomes if getattr(o, "disk_error", "")]

    def disk_paragraph(self, results_dir: Path) -> str:
        """One paragraph on refused writes: what failed, what is recorded, what to do."""
        if not self.disk_errors:
            return ""
        first = self.disk_errors[0][1]
        recorded = [o.spec.label for o in self.outcomes if o.state in ("finished", "skipped")]
        return (f"The results directory {results_dir} refused writes during this sweep ({first}; {len(self.disk_errors)} "
                f"trial(s) affected: {', '.join(s.label for s, _ in self.disk_errors)}). "
                + (f"Recorded in MLflow as finished: {', '.join(recorded)}. " if recorded else "")
                + "Trials that could not be written are recorded as failed where the tracking store allowed it, and the "
                "report was not written. Restore write access or free space, then run the same command again: finished "
                "trials are kept and the others resume.")


def _finished_in_mlflow(tracker, specs, stored: dict[str, tuple[str, str, dict[str, float]]] | None = None) -> dict[str, list[str]]:
    """Trial id -> the code trees of its finished runs (:func:`harness.tracking.run_is_finished`):
    one paged query for the experiment's finished runs rather than one query per trial.
    ``stored``, when given, is filled with trial id -> [(code tree, run id, metrics)] of those
    runs, so a skipped trial can report the numbers it already has.

    A trial with a finished run may also have a live run whose tag says finished but whose
    status does not (a driver killed in that window, before this rule, re-ran the trial in a
    second run): such a leftover is marked superseded here, so the trial has one live run."""
    from harness.tracking import CODE_TREE_TAG, STATUS_TAG, SUPERSEDED_TAG, TRIAL_TAG, run_is_finished

    ids = {s.trial_id for s in specs}
    out: dict[str, list[str]] = {}
    stale: dict[str, list[str]] = {}
    token = None
    while True:
        page = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.`{STATUS_TAG}` = 'finished'",
                                          max_results=5000, page_token=token)
        for run in page:
            tags = run.data.tags
            if tags.get(TRIAL_TAG) not in ids or tags.get(SUPERSEDED_TAG) == "true":
                continue
            if run_is_finished(run):
                out.setdefault(tags[TRIAL_TAG], []).append(tags.get(CODE_TREE_TAG, ""))
                if stored is not None:
                    stored.setdefault(tags[TRIAL_TAG], []).append((tags.get(CODE_TREE_TAG, ""), run.info.run_id, dict(run.data.metrics)))
            else:
                stale.setdefault(tags[TRIAL_TAG], []).append(run.info.run_id)
        token = page.token
        if not token:
            break
    for trial_id, run_ids in stale.items():
        if trial_id in out:  # the trial lock rules out a worker in that window while another run is finished
            for run_id in run_ids:
                tracker.client.set_tag(run_id, SUPERSEDED_TAG, "true")
    return out


def record_system_failure(spec, results_dir: Path, tracker, message: str, parent_run_id: str | None, device: str) -> None:
    """A trial whose worker died records its error like any other failure (error.txt as an
    artifact, status failed) on its one MLflow run (the unfinished run is reused)."""
    from harness.trial import TrialDir

    try:
        path = TrialDir(results_dir, spec).write_error(message + "\n")
    except OSError:  # a read-only / full results directory: MLflow still gets the message
        path = None
    try:
        run_id = tracker.open_trial_run(spec, parent_run_id, device)
        tracker.fail_trial(run_id, path, message)
    except Exception:  # noqa: BLE001 - the tracking store itself may be what failed
        pass


def _anything_queued(results_dir: Path) -> bool:
    from harness.backends.status import collect

    try:
        return any(s.queued for s in collect(results_dir, None))
    except Exception:  # noqa: BLE001 - when unsure, keep the server
        return True


def read_submission(results_dir: Path, trial_id: str) -> dict[str, Any]:
    from harness.backends.worker import SUBMISSION, read_json, trial_root

    return read_json(trial_root(results_dir, trial_id) / SUBMISSION) or {}


def dry_run_states(specs, results_dir: Path, tracker, reuse_older_code: bool = False) -> dict[str, str]:
    """trial_id -> state for ``--dry-run``: the trial dir + MLflow, and the scheduler for
    trials that were submitted to one."""
    from harness.backends.status import collect
    from harness.sweep import trial_state

    statuses = {s.trial_id: s for s in collect(results_dir, None, [sp.trial_id for sp in specs])}
    out = {}
    for spec in specs:
        status = statuses.get(spec.trial_id)
        base = trial_state(spec, results_dir, tracker, reuse_older_code)
        if status is not None and status.queued:
            out[spec.trial_id] = f"{status.state} [{status.backend} job {status.job_id}]" if status.job_id else status.state
        else:
            out[spec.trial_id] = base
    return out


class _Progress:
    """Feeds per-trial progress callbacks from worker messages or heartbeat files."""

    def __init__(self, results_dir: Path, specs_by_id: dict[str, Any], factory) -> None:
        self.results_dir, self.specs, self.factory = results_dir, specs_by_id, factory
        self.fns: dict[str, Callable] = {}
        self.running: set[str] = set()
        self._last_poll = 0.0

    def start(self, trial_id: str) -> None:
        self.running.add(trial_id)
        if self.factory and trial_id not in self.fns:
            self.fns[trial_id] = self.factory(self.specs[trial_id])

    def update(self, trial_id: str, stage: str, done: int, total: int) -> None:
        fn = self.fns.get(trial_id)
        if fn:
            fn(stage, done, total)

    def done(self, trial_id: str) -> None:
        self.running.discard(trial_id)

    def poll_heartbeats(self) -> None:
        if not self.factory or time.monotonic() - self._last_poll < 1.0:
            return
        self._last_poll = time.monotonic()
        from harness.backends.worker import HEARTBEAT, read_json, trial_root

        for trial_id in list(self.running):
            beat = read_json(trial_root(self.results_dir, trial_id) / HEARTBEAT)
            if beat and beat.get("state") == "running" and beat.get("stage"):
                self.update(trial_id, beat["stage"], int(beat.get("done") or 0), int(beat.get("total") or 0))


def run_sweep(specs, results_dir: Path, tracking_uri: str, options: BackendOptions, device: str = "cpu", force: bool = False,
              parent_run_id: str | None = None, progress_factory=None, on_outcome=None, log: Callable[[str], None] = print,
              reuse_older_code: bool = False, tracker=None) -> SweepResult:
    """Run (or submit) every trial of a sweep on the chosen backend; see the module doc.

    ``tracker``: the caller's :class:`harness.tracking.Tracker` on ``tracking_uri`` for the
    specs' suite (the one object the driver tracks through; built here when None). Workers in
    other processes, and the driver once a tracking server fronts the store, reach MLflow by
    URI: an object cannot cross a process."""
    from harness.backends import worker as W
    from harness.backends.status import collect, write_submission
    from harness.sweep import TrialOutcome
    from harness.tracking import Tracker
    from harness.trial import TrialDir

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    results_dir = Path(results_dir).resolve()
    result = SweepResult(waits=not (options.backend == "slurm" and not options.wait))
    by_id = {s.trial_id: s for s in specs}
    outcomes: dict[str, Any] = {}

    def emit(outcome) -> None:
        outcomes[outcome.spec.trial_id] = outcome
        if on_outcome:
            on_outcome(outcome)

    # 1. leave alone what is queued or running right now (never two workers on one trial)
    live = [s for s in collect(results_dir, None, list(by_id), query_scheduler=True) if s.queued]
    if live and force:
        where = ", ".join(f"{s.trial_id} ({s.backend or 'local'} job {s.job_id})" if s.job_id else s.trial_id for s in live)
        raise ConfigError(f"--force would restart trials that are queued or running right now: {where}. Cancel them first "
                          "(`scancel <job id>` for SLURM jobs), or wait for them to end.")
    attach = []
    if options.backend == "slurm" and options.wait:
        from harness.backends.slurm import Submitted

        for status in live:
            if status.backend == "slurm" and status.job_id:
                sub = read_submission(results_dir, status.trial_id)
                attach.append(Submitted(status.job_id, [{"trial_id": status.trial_id, "submitted_at": sub.get("submitted_at")}],
                                        Path(sub.get("folder") or results_dir)))
    for status in live:
        result.already_queued.append((by_id[status.trial_id], f"{status.backend} job {status.job_id}" if status.job_id else "a live local worker"))
    todo = [s for s in specs if s.trial_id not in {st.trial_id for st in live}]

    # 2. finished trials are skipped (or, with --force, superseded and cleared here, once)
    if tracker is None and specs:
        tracker = Tracker(tracking_uri, specs[0].suite)
    def supersede(spec) -> None:
        tracker.supersede(spec.trial_id)
        TrialDir(results_dir, spec).clear()
        for name in (W.OUTCOME, W.HEARTBEAT, W.SUBMISSION):
            (W.trial_root(results_dir, spec.trial_id) / name).unlink(missing_ok=True)

    if force:
        for spec in todo:
            supersede(spec)
    else:
        from harness.tracking import current_code_tree, same_code

        stored: dict[str, list[tuple[str, str, dict[str, float]]]] = {}
        finished = _finished_in_mlflow(tracker, todo, stored) if todo else {}
        current = current_code_tree() if finished else ""
        older = {s.trial_id for s in todo if s.trial_id in finished and not reuse_older_code
                 and not any(same_code(tree, current) for tree in finished[s.trial_id])}
        for spec in todo:
            if spec.trial_id in finished and spec.trial_id not in older:
                # the stored numbers of the run that counts (same code tree first), not "-" and time 0
                runs = sorted(stored.get(spec.trial_id, []), key=lambda r: not same_code(r[0], current))
                run_id, metrics = (runs[0][1], runs[0][2]) if runs else (None, {})
                emit(TrialOutcome(spec, "skipped", metrics=metrics, run_id=run_id))
            elif spec.trial_id in older:  # as --force, for this trial only: the old run stays, marked superseded
                log(f"{spec.label} ({spec.trial_id}) finished with older code (code tree {', '.join(sorted(set(finished[spec.trial_id])))}; "
                    f"now {current}): re-running it; its old run is kept, marked superseded (--reuse-older-code keeps it instead)")
                supersede(spec)
        todo = [s for s in todo if s.trial_id not in finished or s.trial_id in older]

    if todo or attach:
        options.preflight(device)
    server = None
    started_server = False
    try:
        worker_uri = tracking_uri
        if (todo or attach) and options.parallel_writers and not tracking_uri.startswith(("http://", "https://")):
            from harness.mlflow_server import ensure_server

            # SLURM jobs outlive the driver (kill -9 included), with --wait too: so does their server
            detach = options.backend == "slurm"
            server, started_server = ensure_server(results_dir, tracking_uri, detach=detach)
            worker_uri = server.uri
            log(f"MLflow tracking server {server.uri} ({'reused' if not started_server else 'started'}; store {tracking_uri})")
        result.worker_uri = worker_uri
        driver_tracker = (tracker if worker_uri == tracking_uri else Tracker(worker_uri, specs[0].suite)) if (todo or attach) else None
        progress = _Progress(results_dir, by_id, progress_factory)
        for spec in todo:
            TrialDir(results_dir, spec)  # spec.json now: `status` lists queued trials before any worker starts
        tasks = [W.make_task(spec, results_dir, worker_uri, device, parent_run_id, options.backend, options.plugins) for spec in todo]

        def finish(data: dict[str, Any]) -> None:
            spec = by_id[data["trial_id"]]
            progress.done(spec.trial_id)
            outcome = W.outcome_from_dict(spec, data)
            if data.get("system_failure"):
                record_system_failure(spec, results_dir, driver_tracker, outcome.error, parent_run_id, device)
            emit(outcome)

        if not tasks and not attach:
            pass
        elif options.backend == "local" and options.max_parallel == 1:
            for task in tasks:
                progress.start(task["trial_id"])
                fn = progress.fns.get(task["trial_id"])
                finish(W.run_trial(dict(task, device=device, backend="local", threads=options.cpus_per_trial),
                                   job_id=f"local-{os.getpid()}", progress=fn))
        elif options.backend == "local":
            from harness.backends.local import plan_slots, run_pool

            slots = plan_slots(options.max_parallel, device, options.devices, options.gpus_per_trial, options.cpus_per_trial)
            log(f"Local pool: {len(slots)} worker(s): " + ", ".join(f"{s.label}, {s.threads} thread(s)" for s in slots))
            run_pool(tasks, slots, on_start=lambda t: progress.start(t["trial_id"]),
                     on_progress=lambda tid, stage, done, total: progress.update(tid, stage, done, total), on_done=finish)
        elif options.backend == "ray":
            from harness.backends.ray_backend import run_ray

            gpus = options.gpus_per_trial if options.gpus_per_trial is not None else (1 if device.startswith("cuda") else 0)
            run_ray(tasks, options.ray_address, float(options.cpus_per_trial or 1), float(gpus), options.ray_max_retries,
                    num_cpus=options.ray_num_cpus, on_start=lambda t: progress.start(t["trial_id"]), on_done=finish,
                    poll=progress.poll_heartbeats)
        elif options.backend == "slurm":
            from harness.backends import slurm

            if device.startswith("cuda") and not options.slurm.gpus_per_trial:
                options.slurm.gpus_per_trial = 1
            submitted: list = []
            if tasks:
                folder = results_dir / "slurm" / time.strftime("%Y%m%d-%H%M%S")
                submitted = slurm.submit(tasks, options.slurm, folder)
                for sub in submitted:
                    for task in sub.tasks:
                        write_submission(results_dir, task["trial_id"], "slurm", sub.job_id, str(folder), task["submitted_at"])
                        result.submitted.append((by_id[task["trial_id"]], sub.job_id))
                log(f"Submitted {len(tasks)} trial(s) as {len(submitted)} SLURM job(s) "
                    f"({submitted[0].job_id.split('_')[0] if submitted else '-'}); logs in {folder}")
            if options.wait:
                waiting = submitted + attach
                if attach:
                    log(f"Waiting also for {len(attach)} trial(s) queued earlier: " + ", ".join(f"job {a.job_id}" for a in attach))
                for sub in waiting:
                    for task in sub.tasks:
                        progress.start(task["trial_id"])
                try:
                    slurm.wait_jobs(waiting, results_dir, on_done=finish, poll=progress.poll_heartbeats)
                except KeyboardInterrupt:
                    slurm.cancel(sub.job_id for sub in submitted)
                    log("Cancelled the SLURM jobs this command submitted; finished trials and stages are kept.")
                    raise
                result.submitted = []
        else:  # pragma: no cover - from_args validated the name
            raise ConfigError(f"unknown backend {options.backend}")
    finally:
        if server is not None and started_server and not server.detached:
            server.stop()
        elif server is not None and server.detached:
            if options.backend == "slurm" and not result.submitted and not _anything_queued(results_dir):
                server.stop()  # kept only for queued jobs: none is left
                log(f"Stopped the MLflow tracking server {server.uri}: no queued or running trial is left to log through it.")
            else:
                result.server = server
    result.outcomes = [outcomes[s.trial_id] for s in specs if s.trial_id in outcomes]
    return result


__all__ = ["BACKENDS", "BackendOptions", "SweepResult", "run_sweep", "dry_run_states", "record_system_failure"]
