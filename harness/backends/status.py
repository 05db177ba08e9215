"""Each trial's state from every source at once: the trial directory (finished stages), its
worker files (heartbeat, outcome, submission), the scheduler (SLURM via sacct / squeue) and
MLflow. Used by ``wsss-bench status``, ``--dry-run`` and the resubmission check (a trial
whose job is still queued or running is never submitted twice)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from harness.backends.worker import HEARTBEAT, HEARTBEAT_S, OUTCOME, SUBMISSION, lock_held, read_json
from harness.trial import STAGES

STALE_AFTER_S = max(60.0, 6 * HEARTBEAT_S)


@dataclass
class TrialStatus:
    trial_id: str
    spec: dict[str, Any]
    stages_done: list[str] = field(default_factory=list)
    mlflow: str | None = None  # wsss.status tag of the live run: running / finished / failed / interrupted
    backend: str | None = None
    job_id: str | None = None
    scheduler: str | None = None  # SLURM state
    heartbeat: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    running_here: bool = False  # a process on this machine holds the trial's lock
    error: str = ""

    @property
    def method(self) -> str:
        return str(self.spec.get("method", "?"))

    @property
    def seed(self) -> str:
        return str(self.spec.get("seed", "?"))

    @property
    def suite(self) -> str:
        return str(self.spec.get("suite", "?"))

    @property
    def next_stage(self) -> str | None:
        return next((s for s in STAGES if s not in self.stages_done), None)

    @property
    def heartbeat_age(self) -> float | None:
        if not self.heartbeat or not self.heartbeat.get("updated"):
            return None
        return max(0.0, time.time() - float(self.heartbeat["updated"]))

    @property
    def queued(self) -> bool:
        """Queued or running on a scheduler (or on this machine) right now."""
        from harness.backends.slurm import ACTIVE_STATES

        return self.running_here or (self.scheduler in ACTIVE_STATES)

    @property
    def state(self) -> str:
        nxt = self.next_stage
        beat = self.heartbeat or {}
        where = f"stage {beat.get('stage')}" + (f" {beat.get('done')}/{beat.get('total')}" if beat.get("total") else "") if beat.get("stage") else "starting"
        age = self.heartbeat_age
        age_text = f", heartbeat {age:.0f}s ago" if age is not None else ""
        if self.mlflow == "finished" and nxt is None:
            return "finished"
        if self.scheduler in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"):
            suffix = f", resumes at {nxt}" if self.stages_done and nxt else ""
            return f"queued ({self.scheduler}{suffix})"
        if self.scheduler == "RUNNING" or self.running_here:
            if beat.get("state") == "running" and age is not None and age > STALE_AFTER_S and not self.running_here:
                return f"running? (no heartbeat for {age:.0f}s; {where})"
            return f"running ({where}{age_text})"
        if self.scheduler in ("SUSPENDED", "STOPPED", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "RESV_DEL_HOLD", "SPECIAL_EXIT"):
            return f"{self.scheduler.lower()} ({where})"
        if beat.get("state") == "running":  # a heartbeat file says running, but nobody runs it
            scheduler = f"SLURM {self.scheduler}" if self.scheduler else "no live worker"
            return f"dead ({scheduler}; last heartbeat {age:.0f}s ago at {where}), resumes at {nxt}" if age is not None else f"dead, resumes at {nxt}"
        if self.mlflow == "failed" or (self.outcome or {}).get("state") == "failed":
            return "failed"
        if nxt is None:
            return "finished (not yet in MLflow)"
        if self.stages_done:
            return f"partial, resumes at {nxt}"
        if self.scheduler:
            return f"not run (SLURM {self.scheduler})"
        return "new"


def mlflow_states(tracking_uri: str, suites: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
    """trial_id -> (wsss.status tag, error) of its live (not superseded) run; a finished run wins."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import EXPERIMENT_PREFIX, STATUS_TAG, TRIAL_TAG, run_is_finished, store_lock

    with store_lock(tracking_uri):  # never query a store another process is creating
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    wanted = {EXPERIMENT_PREFIX + s for s in suites} if suites else None
    experiments = [e for e in client.search_experiments(max_results=1000) if e.name.startswith(EXPERIMENT_PREFIX) and (wanted is None or e.name in wanted)]
    out: dict[str, tuple[str, str]] = {}
    if not experiments:
        return out
    token = None
    while True:
        page = client.search_runs([e.experiment_id for e in experiments], max_results=5000, page_token=token)
        for run in page:
            tags = run.data.tags
            trial = tags.get(TRIAL_TAG)
            if not trial or tags.get("wsss.superseded") == "true":
                continue
            status = tags.get(STATUS_TAG, "?")
            if status == "finished" and not run_is_finished(run):  # the one rule: tag and run status together
                status = "running"
            if out.get(trial, ("",))[0] != "finished":
                out[trial] = (status, tags.get("wsss.error", ""))
        token = page.token
        if not token:
            break
    return out


def collect(results_dir: Path, tracking_uri: str | None, trial_ids: Iterable[str] | None = None, suites: Iterable[str] | None = None,
            query_scheduler: bool = True) -> list[TrialStatus]:
    trials_dir = Path(results_dir) / "trials"
    ids = list(trial_ids) if trial_ids is not None else sorted(p.name for p in trials_dir.glob("*") if (p / "spec.json").exists())
    statuses: list[TrialStatus] = []
    for tid in ids:
        root = trials_dir / tid
        spec = read_json(root / "spec.json") or {}
        if suites and spec.get("suite") not in set(suites):
            continue
        state = read_json(root / "state.json") or {}
        status = TrialStatus(tid, spec, [s for s in STAGES if s in state.get("stages", {})])
        status.heartbeat = read_json(root / HEARTBEAT)
        status.outcome = read_json(root / OUTCOME)
        submission = read_json(root / SUBMISSION) or {}
        status.backend, status.job_id = submission.get("backend"), submission.get("job_id")
        status.running_here = root.exists() and lock_held(root)
        statuses.append(status)
    if query_scheduler:
        slurm_ids = [s.job_id for s in statuses if s.backend == "slurm" and s.job_id]
        if slurm_ids:
            from harness.backends.slurm import job_states

            states = job_states(slurm_ids)
            for s in statuses:
                if s.backend == "slurm" and s.job_id:
                    s.scheduler = states.get(s.job_id)
    if tracking_uri:
        from harness.tracking import check_store_file

        check_store_file(tracking_uri)  # a corrupt store is one clear error, not "finished (not yet in MLflow)"
        try:
            runs = mlflow_states(tracking_uri, suites)
        except Exception as exc:  # noqa: BLE001 - status must still show what it knows
            runs = {}
            for s in statuses:
                s.error = f"MLflow unavailable: {exc}"
        for s in statuses:
            if s.trial_id in runs:
                s.mlflow, err = runs[s.trial_id]
                s.error = s.error or err
    for s in statuses:
        if not s.error and s.outcome and s.outcome.get("state") == "failed":
            s.error = s.outcome.get("error") or ""
    return statuses


def write_submission(results_dir: Path, trial_id: str, backend: str, job_id: str, folder: str | None = None,
                     submitted_at: float | None = None) -> None:
    from harness.backends.worker import trial_root, write_json

    write_json(trial_root(results_dir, trial_id) / SUBMISSION,
               {"backend": backend, "job_id": job_id, "folder": folder, "submitted_at": submitted_at or time.time()})


def summary_json(statuses: list[TrialStatus]) -> str:
    return json.dumps([{"trial_id": s.trial_id, "method": s.method, "seed": s.seed, "state": s.state, "job_id": s.job_id,
                        "scheduler": s.scheduler, "mlflow": s.mlflow, "stages_done": s.stages_done} for s in statuses], indent=2)
