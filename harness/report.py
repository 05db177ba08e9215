"""Leaderboards from MLflow: the comparison a WSSS reviewer can trust.

``write_report`` reads every trial run of the selected experiments from the tracking store
(the store alone is enough: metrics, tags, params, metric histories and gallery artifacts)
and writes into the output directory::

    leaderboard.md     tables, warnings and the protocol, with links to plots/ and gallery/
    leaderboard.html   the same, self-contained (styles and images embedded; opens offline)
    leaderboard.csv    one row per (suite, dataset, method, variant, code version)
    pairwise.csv       paired comparisons between rows over matched seeds
    per_class.csv      per-class IoU over seeds
    runs.csv           every run, one row each, with its status (the raw numbers)
    plots/*.png        mIoU vs training cost (Pareto front), CAM mIoU vs background
                       threshold, per-class IoU bars
    gallery/...        image, ground truth, CAM, pseudo mask, prediction per method

Rules that make the numbers trustworthy (tested in tests/test_report.py):

* Only runs with status ``finished`` (tag *and* MLflow run status) are averaged. Failed,
  interrupted, partial and still-running trials are listed separately; a method whose every
  trial failed still gets a row, with ``n_seeds = 0``.
* Runs from different code versions (tag ``wsss.code_tree``, the hash of ``harness/`` and
  ``methods/``; ``wsss.git_commit`` for older runs) are never averaged together:
  each version is its own row, and ``code_flag`` says ``mixed`` for every row of such a group
  (``dirty`` for runs from a working tree with uncommitted changes, ``unknown`` when the
  commit was not recorded).
* Runs on different result-deciding library versions (tag ``wsss.env``, the hash of the
  ``wsss.lib.*`` versions, harness/environment.py) are never averaged together either: each
  environment is its own row (label suffix ``env:<hash>`` when a method has several), and the
  report names every row's versions.
* Every statistic carries its n. ``missing_seeds`` lists the seeds that other rows of the
  same suite / dataset (or the suite file) have and this row lacks.
* Statistics: :mod:`harness.stats` (sample std, Student-t 95% CI, paired t over matched
  seeds). Ranks share a number where the paired comparison cannot tell rows apart.

leaderboard.csv columns (stable; ``pandas.read_csv``), in this order:

=================================  ===========================================================
``suite, dataset, method``         what was run
``variant``                        the method/dataset/eval params that differ between this
                                   method's configs in the suite ('' if it has one config)
``segmentation``                   ``own`` (the method's segmenter) or ``common`` (the
                                   harness's shared segmentation recipe, harness/common_seg.py)
``code_version``                   the git commit of the runs (one per row)
``code_flag``                      '' | ``mixed`` | ``dirty`` | ``unknown`` (see above)
``label``                          the row's display name
``random_init``                    True: real data (a data root) and a ``*pretrained`` field
                                   None, i.e. trained without ImageNet weights (label flagged)
``n_seeds, seeds``                 finished seeds averaged, space-separated seed list
``missing_seeds``                  expected seeds without a finished run (space-separated)
``n_failed``                       failed / unfinished trials of this row (not averaged)
``<m>_n, <m>_mean, <m>_std,``      for m in :data:`QUALITY_METRICS`: values present, mean,
``<m>_ci_low, <m>_ci_high``        sample std, 95% t-interval of the mean (NaN for n < 2)
``rank_<m>``                       for m in :data:`RANK_METRICS`: 1 = best; equal numbers =
                                   not distinguishable over matched seeds
``reference_<m>, delta_<m>,``      for m in :data:`REFERENCE_METRICS`: the suite file's
``reference_note_<m>``             published number, ours minus it (NaN if none, or if the
                                   protocols differ) and '' or "not comparable: <why>"
                                   (harness/references.py decides)
``reference_source``               the suite's citation / note for its published numbers
``time_<s>_s_mean, time_<s>_s_std`` wall seconds per stage s in STAGES and ``total``
``device_h_<s>``                   device hours per stage (mean over seeds): GPU hours on a
                                   GPU, CPU core-hours (process CPU time) on a CPU
``device_h_total``                 their sum
``train_wall_h``                   wall hours to a trained segmenter: train_cam + pseudo_masks
                                   + train_seg (mean over seeds; the Pareto plot's x axis)
``device_kind``                    ``gpu`` | ``cpu`` | ``mixed``
``peak_rss_mb, peak_gpu_mb``       largest peak over stages and seeds
``params_total, gmacs_total``      parameters and GMACs (one forward at the input size)
``networks``                       per network: ``name=params/GMACs``
``hardware``                       distinct ``wsss.hardware`` tags
``env``                            the ``wsss.env`` hash of the runs' library versions (one
                                   per row; '' for runs recorded before it existed)
``versions``                       those versions, e.g. ``torch 2.14.1+cu130, timm 1.0.31, ...``
``run_ids``                        the MLflow runs averaged
=================================  ===========================================================

pairwise.csv: ``suite, dataset, metric, a, b, n_matched, seeds, mean_diff, std_diff, ci_low,
ci_high, t, p_value, distinguishable, verdict`` (a, b are row labels; diff = a - b; empty
``distinguishable`` when fewer than two seeds match).

per_class.csv: ``suite, dataset, label, method, variant, code_version, what, class, n, mean,
std, ci_low, ci_high`` (what in cam, mask, val_ss, val_ms, val_ms_crf).

runs.csv: ``experiment, run_id, suite, dataset, method, variant, segmentation, code_version,
seed, trial_id, status, hardware, env, versions, error`` then every metric of :data:`RUN_METRICS`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from harness import stats
from harness.config import Suite
from harness.environment import ENV_TAG, versions_text
from harness.errors import ConfigError, ResultsError, TrackingError, unknown
from harness.references import ORACLE_EPOCH_METRIC, REFERENCE_ALIASES, REFERENCE_METRICS, canonical_metric, comparability, parse_number
from harness.tracking import EXPERIMENT_PREFIX, STATUS_TAG, TRIAL_TAG
from harness.trial import STAGES

QUALITY_METRICS: tuple[str, ...] = (
    "cam_miou",
    "cam_miou_fixed",
    "cam_best_threshold",
    "cam_fixed_threshold",
    "mask_miou",
    "mask_miou_ignore255",
    "val_miou_ss",
    "val_miou_ms",
    "val_miou_ms_crf",
)
RANK_METRICS: tuple[str, ...] = ("cam_miou", "cam_miou_fixed", "mask_miou", "val_miou_ss", "val_miou_ms", "val_miou_ms_crf")
# REFERENCE_METRICS, REFERENCE_ALIASES (`val_miou` = the paper's headline MS + flip + CRF
# number) and the protocol rule live in harness/references.py.
THRESHOLD_METRICS: tuple[str, ...] = ("cam_best_threshold", "cam_fixed_threshold")  # shown with 2 decimals
COST_STAGES: tuple[str, ...] = STAGES + ("total",)
TRAIN_STAGES: tuple[str, ...] = ("train_cam", "pseudo_masks", "train_seg")
PER_CLASS_WHATS: tuple[str, ...] = ("cam", "mask", "val_ss", "val_ms", "val_ms_crf")
RUN_METRICS: tuple[str, ...] = QUALITY_METRICS + ("cam_threshold_stop", "mask_ignored_pct", "mask_eval_images") + tuple(f"time_{s}_s" for s in COST_STAGES) + (
    "params_total", "gmacs_total")
# Back-compat names (harness/cli.py, older callers).
REPORT_METRICS: tuple[str, ...] = QUALITY_METRICS + tuple(f"time_{s}_s" for s in COST_STAGES)
COST_METRICS: tuple[str, ...] = ("params_total", "gmacs_total")

METRIC_TITLES = {
    "cam_miou": "CAM mIoU (best t, oracle)",
    "cam_miou_fixed": "CAM mIoU (fixed t)",
    "cam_best_threshold": "oracle t",
    "cam_fixed_threshold": "fixed t",
    "mask_miou": "pseudo-mask mIoU (cam-eval)",
    "mask_miou_ignore255": "pseudo-mask mIoU (255 ignored)",
    "val_miou_ss": "val mIoU (SS)",
    "val_miou_ms": "val mIoU (MS+flip)",
    "val_miou_ms_crf": "val mIoU (MS+flip+CRF)",
}
SHORT_TITLES = {
    "cam_miou": "CAM* (oracle t)",
    "cam_miou_fixed": "CAM@t",
    "cam_best_threshold": "t*",
    "cam_fixed_threshold": "t",
    "mask_miou": "mask",
    "mask_miou_ignore255": "mask (255 ign.)",
    "val_miou_ss": "val SS",
    "val_miou_ms": "val MS",
    "val_miou_ms_crf": "val MS+CRF",
}
# Which val number ranks rows and goes on the Pareto plot: the first one present.
PRIMARY_ORDER: tuple[str, ...] = ("val_miou_ms_crf", "val_miou_ms", "val_miou_ss", "mask_miou", "cam_miou")

PROTOCOL = (
    "mIoU in %, background included, over pixels whose ground truth is not 255. Each cell is the mean ± sample std "
    "over seeds with the 95% Student-t confidence interval of the mean in brackets; n is always shown (std and CI need "
    "n ≥ 2). **CAM\\*** = CAM (seed) mIoU on the cam-eval split at the background threshold that the sweep found best "
    "— an *oracle*, because the threshold is chosen with pixel labels (the sweep widens past its configured end, to 1.00 "
    "at most, while the best is its last threshold); **CAM@t** = the same CAMs at the method's own pre-declared threshold "
    "(else the suite's fixed one; not an oracle). **mask** = pseudo-mask mIoU on the cam-eval images (255 'unsure' pixels "
    "count as background; **mask (255 ign.)** does not score them, as AFA's evaluator). **val SS** = segmentation on the val split, single scale, no CRF; **val MS** = the method's "
    "multi-scale + flip protocol; **val MS+CRF** = that followed by dense CRF. Rank of a row = 1 + the number of rows "
    "distinguishably better than it in the paired comparison over matched seeds (95% CI of the mean paired difference "
    "excludes 0); rows share a rank when seed noise cannot separate them. A row with a noisy metric can therefore "
    "out-rank a steadier row with a slightly higher mean (rows are listed by mean). Rows with fewer than 2 seeds are "
    "not ranked."
)


# =============================================================================================
# Fetching
# =============================================================================================

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
        parts.append(f"filter `{filter_string}`")
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
        "config": json.dumps(config),
        # real data (a data root) with a checkpoint field (`pretrained`, `seg_pretrained`) left None
        "random_init": params.get("data_root", "None") != "None" and any(
            k.startswith("method.") and k.endswith("pretrained") and v in ("None", "") for k, v in params.items()),
        "start_time": run.info.start_time or 0,
        "end_time": run.info.end_time or 0,
    }
    row.update(run.data.metrics)
    return row


def _oracle_threshold_at_sweep_end(done: pd.DataFrame) -> list[int]:
    """Seeds whose best CAM threshold is the last one swept: the optimum may lie beyond. The
    range used is the metric ``cam_threshold_stop`` (the sweep widens itself, to 1.0 at most);
    older runs have only the configured ``eval.threshold_stop``."""
    if "cam_best_threshold" not in done:
        return []
    seeds = []
    for _, run in done.iterrows():
        used = run["cam_threshold_stop"] if "cam_threshold_stop" in run and not pd.isna(run["cam_threshold_stop"]) else None
        best, stop = run["cam_best_threshold"], used if used is not None else json.loads(run["config"]).get("eval.threshold_stop")
        if stop is not None and not pd.isna(best) and abs(float(best) - float(stop)) < 1e-9:
            seeds.append(int(run["seed"]))
    return sorted(seeds)


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


# =============================================================================================
# Aggregation
# =============================================================================================

@dataclass
class Leaderboard:
    table: pd.DataFrame  # one row per (suite, dataset, method, variant, code version)
    failed: pd.DataFrame  # failed / unfinished trials, shown separately, never averaged
    pairwise: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # every run, with its row label
    warnings: list[str] = field(default_factory=list)
    protocols: dict[tuple[str, str], str] = field(default_factory=dict)  # (suite, dataset) -> settings
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.table.empty and self.failed.empty


def _variant_labels(frame: pd.DataFrame) -> pd.Series:
    """A short label per distinct config of a method within a suite: '' when the method has
    one config there, else the params that differ between its configs."""
    labels = pd.Series("", index=frame.index, dtype=object)
    for _, group in frame.groupby(["suite", "dataset", "method"]):
        configs = group["config"].unique()
        if len(configs) < 2:
            continue
        parsed = {c: json.loads(c) for c in configs}
        keys = sorted({k for p in parsed.values() for k in p})
        differing = [k for k in keys if len({p.get(k) for p in parsed.values()}) > 1]
        for config, params in parsed.items():
            text = ",".join(f"{k.split('.', 1)[1]}={params.get(k, '-')}" for k in differing)
            labels[group.index[group["config"] == config]] = text
    return labels


def _code_flag(versions: set[str], version: str) -> str:
    if len(versions) > 1:
        return "mixed"
    if version == "unknown":
        return "unknown"
    if version.endswith("-dirty"):
        return "dirty"
    return ""


def _label(method: str, variant: str, version: str, mixed: bool) -> str:
    text = method
    if variant:
        text += f" [{variant}]"
    if mixed:
        # keep "-dirty": a clean and a dirty run of one code tree are different rows and need
        # different labels (plots and tables are keyed by label)
        base, dirty, _ = version.partition("-dirty")
        text += f" @{base[:12]}{dirty}"
    return text


def _device_kind(hardware: str) -> str:
    return "cpu" if not hardware or hardware.startswith("cpu") else "gpu"


def _protocol_text(config: dict[str, str]) -> str:
    def get(key, default="?"):
        return config.get(key, default)

    parts = [
        f"averaging={get('eval.convention', 'present')}",
        f"CAM threshold sweep {get('eval.threshold_start')}..{get('eval.threshold_stop')} step {get('eval.threshold_step')}",
        f"fixed t=the method's own, else {get('eval.fixed_threshold')}",
    ]
    splits = {k.split('.', 1)[1]: v for k, v in config.items() if k.startswith("splits.")}
    if splits:
        parts.append("splits " + ", ".join(f"{k}={v}" for k, v in sorted(splits.items())))
    else:
        parts.append("the dataset's default train / cam-eval / val splits")
    for key, what in (("eval.max_cam_eval", "cam-eval images"), ("eval.max_val", "val images")):
        if get(key, "0") not in ("0", "?"):
            parts.append(f"first {config[key]} {what} only")
    return "; ".join(parts)


def build_leaderboard(
    runs: pd.DataFrame,
    references: dict[str, dict[str, dict[str, Any]]] | None = None,
    expected_seeds: dict[str, Iterable[int]] | None = None,
) -> Leaderboard:
    """Aggregate runs over seeds. ``references``: suite -> method -> metric -> published
    value (string entries such as ``source`` are notes); ``expected_seeds``: suite -> the
    seeds every method should have (the suite file's), besides those seen in the store."""
    meta = {"tracking_uri": _display_uri(runs.attrs.get("tracking_uri", "")), "selection": runs.attrs.get("selection", "")}
    if runs.empty:
        return Leaderboard(pd.DataFrame(), pd.DataFrame(), meta=meta)
    runs = runs.copy().reset_index(drop=True)
    for column, default in (("config", "{}"), ("segmentation", "own"), ("code_version", "unknown"), ("hardware", ""),
                            ("error", ""), ("end_time", 0), ("start_time", 0), ("run_id", ""), ("experiment", ""),
                            ("env", ""), ("versions", "")):
        if column not in runs:
            runs[column] = default
    runs["variant"] = _variant_labels(runs)
    warnings: list[str] = []

    # Code versions per (suite, dataset, method, variant): several -> separate, flagged rows.
    family = ["suite", "dataset", "method", "variant"]
    versions = runs.groupby(family)["code_version"].agg(lambda s: set(s))
    runs["code_flag"] = [_code_flag(versions[tuple(r[k] for k in family)], r["code_version"]) for _, r in runs.iterrows()]
    runs["label"] = [_label(r["method"], r["variant"], r["code_version"], r["code_flag"] == "mixed") for _, r in runs.iterrows()]
    for key, vs in versions.items():
        if len(vs) > 1:
            name = _label(key[2], key[3], "", False)
            warnings.append(f"{key[0]}/{key[1]}: **{name}** has runs from {len(vs)} code versions ({', '.join(sorted(vs))}); "
                            "they are shown as separate rows, never averaged together.")
    # Library environments per (family, code version): several -> separate rows, never averaged.
    runs[["env", "versions"]] = runs[["env", "versions"]].fillna("")  # NaN would drop out of the groupby below
    envs = runs.groupby(family + ["code_version"])["env"].agg(lambda s: set(s))
    several = [len(envs[tuple(r[k] for k in family + ["code_version"])]) > 1 for _, r in runs.iterrows()]
    runs["label"] = [label + (f" env:{env[:8] or 'unrecorded'}" if split else "")
                     for label, env, split in zip(runs["label"], runs["env"], several)]
    for key, es in envs.items():
        if len(es) > 1:
            warnings.append(f"{key[0]}/{key[1]}: **{_label(key[2], key[3], '', False)}** has runs on {len(es)} sets of library "
                            "versions; they are shown as separate rows (`env:<hash>`), never averaged together.")
    dirty = runs[runs["code_flag"] == "dirty"]
    if not dirty.empty:
        warnings.append("Runs from working trees with uncommitted changes (`-dirty`): " + ", ".join(sorted(set(dirty["label"]))) +
                        ". Their code cannot be recovered from the commit alone.")

    finished_mask = runs["status"] == "finished"
    # One finished run per (row, seed): duplicates (e.g. the same trial run against two data
    # roots, or two stores merged) keep the newest and are reported.
    finished = runs[finished_mask].sort_values("end_time")
    group_cols = family + ["code_version", "env"]
    dup = finished.duplicated(group_cols + ["seed"], keep="last")
    if dup.any():
        for _, r in finished[dup].iterrows():
            warnings.append(f"{r['suite']}/{r['dataset']}: {r['label']} seed {r['seed']} has more than one finished run; "
                            f"only the newest is averaged (ignored run {r['run_id']}).")
        finished = finished[~dup]
    not_finished = runs[~finished_mask]

    # Expected seeds per (suite, dataset): every seed any run there has, plus the suite's.
    expected: dict[tuple[str, str], set[int]] = {}
    for (suite, dataset), group in runs.groupby(["suite", "dataset"]):
        expected[(suite, dataset)] = set(int(s) for s in group["seed"]) | set(int(s) for s in (expected_seeds or {}).get(suite, []))

    rows: list[dict[str, Any]] = []
    per_seed: dict[str, dict[str, dict[int, float]]] = {}  # label key -> metric -> seed -> value
    per_class_rows: list[dict[str, Any]] = []
    row_keys: list[tuple] = []
    for key, group in runs.groupby(group_cols, sort=True):
        suite, dataset, method, variant, version, env = key
        done = finished[(finished[group_cols] == pd.Series(key, index=group_cols)).all(axis=1)].sort_values("seed")
        failed_here = not_finished[(not_finished[group_cols] == pd.Series(key, index=group_cols)).all(axis=1)]
        label = group["label"].iloc[0]
        seeds = [int(s) for s in done["seed"]]
        missing = sorted(expected[(suite, dataset)] - set(seeds))
        row: dict[str, Any] = {
            "suite": suite, "dataset": dataset, "method": method, "variant": variant,
            "segmentation": " ".join(sorted(set(group["segmentation"]))),
            "code_version": version, "code_flag": group["code_flag"].iloc[0], "label": label,
            "random_init": bool(group["random_init"].any()) if "random_init" in group else False,
            "n_seeds": len(seeds), "seeds": " ".join(map(str, seeds)),
            "missing_seeds": " ".join(map(str, missing)), "n_failed": len(failed_here),
            "env": env, "versions": "; ".join(sorted(set(group["versions"]) - {""})),
        }
        store: dict[str, dict[int, float]] = {}
        for metric in QUALITY_METRICS:
            values = {int(s): float(v) for s, v in zip(done["seed"], done[metric] if metric in done else [math.nan] * len(done))
                      if not pd.isna(v)}
            store[metric] = values
            summary = stats.summarize(values.values())
            row[f"{metric}_n"] = summary.n
            row[f"{metric}_mean"] = summary.mean
            row[f"{metric}_std"] = summary.std
            row[f"{metric}_ci_low"] = summary.ci_low
            row[f"{metric}_ci_high"] = summary.ci_high
        per_seed[_row_key(row)] = store
        for metric in RANK_METRICS:
            row[f"rank_{metric}"] = math.nan  # filled below
        published = _references_for(references, suite, method)
        row_config = json.loads((done if len(done) else group)["config"].iloc[0])
        oracle_epoch = ORACLE_EPOCH_METRIC in done and bool(done[ORACLE_EPOCH_METRIC].notna().any())
        row.update(_reference_columns(published, method, row, row_config, oracle_epoch))
        row.update(_cost(done))
        row["hardware"] = "; ".join(sorted(h for h in set(done["hardware"]) if h))
        row["run_ids"] = " ".join(done["run_id"])
        rows.append(row)
        row_keys.append(key)
        per_class_rows += _per_class(done, row)
        at_edge = _oracle_threshold_at_sweep_end(done)
        if at_edge:
            warnings.append(f"{suite}/{dataset}: **{label}**: the oracle CAM threshold is the sweep's upper end for seed(s) "
                            f"{' '.join(map(str, at_edge))}; its CAM* may lie past the range (the sweep widens itself up to 1.00 since "
                            "the cam_threshold_stop metric exists; older runs: raise eval.threshold_stop).")
        if missing and seeds:
            failed_seeds = sorted(int(s) for s in failed_here["seed"])
            note = f" (failed or unfinished: {' '.join(map(str, failed_seeds))})" if failed_seeds else ""
            warnings.append(f"{suite}/{dataset}: **{label}** has n={len(seeds)} finished seed(s); missing seed(s) "
                            f"{' '.join(map(str, missing))}{note}. Its statistics use only the seeds it has.")
        elif not seeds:
            warnings.append(f"{suite}/{dataset}: **{label}** has no finished trial ({len(failed_here)} failed or unfinished); "
                            "it is listed with n=0.")

    table = pd.DataFrame(rows)
    pairwise = _pairwise(table, per_seed)
    _fill_ranks(table, pairwise)
    table = table.reindex(columns=leaderboard_columns())
    failed_cols = ["suite", "dataset", "method", "variant", "label", "code_version", "seed", "trial_id", "run_id", "status", "error"]
    failed = not_finished.reindex(columns=failed_cols).sort_values(["suite", "dataset", "label", "seed"]).reset_index(drop=True)
    if not failed.empty:
        warnings.append(f"{len(failed)} failed or unfinished trial(s) are listed in their own table and are not averaged.")
    protocols = {}
    for (suite, dataset), group in runs.groupby(["suite", "dataset"]):
        texts = sorted({_protocol_text(json.loads(c)) for c in group["config"]})
        protocols[(suite, dataset)] = " | ".join(texts)
        if len(texts) > 1:
            warnings.append(f"{suite}/{dataset}: runs use different evaluation settings ({len(texts)} protocols); compare rows with care.")
    for suite in sorted(set(table["suite"])):
        for method, values in (references or {}).get(suite, {}).items():
            bad = [k for k in values if k != "source" and canonical_metric(k) not in REFERENCE_METRICS]
            if bad:
                warnings.append(f"suite {suite}: reference numbers for {method} use unknown metric name(s) {', '.join(bad)}; "
                                f"known: {', '.join(REFERENCE_METRICS + tuple(REFERENCE_ALIASES))}.")
    runs_out = runs.copy()
    meta["generated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["n_runs"] = str(len(runs))
    return Leaderboard(table, failed, pairwise, pd.DataFrame(per_class_rows), runs_out, warnings, protocols, meta)


def _display_uri(uri: str) -> str:
    """A SQLite store under the working directory is shown relative to it (committed reports
    should not carry one machine's absolute paths)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        try:
            return "sqlite:///" + path.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return uri
    return uri


def _row_key(row: dict[str, Any] | pd.Series) -> str:
    return f"{row['suite']}\x1f{row['dataset']}\x1f{row['label']}"


def _references_for(references, suite: str, method: str) -> dict[str, Any]:
    """{"source": str, metric: parsed number} of one method; bare numbers (callers passing
    raw tables) become {"value": x}; unknown metric names are skipped (warned about)."""
    raw = (references or {}).get(suite, {}).get(method, {})
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = canonical_metric(key)
        if key == "source":
            out["source"] = str(value)
        elif name in REFERENCE_METRICS:
            out[name] = parse_number(name, value, f"references of {suite}/{method} `{key}`")
    return out


def _reference_columns(published: dict[str, Any], method: str, row: dict[str, Any], config: dict[str, str],
                       oracle_epoch: bool) -> dict[str, Any]:
    """reference_<m>, delta_<m> (NaN unless the protocols match), reference_note_<m> and
    reference_source (the table's citation, then each number's own source)."""
    out: dict[str, Any] = {}
    sources = [published["source"]] if published.get("source") else []
    for metric in REFERENCE_METRICS:
        number = published.get(metric)
        note = comparability(number, metric, method, config, oracle_epoch) if number else ""
        ref = number["value"] if number else math.nan
        out[f"reference_{metric}"] = ref
        out[f"delta_{metric}"] = row[f"{metric}_mean"] - ref if number and not note else math.nan
        out[f"reference_note_{metric}"] = note
        if number and number.get("source"):
            sources.append(f"{SHORT_TITLES[metric]} {number['source']}")
    out["reference_source"] = "; ".join(sources)
    return out


def _cost(done: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = len(done)

    def col(name):
        return done[name].to_numpy(dtype=float) if name in done and n else np.full(n, math.nan)

    for stage in COST_STAGES:
        summary = stats.summarize(col(f"time_{stage}_s"))
        out[f"time_{stage}_s_mean"] = summary.mean
        out[f"time_{stage}_s_std"] = summary.std
    kinds = {_device_kind(h) for h in done["hardware"]} if n else set()
    device_total = np.zeros(n)
    for stage in STAGES:
        wall, cpu = col(f"time_{stage}_s"), col(f"cpu_{stage}_s")
        per_run = np.array([(w if _device_kind(h) == "gpu" else c) / 3600.0 for w, c, h in zip(wall, cpu, done["hardware"])]) if n else np.array([])
        out[f"device_h_{stage}"] = stats.mean(per_run)
        device_total = device_total + np.nan_to_num(per_run)
    out["device_h_total"] = stats.mean(device_total) if n else math.nan
    train = np.zeros(n)
    for stage in TRAIN_STAGES:
        train = train + np.nan_to_num(col(f"time_{stage}_s"))
    out["train_wall_h"] = stats.mean(train / 3600.0) if n else math.nan
    out["device_kind"] = "mixed" if len(kinds) > 1 else (kinds.pop() if kinds else "")
    rss = [c for c in done.columns if c.startswith("peak_rss_")]
    gpu = [c for c in done.columns if c.startswith("peak_gpu_")]
    out["peak_rss_mb"] = float(np.nanmax(done[rss].to_numpy(dtype=float))) if rss and n and done[rss].notna().any().any() else math.nan
    out["peak_gpu_mb"] = float(np.nanmax(done[gpu].to_numpy(dtype=float))) if gpu and n and done[gpu].notna().any().any() else math.nan
    for name in COST_METRICS:
        out[name] = stats.mean(col(name))
    nets = sorted(c[len("params_"):] for c in done.columns if c.startswith("params_") and c != "params_total" and done[c].notna().any())
    parts = []
    for net in nets:
        params = stats.mean(col(f"params_{net}"))
        gmacs = stats.mean(col(f"gmacs_{net}"))
        parts.append(f"{net}={params / 1e6:.2f}M/{'-' if math.isnan(gmacs) else f'{gmacs:.2f}'}G")
    out["networks"] = " ".join(parts)
    return out


def _class_sort_key(name: str):
    return (0, "") if name == "background" else (1, name)


def _per_class(done: pd.DataFrame, row: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for what in PER_CLASS_WHATS:
        prefix = f"iou_{what}/"
        classes = sorted((c[len(prefix):] for c in done.columns if c.startswith(prefix) and done[c].notna().any()), key=_class_sort_key)
        for name in classes:
            summary = stats.summarize(done[prefix + name])
            out.append({"suite": row["suite"], "dataset": row["dataset"], "label": row["label"], "method": row["method"],
                        "variant": row["variant"], "code_version": row["code_version"], "what": what, "class": name,
                        "n": summary.n, "mean": summary.mean, "std": summary.std, "ci_low": summary.ci_low, "ci_high": summary.ci_high})
    return out


PAIRWISE_COLUMNS = ["suite", "dataset", "metric", "a", "b", "n_matched", "seeds", "mean_diff", "std_diff", "ci_low", "ci_high",
                    "t", "p_value", "distinguishable", "verdict"]


def _pairwise(table: pd.DataFrame, per_seed: dict[str, dict[str, dict[int, float]]]) -> pd.DataFrame:
    out = []
    if table.empty:
        return pd.DataFrame(columns=PAIRWISE_COLUMNS)
    for (suite, dataset), group in table.groupby(["suite", "dataset"], sort=False):
        labels = list(group.sort_values("label")["label"])
        for metric in RANK_METRICS:
            for i, a in enumerate(labels):
                for b in labels[i + 1:]:
                    sa = per_seed[f"{suite}\x1f{dataset}\x1f{a}"][metric]
                    sb = per_seed[f"{suite}\x1f{dataset}\x1f{b}"][metric]
                    if not sa or not sb:  # a row without this metric: nothing to compare
                        continue
                    cmp = stats.paired_compare(sa, sb)
                    verdict = cmp.verdict.replace("A better", f"{a} better").replace("B better", f"{b} better")
                    out.append({"suite": suite, "dataset": dataset, "metric": metric, "a": a, "b": b, "n_matched": cmp.n,
                                "seeds": " ".join(map(str, cmp.seeds)), "mean_diff": cmp.mean_diff, "std_diff": cmp.std_diff,
                                "ci_low": cmp.ci_low, "ci_high": cmp.ci_high, "t": cmp.t, "p_value": cmp.p_value,
                                "distinguishable": cmp.distinguishable, "verdict": verdict})
    return pd.DataFrame(out, columns=PAIRWISE_COLUMNS)


def _fill_ranks(table: pd.DataFrame, pairwise: pd.DataFrame) -> None:
    if table.empty:
        return
    for (suite, dataset), group in table.groupby(["suite", "dataset"], sort=False):
        sub = pairwise[(pairwise["suite"] == suite) & (pairwise["dataset"] == dataset)] if not pairwise.empty else pairwise
        for metric in RANK_METRICS:
            # A rank is a claim about seed-to-seed variation: rows with < 2 seeds get none.
            ranked = group[group[f"{metric}_n"] >= 2]
            scores = dict(zip(ranked["label"], ranked[f"{metric}_mean"]))
            wins: set[tuple[str, str]] = set()
            for _, p in sub[sub["metric"] == metric].iterrows() if not sub.empty else []:
                if _is_true(p["distinguishable"]):
                    wins.add((p["a"], p["b"]) if p["mean_diff"] > 0 else (p["b"], p["a"]))
            ranks = stats.rank_with_ties(scores, lambda x, y: (x, y) in wins)
            for index, label in zip(group.index, group["label"]):
                table.loc[index, f"rank_{metric}"] = ranks.get(label, math.nan)


def _is_true(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and bool(value)


def primary_metric(table: pd.DataFrame) -> str | None:
    """The metric that orders and ranks rows: the first of PRIMARY_ORDER (val MS+CRF, val
    MS, val SS, mask, CAM) that the most rows have a value for."""
    best, coverage = None, 0
    for metric in PRIMARY_ORDER:
        if f"{metric}_n" in table:
            count = int((table[f"{metric}_n"] > 0).sum())
            if count > coverage:
                best, coverage = metric, count
    return best


# =============================================================================================
# Text output
# =============================================================================================

def fmt_num(value: float, digits: int = 1) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def fmt_stat(row: pd.Series | dict, metric: str, digits: int = 1, ci: bool = True, n_if_differs: int | None = None) -> str:
    """'61.2 ± 1.3 [58.0, 64.4]' (n=1: '61.2 (n=1)'; no values: '-')."""
    mean, std = row.get(f"{metric}_mean", math.nan), row.get(f"{metric}_std", math.nan)
    if pd.isna(mean):
        return "-"
    n = int(row.get(f"{metric}_n", 0) or 0)
    if pd.isna(std):
        text = f"{mean:.{digits}f} (n={n})"
    else:
        text = f"{mean:.{digits}f} ± {std:.{digits}f}"
        if ci and not pd.isna(row.get(f"{metric}_ci_low", math.nan)):
            text += f" [{row[f'{metric}_ci_low']:.{digits}f}, {row[f'{metric}_ci_high']:.{digits}f}]"
        if n_if_differs is not None and n != n_if_differs:
            text += f" (n={n})"
    return text


def fmt_rank(row, metric: str, table: pd.DataFrame) -> str:
    rank = row.get(f"rank_{metric}", math.nan)
    if pd.isna(rank):
        return "-"
    same = table[(table["suite"] == row["suite"]) & (table["dataset"] == row["dataset"]) & (table[f"rank_{metric}"] == rank)]
    return f"{int(rank)}{'=' if len(same) > 1 else ''}"


def fmt_hours(hours: float) -> str:
    if pd.isna(hours):
        return "-"
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:.2f} h"


def sections(board: Leaderboard) -> list[tuple[str, str]]:
    """(suite, dataset) pairs in display order."""
    pairs = set()
    for frame in (board.table, board.failed):
        if not frame.empty:
            pairs |= set(zip(frame["suite"], frame["dataset"]))
    return sorted(pairs)


def main_columns(table: pd.DataFrame) -> list[str]:
    """Quality metrics that at least one row has (others would be empty columns)."""
    return [m for m in QUALITY_METRICS if f"{m}_n" in table and (table[f"{m}_n"] > 0).any()]


# A report is a list of blocks, rendered to markdown here and to HTML by harness/report_html.py:
#   ("h1" | "h2" | "h3" | "p", text)      text may use **bold**, *italic* and `code`
#   ("ul", [text, ...])
#   ("table", head, rows, css_class)       cells are plain text
#   ("img", title, key)                    key: the plot's title in the ``plots`` mapping
#   ("gallery", gallery)                   one (suite, dataset) entry of :func:`collect_gallery`


def report_blocks(board: Leaderboard, plots: dict[str, Any] | None = None, gallery: dict | None = None) -> list[tuple]:
    """The report's content, independent of the output format."""
    out: list[tuple] = [("h1", "wsss-bench leaderboard")]
    if board.meta.get("tracking_uri"):
        out.append(("p", f"Generated {board.meta.get('generated', '')} from `{board.meta['tracking_uri']}` "
                         f"({board.meta.get('selection', '')}; {board.meta.get('n_runs', '?')} runs)."))
    out.append(("p", "**Protocol.** " + PROTOCOL))
    if board.empty:
        out.append(("p", "*No trial runs matched.*"))
        return out
    if board.warnings:
        out += [("h2", "Warnings"), ("ul", list(board.warnings))]
    for suite, dataset in sections(board):
        out.append(("h2", f"{suite} / {dataset}"))
        if (suite, dataset) in board.protocols:
            out.append(("p", f"Evaluation: {board.protocols[(suite, dataset)]}."))
        sub = board.table[(board.table["suite"] == suite) & (board.table["dataset"] == dataset)] if not board.table.empty else board.table
        if sub.empty:
            out.append(("p", "*No finished trials.*"))
        else:
            out += _suite_blocks(board, sub)
        shown = [title for title in (plots or {}) if title.startswith(f"{suite}/{dataset}:")]
        if shown:
            out.append(("h3", "Plots"))
            out += [("img", title, title) for title in shown]
        if gallery and (suite, dataset) in gallery:
            out.append(("h3", "Gallery"))
            out.append(("p", "The same fixed images for every method (from each row's lowest finished seed): image, ground truth, "
                             "CAM (max over present classes, on the image), pseudo mask, single-scale prediction. White = ignore (255)."))
            out.append(("gallery", gallery[(suite, dataset)]))
    if not board.failed.empty:
        out.append(("h2", "Failed or unfinished trials (not averaged)"))
        out.append(("table", ["suite", "dataset", "row", "seed", "trial", "status", "error"],
                    [[r["suite"], r["dataset"], r["label"], str(r["seed"]), str(r["trial_id"]), r["status"], str(r["error"] or "")[:300]]
                     for _, r in board.failed.iterrows()], "failed"))
    out.append(("p", "CSV files: `leaderboard.csv` (one row per table row), `pairwise.csv`, `per_class.csv`, `runs.csv`; "
                     "their columns are documented in `harness/report.py`."))
    return out


def _reference_cell(r: pd.Series, metric: str) -> str:
    """'published / ours / Δ', the Δ replaced by the reason when the protocols differ."""
    note = r.get(f"reference_note_{metric}", "")
    if isinstance(note, str) and note:
        last = note
    else:
        last = "-" if pd.isna(r[f"delta_{metric}"]) else format(r[f"delta_{metric}"], "+.1f")
    return f"{fmt_num(r[f'reference_{metric}'])} / {fmt_num(r[f'{metric}_mean'])} / {last}"


def _suite_blocks(board: Leaderboard, sub: pd.DataFrame) -> list[tuple]:
    out: list[tuple] = []
    suite, dataset = sub["suite"].iloc[0], sub["dataset"].iloc[0]
    metrics = main_columns(sub)
    primary = primary_metric(sub)
    out.append(("h3", "Quality (mIoU %)"))
    head = ["rank" + (f" ({SHORT_TITLES[primary]})" if primary else ""), "method", "seg", "n", "seeds"]
    head += [METRIC_TITLES[m] for m in metrics]
    rows = []
    for _, r in _ordered(sub, primary).iterrows():
        cells = [fmt_rank(r, primary, board.table) if primary else "-", r["label"] + _flag(r), r["segmentation"], str(r["n_seeds"]),
                 (r["seeds"] or "none") + (f" (missing {r['missing_seeds']})" if r["missing_seeds"] else "")
                 + (f" ({r['n_failed']} failed)" if r["n_failed"] else "")]
        cells += [fmt_stat(r, m, 2 if m in THRESHOLD_METRICS else 1, n_if_differs=r["n_seeds"]) for m in metrics]
        rows.append(cells)
    out.append(("table", head, rows, "main"))
    if any(r["code_flag"] for _, r in sub.iterrows()):
        out.append(("p", "Flags: † mixed code versions (one row per commit, never averaged together), ‡ uncommitted changes, "
                         "? commit unknown."))
    out += _versions_blocks(sub)

    refs = [m for m in REFERENCE_METRICS if sub[f"reference_{m}"].notna().any()]
    if refs:
        out.append(("h3", "Published numbers"))
        sources = sorted({s for s in sub["reference_source"] if isinstance(s, str) and s})
        if sources:
            out.append(("p", "Source: " + "; ".join(sources) + "."))
        out.append(("p", "Δ = ours − published, printed only where the published number's declared protocol (split, "
                         "scales, CRF, IRN, oracle epoch, method settings such as L_reg or backbone: the suite file's "
                         "`[reference.<method>]`) matches the row's; otherwise the cell says why not. On a different "
                         "dataset size or budget the difference is context, not a reproduction verdict."))
        with_refs = sub[sub[[f"reference_{m}" for m in refs]].notna().any(axis=1)]
        out.append(("table", ["method", "n"] + [f"{SHORT_TITLES[m]}: published / ours / Δ" for m in refs],
                    [[r["label"], str(r["n_seeds"])] + [_reference_cell(r, m) for m in refs]
                     for _, r in with_refs.iterrows()], "refs"))

    pair = board.pairwise[(board.pairwise["suite"] == suite) & (board.pairwise["dataset"] == dataset)] if not board.pairwise.empty else board.pairwise
    if not pair.empty:
        out.append(("h3", "Pairwise comparisons (paired over matched seeds)"))
        out.append(("p", "A − B in mIoU points: mean over the seeds both rows have, with the 95% t-interval of the mean paired "
                         "difference and the paired t-test's p; *distinguishable* when the interval excludes 0."))
        ordered = pair.assign(_o=pair["metric"].map({m: i for i, m in enumerate(PRIMARY_ORDER)}).fillna(99)).sort_values(["_o", "metric", "a", "b"])
        out.append(("table", ["metric", "A", "B", "n matched", "A − B", "95% CI", "p", "verdict"],
                    [[SHORT_TITLES[p["metric"]], p["a"], p["b"], str(p["n_matched"]), _signed(p["mean_diff"]),
                      "-" if pd.isna(p["ci_low"]) else f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]",
                      "-" if pd.isna(p["p_value"]) else f"{p['p_value']:.3f}", p["verdict"]] for _, p in ordered.iterrows()], "pairwise"))

    out.append(("h3", "Cost"))
    out.append(("p", "Per stage: wall time (device time), means over seeds; device time = GPU time on a GPU, CPU core time "
                     "(process CPU time) on a CPU. train = train_cam + pseudo_masks + train_seg wall time; peak memory = "
                     "largest over stages and seeds; GMACs = one forward pass per network at its input size."))
    head = ["method", "hardware"] + [f"{s}" for s in STAGES] + ["total", "device time", "train", "params (M)", "GMACs", "peak RSS (MB)", "peak GPU (MB)"]
    out.append(("table", head, [[r["label"], r["hardware"] or "-"] +
                                [f"{fmt_hours(r[f'time_{s}_s_mean'] / 3600)} ({fmt_hours(r[f'device_h_{s}'])})" for s in STAGES] +
                                [fmt_hours(r["time_total_s_mean"] / 3600), fmt_hours(r["device_h_total"]), fmt_hours(r["train_wall_h"]),
                                 fmt_num(r["params_total"] / 1e6, 2), fmt_num(r["gmacs_total"], 2), fmt_num(r["peak_rss_mb"], 0),
                                 fmt_num(r["peak_gpu_mb"], 0)] for _, r in sub.iterrows()], "cost"))
    nets = [(r["label"], r["networks"]) for _, r in sub.iterrows() if isinstance(r["networks"], str) and r["networks"]]
    if nets:
        out.append(("p", "Networks (params / GMACs): " + "; ".join(f"{label}: {text}" for label, text in nets)))

    pc = board.per_class
    if not pc.empty:
        pc = pc[(pc["suite"] == suite) & (pc["dataset"] == dataset)]
        labels = [lb for lb in _ordered(sub, primary)["label"] if lb in set(pc["label"])]
        for what in per_class_whats(pc):
            part = pc[pc["what"] == what]
            classes = sorted(set(part["class"]), key=_class_sort_key)
            grid = part.set_index(["class", "label"])
            rows = []
            for name in classes:
                cells = [name]
                for label in labels:
                    if (name, label) in grid.index:
                        g = grid.loc[(name, label)]
                        cells.append(fmt_num(g["mean"]) + ("" if pd.isna(g["std"]) else f" ± {g['std']:.1f}"))
                    else:
                        cells.append("-")
                rows.append(cells)
            out.append(("h3", f"Per-class IoU: {PER_CLASS_TITLES[what]}"))
            out.append(("table", ["class"] + labels, rows, "per-class"))
    return out


PER_CLASS_TITLES = {"cam": "CAM (oracle t)", "mask": "pseudo masks (train)", "val_ss": "val SS", "val_ms": "val MS+flip",
                    "val_ms_crf": "val MS+flip+CRF"}


def per_class_whats(pc: pd.DataFrame) -> list[str]:
    """Per-class tables shown in md/html: CAM, mask and the best val protocol present
    (per_class.csv has them all)."""
    present = set(pc["what"]) if not pc.empty else set()
    val = next((w for w in ("val_ms_crf", "val_ms", "val_ss") if w in present), None)
    return [w for w in ("cam", "mask") if w in present] + ([val] if val else [])


def _versions_blocks(sub: pd.DataFrame) -> list[tuple]:
    """The library versions behind a section's rows: one line when every row shares them,
    else one line per set naming its rows (nothing when no run recorded any)."""
    by_env: dict[tuple[str, str], list[str]] = {}
    for _, r in sub.sort_values("label").iterrows():
        by_env.setdefault((r["env"], r["versions"]), []).append(r["label"])
    if set(by_env) == {("", "")}:
        return []

    def text(env: str, versions: str) -> str:
        return (versions or "not recorded") + (f" (env `{env}`)" if env else "")

    if len(by_env) == 1:
        return [("p", "Library versions (every row): " + text(*next(iter(by_env))) + ".")]
    return [("p", "Library versions per row (rows on different versions are never averaged together):"),
            ("ul", [f"{', '.join(labels)}: {text(*key)}" for key, labels in by_env.items()])]


def _flag(row) -> str:
    init = " (random init)" if _is_true(row.get("random_init")) else ""  # real data without ImageNet weights
    return {"mixed": " †", "dirty": " ‡", "unknown": " ?"}.get(row["code_flag"], "") + init


def _signed(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:+.2f}"


def _ordered(sub: pd.DataFrame, primary: str | None) -> pd.DataFrame:
    if not primary:
        return sub.sort_values("label")
    return sub.assign(_m=sub[f"{primary}_mean"].fillna(-math.inf)).sort_values(["_m", "label"], ascending=[False, True])


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(board: Leaderboard, plots: dict[str, str] | None = None, gallery: dict | None = None) -> str:
    """The report as markdown. ``plots``: title -> relative png path; ``gallery``: as
    returned by :func:`collect_gallery`, with paths relative to the markdown file."""
    lines: list[str] = []
    for block in report_blocks(board, plots, gallery):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            _, head, rows, _ = block
            lines.append("| " + " | ".join(_md_cell(h) for h in head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[1]}]({plots[block[2]]})", ""]
        elif kind == "gallery":
            g = block[1]
            lines.append("| image id | method | " + " | ".join(GALLERY_KINDS) + " |")
            lines.append("|" + "---|" * (2 + len(GALLERY_KINDS)))
            for image_id in g["ids"]:
                for entry in g["rows"]:
                    kinds = entry["images"].get(image_id, {})
                    cells = [image_id, f"{entry['label']} (seed {entry['seed']})"]
                    cells += [f"![{k}]({kinds[k]})" if k in kinds else "-" for k in GALLERY_KINDS]
                    lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def leaderboard_table(board: Leaderboard):
    """The leaderboard as a rich Table for the terminal (key columns only; the files have
    everything). n is 'finished/expected' seeds."""
    from rich.markup import escape
    from rich.table import Table

    suites = sorted(set(board.table["suite"])) if not board.table.empty else []
    title = "wsss-bench leaderboard" + (f": {suites[0]}" if len(suites) == 1 else "") + " (mIoU %, mean ± std over seeds)"
    table = Table(title=title)
    columns = [("cam_miou", "CAM*"), ("cam_miou_fixed", "CAM@t"), ("mask_miou", "mask"), ("val_miou_ss", "val SS"),
               ("val_miou_ms_crf", "val MS+CRF")]
    if len(suites) > 1:
        table.add_column("suite")
    table.add_column("method", no_wrap=True, max_width=44, overflow="ellipsis")  # long variant labels: full in the .md
    for name in ["n"] + [t for _, t in columns] + ["rank", "time", "M params", "GMACs"]:
        table.add_column(name, justify="right")
    if board.table.empty:
        return table
    primary = primary_metric(board.table)
    for _, row in board.table.iterrows():
        cells = [fmt_stat(row, m, ci=False).replace(" (n=1)", "") for m, _ in columns]
        expected = row["n_seeds"] + (len(str(row["missing_seeds"]).split()) if row["missing_seeds"] else 0)
        lead = [row["suite"]] if len(suites) > 1 else []
        label = escape(row["label"] + _flag(row))  # a variant "[aaf=False]" is text, not rich markup
        table.add_row(*lead, label, f"{row['n_seeds']}/{expected}", *cells,
                      fmt_rank(row, primary, board.table) if primary else "-", fmt_hours(row["time_total_s_mean"] / 3600),
                      fmt_num(row["params_total"] / 1e6, 2), fmt_num(row["gmacs_total"], 2))
    table.caption = (f"n = finished/expected seeds. CAM* = best background threshold (oracle); CAM@t = the method's own fixed threshold. Rank by "
                     f"{SHORT_TITLES.get(primary, '-')}; '=' = not distinguishable from seed noise; no rank with n < 2.")
    return table


# =============================================================================================
# Files
# =============================================================================================

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def collect_gallery(board: Leaderboard, tracking_uri: str, out_dir: Path, max_side: int = 160) -> dict[tuple[str, str], dict]:
    """For each (suite, dataset): the fixed gallery images of every row, from each row's
    lowest finished seed, downloaded from MLflow, thumbnailed into ``out_dir/gallery``.

    -> {(suite, dataset): {"ids": [...], "rows": [{"label", "seed", "run_id",
    "images": {id: {kind: path}}}]}}; images that a run lacks are simply absent.
    """
    from PIL import Image

    from harness.visualize import voc_palette

    result: dict[tuple[str, str], dict] = {}
    if board.table.empty:
        return result
    finished = board.runs[board.runs["status"] == "finished"]
    palette = voc_palette()
    with tempfile.TemporaryDirectory() as tmp:
        for (suite, dataset), group in board.table.groupby(["suite", "dataset"], sort=True):
            entries = []
            for _, row in group.sort_values("label").iterrows():
                runs = finished[(finished["suite"] == suite) & (finished["dataset"] == dataset) & (finished["label"] == row["label"])]
                if runs.empty:
                    continue
                run = runs.sort_values("seed").iloc[0]
                found = fetch_gallery(tracking_uri, run["run_id"], Path(tmp) / run["run_id"])
                if not found:
                    continue
                target = out_dir / "gallery" / _slug(suite) / _slug(dataset) / _slug(row["label"])
                target.mkdir(parents=True, exist_ok=True)
                images: dict[str, dict[str, Path]] = {}
                for image_id, kinds in found.items():
                    for kind, path in kinds.items():
                        dst = target / f"{_slug(image_id)}_{kind}.png"
                        with Image.open(path) as im:
                            if im.mode == "P" or kind in ("gt", "mask", "pred"):
                                labels = np.array(im if im.mode in ("P", "L") else im.convert("L"))
                                im2 = Image.fromarray(palette[labels])
                                resample = Image.NEAREST
                            else:
                                im2 = im.convert("RGB")
                                resample = Image.BILINEAR
                            scale = max_side / max(im2.size)
                            if scale < 1:
                                im2 = im2.resize((max(1, round(im2.width * scale)), max(1, round(im2.height * scale))), resample)
                            im2.save(dst, optimize=True)
                        images.setdefault(image_id, {})[kind] = dst
                entries.append({"label": row["label"], "seed": int(run["seed"]), "run_id": run["run_id"], "images": images})
            if entries:
                ids = sorted(set().union(*(e["images"].keys() for e in entries)))
                common = [i for i in ids if all(i in e["images"] for e in entries)]
                result[(suite, dataset)] = {"ids": common or ids, "rows": entries}
    return result


def write_report(
    tracking_uri: str,
    out_dir: Path,
    suites: list[str] | None = None,
    references: dict | None = None,
    *,
    experiments: list[str] | None = None,
    filter_string: str | None = None,
    expected_seeds: dict[str, Iterable[int]] | None = None,
    html: bool = True,
    plots: bool = True,
    gallery: bool = True,
    require_runs: bool = False,
) -> Leaderboard:
    """Write leaderboard.md / .csv / .html (+ pairwise.csv, per_class.csv, runs.csv, plots/,
    gallery/) into ``out_dir`` (its plots/ and gallery/ folders are replaced); returns the
    leaderboard. ``require_runs``: raise a ResultsError instead of writing an empty report
    when nothing matches."""
    runs = fetch_runs(tracking_uri, suites, experiments, filter_string)
    if runs.empty and require_runs:
        raise ResultsError(
            f"No wsss-bench trial runs in {tracking_uri} match ({_describe_selection(suites, experiments, filter_string)}). "
            "Run `wsss-bench run --methods ... --dataset ...` first, or point --results / --tracking-uri at the store that has them."
        )
    board = build_leaderboard(runs, references, expected_seeds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("plots", "gallery"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)  # stale files from an older report
    plot_files: dict[str, Path] = {}
    if plots and not board.table.empty:
        from harness.report_plots import make_plots

        curves = fetch_curves(tracking_uri, board.runs.loc[board.runs["status"] == "finished", "run_id"])
        plot_files = make_plots(board, curves, out_dir / "plots")
    gallery_data = collect_gallery(board, tracking_uri, out_dir) if gallery else {}
    rel_plots = {title: path.relative_to(out_dir).as_posix() for title, path in plot_files.items()}
    rel_gallery = {
        key: {"ids": g["ids"], "rows": [{**e, "images": {i: {k: p.relative_to(out_dir).as_posix() for k, p in kinds.items()}
                                                             for i, kinds in e["images"].items()}} for e in g["rows"]]}
        for key, g in gallery_data.items()
    }
    (out_dir / "leaderboard.md").write_text(to_markdown(board, rel_plots, rel_gallery))
    write_csvs(board, out_dir)
    if html:
        from harness.report_html import render_html

        (out_dir / "leaderboard.html").write_text(render_html(board, plot_files, gallery_data), encoding="utf-8")
    return board


def write_csvs(board: Leaderboard, out_dir: Path) -> None:
    board.table.reindex(columns=leaderboard_columns()).to_csv(out_dir / "leaderboard.csv", index=False)
    board.pairwise.reindex(columns=PAIRWISE_COLUMNS).to_csv(out_dir / "pairwise.csv", index=False)
    board.per_class.reindex(columns=PER_CLASS_COLUMNS).to_csv(out_dir / "per_class.csv", index=False)
    board.runs.reindex(columns=RUN_COLUMNS + list(RUN_METRICS)).to_csv(out_dir / "runs.csv", index=False) if not board.runs.empty else \
        pd.DataFrame(columns=RUN_COLUMNS + list(RUN_METRICS)).to_csv(out_dir / "runs.csv", index=False)


PER_CLASS_COLUMNS = ["suite", "dataset", "label", "method", "variant", "code_version", "what", "class", "n", "mean", "std", "ci_low", "ci_high"]
RUN_COLUMNS = ["experiment", "run_id", "suite", "dataset", "method", "variant", "segmentation", "code_version", "seed", "trial_id",
               "status", "hardware", "env", "versions", "error"]


def leaderboard_columns() -> list[str]:
    """leaderboard.csv's columns, in order (documented in the module docstring)."""
    cols = ["suite", "dataset", "method", "variant", "segmentation", "code_version", "code_flag", "label", "random_init",
            "n_seeds", "seeds", "missing_seeds", "n_failed"]
    for m in QUALITY_METRICS:
        cols += [f"{m}_n", f"{m}_mean", f"{m}_std", f"{m}_ci_low", f"{m}_ci_high"]
    cols += [f"rank_{m}" for m in RANK_METRICS]
    for m in REFERENCE_METRICS:
        cols += [f"reference_{m}", f"delta_{m}", f"reference_note_{m}"]
    cols += ["reference_source"]
    for s in COST_STAGES:
        cols += [f"time_{s}_s_mean", f"time_{s}_s_std"]
    cols += [f"device_h_{s}" for s in STAGES] + ["device_h_total", "train_wall_h", "device_kind", "peak_rss_mb", "peak_gpu_mb",
                                                 "params_total", "gmacs_total", "networks", "hardware", "env", "versions", "run_ids"]
    return cols


def suite_references(suites: list[Suite]) -> dict[str, dict[str, dict[str, Any]]]:
    return {s.name: s.reference for s in suites}


def suite_seeds(suites: list[Suite]) -> dict[str, list[int]]:
    return {s.name: list(s.seeds) for s in suites}
