"""MLflow tracking through ``MlflowClient`` with explicit run ids (the fluent API is not
thread-safe). One experiment per suite (``wsss-bench/<suite>``), one parent run per sweep,
one nested run per trial.

Metric schema (all mIoU values in percent; ``*_gt`` / ``*_present`` name the averaging
convention, the unsuffixed name uses the suite's default, "present"):

=========================  ===================================================================
``cam_miou``               CAM mIoU at the sweep's best background threshold (an oracle: the
                           threshold is picked with train pixel labels), cam-eval split
``cam_best_threshold``     that threshold (``cam_threshold_start`` / ``_stop``: the range swept)
``cam_miou_fixed``         CAM mIoU at the method's own threshold (not an oracle), else the
                           suite's; ``cam_fixed_threshold`` is the one used
``cam_curve``              CAM mIoU per threshold, logged with step = round(100 * threshold)
``mask_miou``              pseudo-mask mIoU on the cam-eval images (``mask_miou_ignore255``:
                           pseudo-mask 255 pixels not scored; ``mask_ignored_pct``: their share)
``val_miou_ss``            val mIoU, single scale
``val_miou_ms``            val mIoU, the method's multi-scale + flip protocol
``val_miou_ms_crf``        the same followed by dense CRF
``iou_<what>/<class>``     per-class IoU for what in cam, mask, val_ss, val_ms, val_ms_crf
``time_<stage>_s``         wall time per stage (``cpu_<stage>_s`` process CPU time);
                           ``time_total_s`` their sum
``peak_rss_<stage>_mb``    peak resident memory of the process by the end of the stage
                           (``peak_gpu_<stage>_mb`` CUDA peak within the stage)
``params_<net>``           parameters per network, ``params_total``
``gmacs_<net>``            GMACs of one forward pass at the benchmark input size, ``gmacs_total``
=========================  ===================================================================

Tags: ``wsss.trial_id``, ``wsss.method``, ``wsss.dataset``, ``wsss.suite``, ``wsss.seed``,
``wsss.status`` (running / finished / failed), ``wsss.code_version``, ``wsss.git_commit``, ``wsss.code_tree``,
``wsss.torch``, ``wsss.timm``, ``wsss.hardware``, ``wsss.stage_status`` (e.g. train_seg=fused).
``wsss.lib.<library>`` (result-deciding library versions) and ``wsss.env`` (their hash): see
harness/environment.py.
Params: the resolved trial config flattened (``method.*``, ``dataset.*``, ``eval.*``, ``seed``);
a value over MLflow's 6000-character limit is cut and ends in :data:`CUT_MARK`, and the full
resolved config is the run's ``spec.json`` artifact (logged when the run is created).

One rule decides "finished" everywhere (:func:`run_is_finished`): the ``wsss.status`` tag
*and* the MLflow run status both say finished. They are two writes, so a kill between them
leaves a run that is not finished by this rule, and the next run of the trial reuses it.
A finished run counts for the current code only when its ``wsss.code_tree`` is the code tree
running now (:func:`same_code`); otherwise it is "finished with older code".
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from harness.config import TrialSpec
from harness.environment import environment_tags
from harness.errors import TrackingError

EXPERIMENT_PREFIX = "wsss-bench/"
STATUS_TAG = "wsss.status"
TRIAL_TAG = "wsss.trial_id"
CODE_TREE_TAG = "wsss.code_tree"
SUPERSEDED_TAG = "wsss.superseded"
PARAM_LIMIT = 6000  # MLflow's longest param value (characters)
CUT_MARK = "...[cut at 6000 characters; the full value is in the run's spec.json artifact]"
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def run_is_finished(run: Any) -> bool:
    """The one rule for a finished trial run: live (not superseded), ``wsss.status`` tag
    finished and MLflow status FINISHED. Anything else is unfinished and gets reused."""
    tags = run.data.tags
    return tags.get(STATUS_TAG) == "finished" and run.info.status == "FINISHED" and tags.get(SUPERSEDED_TAG) != "true"


def same_code(run_tree: str | None, current: str) -> bool:
    """Whether a run's ``wsss.code_tree`` is the code running now. An unknown tree on either
    side (no git checkout, a run from before the tag existed) cannot be told apart: same."""
    unknown = (None, "", "unknown")
    return run_tree in unknown or current in unknown or run_tree == current


def hold_point(name: str) -> None:
    """Test hook for kill windows: when ``WSSS_TEST_HOLD`` names this point, create
    ``$WSSS_TEST_HOLD_DIR/<name>.reached`` and block until ``<name>.release`` appears (the
    test kills the process meanwhile, or releases it). Once per process; a no-op otherwise."""
    if os.environ.get("WSSS_TEST_HOLD") != name or name in _HELD:
        return
    _HELD.add(name)
    folder = Path(os.environ.get("WSSS_TEST_HOLD_DIR", "."))
    (folder / f"{name}.reached").write_text(str(os.getpid()))
    while not (folder / f"{name}.release").exists():
        time.sleep(0.05)


_HELD: set[str] = set()


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_store_file(uri: str) -> None:
    """A file at an SQLite URI that is not an SQLite database (corrupt, overwritten) is one
    clear TrackingError naming it, not an SQLAlchemy traceback. An empty file is a new store."""
    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return
    try:
        with open(db, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise TrackingError(f"MLflow store {db} cannot be read ({exc.strerror}).") from None
    if head and head != SQLITE_MAGIC:
        raise TrackingError(f"MLflow store {db} is not an SQLite database (it does not start with the SQLite header; it may be "
                            "corrupt or overwritten by another file). Nothing was run. Move it away (keep it: it may be "
                            "recoverable, e.g. from a backup) to start a new store in its place, or pass --results / "
                            "--tracking-uri of a healthy store.")


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise creating / migrating an SQLite store across processes: two drivers started at
    once on a new results directory would otherwise both run MLflow's schema migrations.
    An flock on ``.<db name>.lock`` next to the database; other URIs need none."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(db.parent / f".{db.name}.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:  # a read-only directory: no process can create or migrate a store there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def default_tracking_uri(results_dir: Path) -> str:
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str, create: bool = True) -> None:
    """Fail early, with a clear message, on a store that cannot be used. ``create=False``
    (reading, ``--dry-run``): a missing SQLite directory is not created; the nearest existing
    folder above it must be writable instead."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        parent = db.parent
        if not parent.exists() and not create:
            while not parent.exists():
                parent = parent.parent
            if not _writable(parent):
                raise TrackingError(f"Tracking URI {uri}: {parent} is not writable. Choose another --tracking-uri or results directory.")
            return
        if not parent.exists():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrackingError(f"Tracking URI {uri}: cannot create directory {parent} ({exc.strerror}).") from None
        if db.exists() and not _writable(db) or not _writable(parent):
            raise TrackingError(f"Tracking URI {uri}: {db if db.exists() else parent} is not writable. Choose another --tracking-uri or results directory.")
        check_store_file(uri)
    elif uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"Tracking server {uri} is unreachable ({reason}). Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000 "
                f"--backend-store-uri sqlite:///mlflow.db`), or drop --tracking-uri / MLFLOW_TRACKING_URI to use the local SQLite store."
            ) from None
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"Tracking URI {uri!r}: the MLflow file store is deprecated; use sqlite:///path/to/mlflow.db or an http:// tracking server.")


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


# The directories whose content decides a trial's numbers: a commit that touches only tests,
# docs or reports leaves ``wsss.code_tree`` unchanged, so the report keeps averaging over it.
RESULT_CODE = ("harness", "methods")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5).stdout.strip()


def code_version() -> dict[str, str]:
    """Provenance tags: ``wsss.git_commit`` (HEAD, ``-dirty`` with local changes) and
    ``wsss.code_tree``, a hash of the git trees of :data:`RESULT_CODE` (``-dirty`` when those
    have uncommitted changes): the version the leaderboard groups runs by."""
    import timm
    import torch

    from harness import __version__

    commit, tree = _code_provenance()
    return {"wsss.code_version": __version__, "wsss.git_commit": commit, CODE_TREE_TAG: tree,
            "wsss.torch": torch.__version__, "wsss.timm": timm.__version__}


def current_code_tree() -> str:
    """The ``wsss.code_tree`` of the code running now, as :func:`code_version` tags runs."""
    return code_version()[CODE_TREE_TAG]


def _code_provenance() -> tuple[str, str]:
    """(git commit, code tree) of this checkout; "unknown" outside git."""
    import hashlib

    commit, tree = "unknown", "unknown"
    try:
        repo = Path(__file__).resolve().parents[1]
        commit = _git(repo, "rev-parse", "HEAD") or "unknown"
        if commit != "unknown":
            if _git(repo, "status", "--porcelain", "--untracked-files=no"):
                commit += "-dirty"
            trees = _git(repo, "rev-parse", *(f"HEAD:{d}" for d in RESULT_CODE))
            if trees:
                tree = hashlib.sha1(trees.encode()).hexdigest()[:12]
                if _git(repo, "status", "--porcelain", "--untracked-files=no", "--", *RESULT_CODE):
                    tree += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return commit, tree


def hardware(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu {platform.processor() or platform.machine()} x{__import__('os').cpu_count()}"


def flatten(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(name, value))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class EmptyStore:
    """What a tracking store that does not exist yet answers (no runs): ``--dry-run`` reads
    trial states through it instead of creating the store."""

    def finished_run(self, trial_id: str, code_tree: str | None = None) -> str | None:
        return None

    def trial_status(self, trial_id: str) -> str | None:
        return None


def tracker_for_reading(uri: str, suite: str) -> "Tracker | EmptyStore":
    """A :class:`Tracker` on ``uri``, or an :class:`EmptyStore` when ``uri`` is a SQLite
    store whose file does not exist (reading must not create it)."""
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        check_tracking_uri(uri, create=False)  # a bad URI is still an error; nothing is created
        return EmptyStore()
    return Tracker(uri, suite)


class Tracker:
    """One suite's experiment in one tracking store."""

    def __init__(self, uri: str, suite: str) -> None:
        check_tracking_uri(uri)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.experiment_name = EXPERIMENT_PREFIX + suite
        try:
            with store_lock(uri):  # the first query creates / migrates the schema: one process at a time
                self.client = MlflowClient(tracking_uri=uri)
                experiment = self.client.get_experiment_by_name(self.experiment_name)
                self.experiment_id = experiment.experiment_id if experiment else self._create_experiment()
        except TrackingError:
            raise
        except OSError as exc:
            raise TrackingError(f"Tracking store {uri} cannot be used: {exc.strerror or exc} ({exc.filename or uri}).") from None
        except Exception as exc:  # MLflow raises many types for a bad store
            raise TrackingError(f"Tracking store {uri} cannot be used: {exc}") from None

    def _create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        location = None
        if self.uri.startswith("sqlite:///"):
            # Artifacts next to the database (not in ./mlruns of whatever the working directory
            # is), the same place a tracking server over this database serves them from.
            slug = self.experiment_name.replace("/", "_")
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts" / slug).resolve().as_uri()
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=location)
        except MlflowException:  # created concurrently by another process
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    # -- queries ---------------------------------------------------------------------------
    def live_runs(self, trial_id: str) -> list[Any]:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=100)
        return [r for r in runs if r.data.tags.get(SUPERSEDED_TAG) != "true"]

    def finished_run(self, trial_id: str, code_tree: str | None = None) -> str | None:
        """The trial's finished run (:func:`run_is_finished`); with ``code_tree``, only one
        that code tree produced (:func:`same_code`)."""
        for run in self.live_runs(trial_id):
            if run_is_finished(run) and (code_tree is None or same_code(run.data.tags.get(CODE_TREE_TAG), code_tree)):
                return run.info.run_id
        return None

    def trial_status(self, trial_id: str) -> str | None:
        runs = self.live_runs(trial_id)
        return runs[0].data.tags.get(STATUS_TAG) if runs else None

    # -- runs ------------------------------------------------------------------------------
    def sweep_run(self, key: str, description: str) -> str:
        """The parent run of a sweep, reused when the same sweep is run again."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`wsss.sweep_key` = '{key}'", max_results=1)
        if runs:
            run_id = runs[0].info.run_id
            self._update_sweep(run_id, "RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=f"sweep-{key[:8]}", tags={"wsss.sweep_key": key, "wsss.kind": "sweep", "mlflow.note.content": description})
        return run.info.run_id

    def close_sweep(self, run_id: str, states: list[str] | None, status: str | None = None) -> None:
        """End a sweep's parent run so the MLflow UI does not show it running forever.

        ``states`` are the trials' end states (None when the sweep stopped before reporting
        them); the run is FAILED when any trial failed, else FINISHED, unless ``status`` says
        otherwise (KILLED on Ctrl-C). Trials still queued on SLURM leave the parent RUNNING: the
        caller does not close it then.
        """
        counts = {state: states.count(state) for state in ("finished", "failed", "skipped")} if states is not None else {}
        self._update_sweep(run_id, status or ("FAILED" if counts.get("failed") else "FINISHED"), counts)

    def _update_sweep(self, run_id: str, status: str, counts: dict[str, int] | None = None) -> None:
        """The parent run's status and trial counts are bookkeeping: a store that refuses the
        write (e.g. its database file deleted under a long-lived process) must not fail a sweep
        whose trials are recorded; say so instead."""
        try:
            for state, count in (counts or {}).items():
                self.client.log_metric(run_id, f"trials_{state}", count)
            if status == "RUNNING":
                self.client.update_run(run_id, status=status)
            else:
                self.client.set_terminated(run_id, status=status)  # also records the end time
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad store
            print(f"warning: could not set sweep run {run_id} to {status} in {self.uri}: {exc}")

    def open_trial_run(self, spec: TrialSpec, parent_run_id: str | None, device: str) -> str:
        """Reuse the trial's unfinished run if there is one (no duplicates), else create it.

        Unfinished means anything :func:`run_is_finished` rejects, a run killed between its
        finished tag and its FINISHED status included. Reuse completes what an interrupted
        creation left out: the params not yet logged and the ``spec.json`` artifact. Further
        unfinished live runs of the trial (left by older versions) are marked superseded, so
        the trial has one live run."""
        unfinished = [r for r in self.live_runs(spec.trial_id) if not run_is_finished(r)]
        if unfinished:
            unfinished.sort(key=lambda r: r.info.start_time or 0)
            run, extra = unfinished[-1], unfinished[:-1]
            for other in extra:
                self.client.set_tag(other.info.run_id, SUPERSEDED_TAG, "true")
            run_id = run.info.run_id
            self.client.set_tag(run_id, STATUS_TAG, "running")
            self.client.update_run(run_id, status="RUNNING")
            params = trial_params(spec)
            self.log_params(run_id, {k: v for k, v in params.items() if k not in run.data.params})
            self._log_spec(run_id, spec)
            return run_id
        tags = {
            TRIAL_TAG: spec.trial_id,
            "wsss.method": spec.method,
            "wsss.dataset": spec.dataset,
            "wsss.suite": spec.suite,
            "wsss.seed": str(spec.seed),
            STATUS_TAG: "running",
            "wsss.hardware": hardware(device),
            **code_version(),
            **environment_tags(device),  # wsss.lib.<library> versions and their hash wsss.env
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{spec.method}-{spec.dataset}-s{spec.seed}-{spec.trial_id[:6]}", tags=tags)
        run_id = run.info.run_id
        hold_point("trial.created")  # tests: a kill between creation and params
        self.log_params(run_id, trial_params(spec))
        self._log_spec(run_id, spec)
        return run_id

    def _log_spec(self, run_id: str, spec: TrialSpec) -> None:
        """The full resolved config (the trial's identity, never cut) as ``spec.json``: the
        same bytes as the trial directory's spec.json, which finish_trial logs over it."""
        text = json.dumps(spec.to_dict(), indent=2, sort_keys=True, default=str)
        try:
            self.client.log_text(run_id, text, "spec.json")
        except Exception as exc:  # noqa: BLE001 - an artifact store that refuses (full disk): the reuse logs it again
            print(f"warning: could not log spec.json to run {run_id}: {exc}")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_value(v)) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.log_metric_points(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_metric_points(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(s)) for k, v, s in points]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def finish_trial(self, run_id: str, result: Any, trial_root: Path) -> None:
        """Log a finished trial's metrics, curves and artifacts, then mark it finished."""
        self.log_metrics(run_id, result.metrics)
        for record in result.records.values():
            for name, curve in record.curves.items():
                self.log_metric_points(run_id, [(name, y, round(x * 100)) for x, y in curve])
        stage_status = ",".join(f"{k}={v.status}" for k, v in result.records.items())
        self.client.set_tag(run_id, "wsss.stage_status", stage_status)
        for name in ("spec.json", "state.json"):
            if (trial_root / name).exists():
                self.client.log_artifact(run_id, str(trial_root / name))
        gallery = trial_root / "gallery"
        if gallery.is_dir() and any(gallery.iterdir()):
            self.client.log_artifacts(run_id, str(gallery), artifact_path="gallery")
        self.client.set_tag(run_id, STATUS_TAG, "finished")
        hold_point("trial.finished_tag")  # tests: a kill between the tag and the run status
        self.client.set_terminated(run_id, status="FINISHED")

    def fail_trial(self, run_id: str, error_path: Path | None, message: str) -> None:
        """Mark the run failed with ``message``; ``error_path`` (the traceback file) is logged
        when there is one (None when the results directory could not be written)."""
        self.client.set_tag(run_id, "wsss.error", message[:5000])
        if error_path is not None:
            self.client.log_artifact(run_id, str(error_path))
        self.client.set_tag(run_id, STATUS_TAG, "failed")
        self.client.set_terminated(run_id, status="FAILED")

    def supersede(self, trial_id: str) -> None:
        """``--force``: keep the old runs (nothing recorded is lost) but hide them from reports."""
        for run in self.live_runs(trial_id):
            self.client.set_tag(run.info.run_id, SUPERSEDED_TAG, "true")


def trial_params(spec: TrialSpec) -> dict[str, str]:
    """The params of a trial's run: the resolved config, flattened."""
    params = {"suite": spec.suite, "seed": str(spec.seed), "dataset": spec.dataset, "data_root": str(spec.data_root)}
    params.update(flatten("method", spec.method_config))
    params.update(flatten("dataset", spec.dataset_options))
    params.update(flatten("splits", spec.splits))
    params.update(flatten("eval", spec.eval))
    return params


def param_value(value: str) -> str:
    """``value`` as MLflow stores it: at most :data:`PARAM_LIMIT` characters; a longer value
    is cut so that it ends in :data:`CUT_MARK` (never silently)."""
    if len(value) <= PARAM_LIMIT:
        return value
    return value[: PARAM_LIMIT - len(CUT_MARK)] + CUT_MARK
