"""MLflow -> one tidy runs frame: the single contract between running and reporting.

Everything after this module (``leaderboard`` and the renderers) reads only the frame that
:func:`fetch_runs` returns, plus the metric histories (:func:`fetch_curves`) and gallery
artifacts (:func:`fetch_gallery`) it names by ``run_id``. A test or another store can build
the same frame by hand (tests/test_report.py does).

The runs frame: one row per live (not superseded) trial run, columns

==================  ==========================================================================
``experiment``      the MLflow experiment name (``wsss-bench/<suite>`` for ours)
``run_id``          the MLflow run id
``suite, dataset``  tags ``wsss.suite`` (else the experiment name) and ``wsss.dataset``
``method``          tag ``wsss.method``
``seed``            int (tag ``wsss.seed``; -1 when unreadable)
``trial_id``        tag ``wsss.trial_id`` (a run without it is not a trial and is not listed)
``status``          ``finished`` only when the tag says so *and* MLflow closed the run
                    FINISHED; else ``running``, ``failed``, ``unfinished (run ...)``,
                    ``died (...)`` ...
``code_version``    tag ``wsss.code_tree`` (the hash of harness/ + methods/), else
                    ``wsss.git_commit``, else ``unknown``; ``-dirty`` for uncommitted trees
``package_version`` tag ``wsss.code_version``
``hardware``        tag ``wsss.hardware`` ('' when not recorded)
``env, versions``   tag ``wsss.env`` (hash of the result-deciding library versions) and those
                    versions as text (harness/environment.py)
``error``           tag ``wsss.error`` of a failed trial
``stage_status``    tag ``wsss.stage_status``
``segmentation``    ``common`` (harness/common_seg.py) or ``own``
``refine``          param ``eval.refine``: ``irn`` (pseudo masks from IRN, harness/refine.py)
                    or ``none`` (the method's own; also for runs older than the option)
``config``          JSON text: the run's ``method.*``, ``dataset.*``, ``eval.*`` and
                    ``splits.*`` params, sorted (what decides the row's variant)
``random_init``     bool: real data and a ``*pretrained`` method param left None
``data_root``       param ``data_root`` as logged (``None`` for generated data)
``start_time``,     MLflow epoch milliseconds (0 when absent)
``end_time``
*every metric*      float, one column per logged metric (``val_miou_ss``, ``time_<stage>_s``,
                    ``iou_<what>/<class>``, ...); NaN where a run lacks it
==================  ==========================================================================

``frame.attrs``: ``tracking_uri`` and ``selection`` (the words for what was asked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from harness.environment import ENV_TAG, versions_text
from harness.errors import ConfigError, TrackingError, unknown
from harness.tracking import EXPERIMENT_PREFIX, STATUS_TAG, TRIAL_TAG


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def store_suites(tracking_uri: str) -> list[str]:
    """Names of the wsss-bench suites (experiments) in the store."""
    client = _client(tracking_uri)
    return sorted(e.name[len(EXPERIMENT_PREFIX):] for e in client.search_experiments() if e.name.startswith(EXPERIMENT_PREFIX))


def fetch_runs(
    tracking_uri: str,
    suites: list[str] | None = None,
    experiments: list[str] | None = None,
    filter_string: str | None = None,
) -> pd.DataFrame:
    """Every live (not superseded) trial run, one row per run with tags, config and metrics.

    ``suites``: wsss-bench suite names (experiment ``wsss-bench/<suite>``); ``experiments``:
    full MLflow experiment names (any name); neither: every wsss-bench experiment.
    ``filter_string``: an MLflow search filter ANDed with "is a trial run", e.g.
    ``params.`method.epochs` = '3'`` or ``tags.`wsss.method` = 'afa'``. Unknown suite or
    experiment names raise a ConfigError listing the valid ones.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        all_experiments = client.search_experiments()
    except MlflowException as exc:
        raise TrackingError(f"Tracking store {tracking_uri} cannot be read: {exc}") from None
    ours = {e.name[len(EXPERIMENT_PREFIX):]: e for e in all_experiments if e.name.startswith(EXPERIMENT_PREFIX)}
    selected = []
    for name in suites or []:
        if name not in ours:
            raise _unknown_in_store("suite", name, ours, tracking_uri)
        selected.append(ours[name])
    by_name = {e.name: e for e in all_experiments}
    for name in experiments or []:
        experiment = by_name.get(name) or ours.get(name)
        if experiment is None:
            raise _unknown_in_store("experiment", name, by_name, tracking_uri)
        selected.append(experiment)
    if not suites and not experiments:
        selected = list(ours.values())
    base = f"tags.`{TRIAL_TAG}` != ''"
    query = f"{base} and {filter_string}" if filter_string else base
    rows: list[dict[str, Any]] = []
    for experiment in {e.experiment_id: e for e in selected}.values():
        token = None
        while True:
            try:
                page = client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000, page_token=token)
            except MlflowException as exc:
                raise ConfigError(f"MLflow rejected the filter {filter_string!r}: {exc.message}. Example: "
                                  "--filter \"params.`method.epochs` = '3'\" or --filter \"tags.`wsss.method` = 'afa'\".") from None
            for run in page:
                row = _run_row(run, experiment.name)
                if row is not None:
                    rows.append(row)
            token = page.token
            if not token:
                break
    frame = pd.DataFrame(rows)
    frame.attrs["tracking_uri"] = tracking_uri
    frame.attrs["selection"] = _describe_selection(suites, experiments, filter_string)
    return frame


def _unknown_in_store(kind: str, name: str, valid: Iterable[str], uri: str) -> ConfigError:
    error = unknown(kind, name, valid)
    return ConfigError(f"{error} (in the tracking store {uri})")


def _describe_selection(suites, experiments, filter_string) -> str:
    parts = []
    if suites:
        parts.append("suites " + ", ".join(suites))
    if experiments:
        parts.append("experiments " + ", ".join(experiments))
    if filter_string:
        # A filter quotes names in backticks: a code span around it needs a longer fence.
        fence = "`` " if "`" in filter_string else "`"
        parts.append(f"filter {fence}{filter_string}{fence[::-1]}")
    return "; ".join(parts) or "every wsss-bench experiment"


def _run_row(run, experiment_name: str) -> dict[str, Any] | None:
    tags = run.data.tags
    if tags.get("wsss.superseded") == "true":
        return None
    status = tags.get(STATUS_TAG, "unknown")
    mlflow_status = run.info.status
    if status == "finished" and mlflow_status != "FINISHED":
        status = f"unfinished (run {mlflow_status.lower()})"
    elif status == "running" and mlflow_status in ("FAILED", "KILLED"):
        status = f"died ({mlflow_status.lower()})"
    params = run.data.params
    config = {k: v for k, v in sorted(params.items()) if k.startswith(("method.", "dataset.", "eval.", "splits."))}
    try:
        seed = int(tags.get("wsss.seed", params.get("seed", -1)))
    except ValueError:
        seed = -1
    row = {
        "experiment": experiment_name,
        "run_id": run.info.run_id,
        "suite": tags.get("wsss.suite") or experiment_name.removeprefix(EXPERIMENT_PREFIX),
        "dataset": tags.get("wsss.dataset", params.get("dataset", "?")),
        "method": tags.get("wsss.method", "?"),
        "seed": seed,
        "trial_id": tags.get(TRIAL_TAG),
        "status": status,
        # the hash of the result-deciding code; older runs only have the commit
        "code_version": _known(tags.get("wsss.code_tree")) or tags.get("wsss.git_commit") or "unknown",
        "package_version": tags.get("wsss.code_version", ""),
        "hardware": tags.get("wsss.hardware", ""),
        "env": tags.get(ENV_TAG, ""),  # the hash of the result-deciding library versions
        "versions": versions_text(tags),
        "error": tags.get("wsss.error", ""),
        "stage_status": tags.get("wsss.stage_status", ""),
        "segmentation": "common" if _truthy(params.get("eval.common_segmentation")) or any(
            k.startswith("eval.common_segmentation.") for k in params) else "own",
        "refine": str(params.get("eval.refine", "none")).lower(),
        "config": json.dumps(config),
        "data_root": params.get("data_root", "None"),
        # real data (a data root) with a checkpoint field (`pretrained`, `seg_pretrained`) left None
        "random_init": params.get("data_root", "None") != "None" and any(
            k.startswith("method.") and k.endswith("pretrained") and v in ("None", "") for k, v in params.items()),
        "start_time": run.info.start_time or 0,
        "end_time": run.info.end_time or 0,
    }
    row.update(run.data.metrics)
    return row


def _known(value: str | None) -> str | None:
    return None if value in (None, "", "unknown") else value


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "false", "0", "none", "no", "off", "{}")


def fetch_curves(tracking_uri: str, run_ids: Iterable[str], name: str = "cam_curve") -> dict[str, list[tuple[float, float]]]:
    """Per run: the metric history ``name`` as (threshold, mIoU) sorted by threshold
    (``cam_curve`` is logged with step = round(100 * threshold))."""
    client = _client(tracking_uri)
    out = {}
    for run_id in run_ids:
        history = client.get_metric_history(run_id, name)
        if history:
            points = {p.step: p.value for p in sorted(history, key=lambda p: p.timestamp)}
            out[run_id] = [(step / 100.0, value) for step, value in sorted(points.items())]
    return out


GALLERY_KINDS: tuple[str, ...] = ("image", "gt", "cam", "mask", "pred")

def fetch_gallery(tracking_uri: str, run_id: str, dst: Path) -> dict[str, dict[str, Path]]:
    """Download a run's ``gallery/`` artifacts; -> {image id: {kind: path}}."""
    import os

    client = _client(tracking_uri)
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bar per run on stderr
    try:
        if not client.list_artifacts(run_id, "gallery"):
            return {}
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(client.download_artifacts(run_id, "gallery", str(dst)))
    except Exception:  # a missing or unreadable artifact store must not sink the report
        return {}
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(local.glob("*.png")):
        stem, _, kind = path.stem.rpartition("_")
        if kind in GALLERY_KINDS and stem:
            found.setdefault(stem, {})[kind] = path
    return found
