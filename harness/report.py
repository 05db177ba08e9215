"""Leaderboards from MLflow: method x dataset rows with mean +- std over seeds.

CSV columns (stable; load with ``pandas.read_csv``):

``suite, dataset, method, variant, n_seeds, seeds, <metric>_mean, <metric>_std`` for each
metric in :data:`REPORT_METRICS`, then ``params_total, gmacs_total, reference_<metric>``
and ``delta_<metric>`` (ours minus published) where the suite gives a published number,
``code_versions`` (the git commits the runs came from; several means mixed code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.config import Suite
from harness.tracking import EXPERIMENT_PREFIX, STATUS_TAG, TRIAL_TAG

REPORT_METRICS: tuple[str, ...] = (
    "cam_miou",
    "cam_miou_fixed",
    "mask_miou",
    "val_miou_ss",
    "val_miou_ms",
    "val_miou_ms_crf",
    "time_train_cam_s",
    "time_cams_s",
    "time_pseudo_masks_s",
    "time_train_seg_s",
    "time_segment_s",
    "time_total_s",
)
COST_METRICS: tuple[str, ...] = ("params_total", "gmacs_total")
METRIC_TITLES = {
    "cam_miou": "CAM mIoU (best t, oracle)",
    "cam_miou_fixed": "CAM mIoU (fixed t)",
    "mask_miou": "mask mIoU",
    "val_miou_ss": "val mIoU (SS)",
    "val_miou_ms": "val mIoU (MS+flip)",
    "val_miou_ms_crf": "val mIoU (MS+flip+CRF)",
    "time_total_s": "time (s)",
}


def fetch_runs(tracking_uri: str, suites: list[str] | None = None) -> pd.DataFrame:
    """Every live trial run of the given suites (all wsss-bench experiments if None), one
    row per run with tags, method params and metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e for e in client.search_experiments() if e.name.startswith(EXPERIMENT_PREFIX)]
    if suites:
        experiments = [e for e in experiments if e.name[len(EXPERIMENT_PREFIX) :] in suites]
    rows: list[dict[str, Any]] = []
    for experiment in experiments:
        token = None
        while True:
            page = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` != ''", max_results=1000, page_token=token)
            for run in page:
                tags = run.data.tags
                if tags.get("wsss.superseded") == "true":
                    continue
                row = {
                    "suite": tags.get("wsss.suite"),
                    "dataset": tags.get("wsss.dataset"),
                    "method": tags.get("wsss.method"),
                    "seed": int(tags.get("wsss.seed", -1)),
                    "trial_id": tags.get(TRIAL_TAG),
                    "status": tags.get(STATUS_TAG),
                    "code_version": tags.get("wsss.git_commit", "unknown"),
                    "hardware": tags.get("wsss.hardware", ""),
                    "error": tags.get("wsss.error", ""),
                    "config": json.dumps({k: v for k, v in sorted(run.data.params.items()) if k.startswith(("method.", "dataset.", "eval."))}),
                }
                row.update(run.data.metrics)
                rows.append(row)
            token = page.token
            if not token:
                break
    return pd.DataFrame(rows)


def _variant_labels(frame: pd.DataFrame) -> pd.Series:
    """A short label per distinct config of a method: '' when a method has one config,
    else the method params that differ between its configs."""
    labels = pd.Series("", index=frame.index)
    for (_, method), group in frame.groupby(["dataset", "method"]):
        configs = group["config"].unique()
        if len(configs) < 2:
            continue
        parsed = {c: json.loads(c) for c in configs}
        keys = sorted({k for p in parsed.values() for k in p})
        differing = [k for k in keys if len({p.get(k) for p in parsed.values()}) > 1]
        for config, params in parsed.items():
            text = ",".join(f"{k.split('.', 1)[1]}={params.get(k)}" for k in differing)
            labels[group.index[group["config"] == config]] = text
    return labels


@dataclass
class Leaderboard:
    table: pd.DataFrame  # one row per (suite, dataset, method, variant)
    failed: pd.DataFrame  # failed / unfinished trials, shown separately


def build_leaderboard(runs: pd.DataFrame, references: dict[str, dict[str, dict[str, float]]] | None = None) -> Leaderboard:
    """Aggregate finished runs over seeds. ``references``: suite -> method -> metric -> value."""
    if runs.empty:
        return Leaderboard(pd.DataFrame(), pd.DataFrame())
    runs = runs.copy()
    runs["variant"] = _variant_labels(runs)
    finished = runs[runs["status"] == "finished"]
    failed = runs[runs["status"] != "finished"][["suite", "dataset", "method", "variant", "seed", "trial_id", "status", "error"]]
    rows = []
    for key, group in finished.groupby(["suite", "dataset", "method", "variant"], sort=True):
        suite, dataset, method, variant = key
        group = group.sort_values("seed")
        row: dict[str, Any] = {"suite": suite, "dataset": dataset, "method": method, "variant": variant,
                               "n_seeds": len(group), "seeds": " ".join(str(s) for s in group["seed"])}
        for metric in REPORT_METRICS:
            values = group[metric].dropna().to_numpy(dtype=float) if metric in group else np.array([])
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        for metric in COST_METRICS:
            row[metric] = float(group[metric].iloc[0]) if metric in group else math.nan
        published = (references or {}).get(suite, {}).get(method, {})
        for metric in ("cam_miou", "mask_miou", "val_miou"):
            if metric in published:
                ours = row["val_miou_ms_crf_mean"] if metric == "val_miou" else row[f"{metric}_mean"]
                row[f"reference_{metric}"] = published[metric]
                row[f"delta_{metric}"] = ours - published[metric]
        row["code_versions"] = " ".join(sorted(group["code_version"].unique()))
        rows.append(row)
    return Leaderboard(pd.DataFrame(rows), failed.reset_index(drop=True))


def _fmt(mean: float, std: float, digits: int = 1) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(board: Leaderboard) -> str:
    table = board.table
    lines = ["# wsss-bench leaderboard", ""]
    lines.append(
        "Protocol: mIoU in %, mean ± std over seeds (std needs n ≥ 2), classes averaged over those present in GT or "
        "prediction. CAM mIoU on the cam-eval split at the sweep's best background threshold (an oracle: the "
        "threshold is chosen with pixel labels) and at the suite's fixed threshold; mask mIoU of the pseudo masks on "
        "the training split; val mIoU single-scale (SS), with the method's multi-scale + flip (MS+flip), and with dense CRF."
    )
    lines.append("")
    if table.empty:
        lines.append("_No finished trials._")
    else:
        head = ["suite", "method", "n"] + [METRIC_TITLES[m] for m in REPORT_METRICS if m in METRIC_TITLES] + ["params (M)", "GMACs", "published", "Δ"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for _, row in table.iterrows():
            name = row["method"] + (f" [{row['variant']}]" if row["variant"] else "")
            cells = [f"{row['suite']}", name, str(row["n_seeds"])]
            cells += [_fmt(row[f"{m}_mean"], row[f"{m}_std"], 0 if m.startswith("time") else 1) for m in REPORT_METRICS if m in METRIC_TITLES]
            cells += [f"{row['params_total'] / 1e6:.2f}", f"{row['gmacs_total']:.2f}"]
            ref = row.get("reference_val_miou", math.nan)
            cells += ["-" if pd.isna(ref) else f"{ref:.1f}", "-" if pd.isna(ref) else f"{row['delta_val_miou']:+.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        mixed = table[table["code_versions"].str.contains(" ")]
        if not mixed.empty:
            lines += ["", "**Mixed code versions** (rows aggregate runs from several commits): " + ", ".join(mixed["method"])]
    if not board.failed.empty:
        lines += ["", "## Failed or unfinished trials (not averaged)", "", "| suite | method | seed | trial | status | error |", "|---|---|---|---|---|---|"]
        for _, row in board.failed.iterrows():
            lines.append(f"| {row['suite']} | {row['method']} | {row['seed']} | {row['trial_id']} | {row['status']} | {str(row['error'])[:120]} |")
    return "\n".join(lines) + "\n"


def leaderboard_table(board: Leaderboard):
    """The leaderboard as a rich Table for the terminal (key columns only)."""
    from rich.table import Table

    table = Table(title="wsss-bench leaderboard (mIoU %, mean ± std over seeds)")
    columns = [("cam_miou", "CAM*"), ("cam_miou_fixed", "CAM@t"), ("mask_miou", "mask"), ("val_miou_ss", "val SS"), ("val_miou_ms_crf", "val MS+CRF"), ("time_total_s", "time s")]
    for title in ["suite", "method", "n"] + [t for _, t in columns] + ["M params", "GMACs"]:
        table.add_column(title)
    for _, row in board.table.iterrows():
        name = row["method"] + (f" [{row['variant']}]" if row["variant"] else "")
        cells = [_fmt(row[f"{m}_mean"], row[f"{m}_std"], 0 if m.startswith("time") else 1) for m, _ in columns]
        table.add_row(row["suite"], name, str(row["n_seeds"]), *cells, f"{row['params_total'] / 1e6:.2f}", f"{row['gmacs_total']:.2f}")
    table.caption = "CAM* = best background threshold (oracle); CAM@t = the suite's fixed threshold"
    return table


def write_report(tracking_uri: str, out_dir: Path, suites: list[str] | None = None, references: dict | None = None) -> Leaderboard:
    """Write leaderboard.md and leaderboard.csv into ``out_dir``; returns the leaderboard."""
    board = build_leaderboard(fetch_runs(tracking_uri, suites), references)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "leaderboard.md").write_text(to_markdown(board))
    board.table.to_csv(out_dir / "leaderboard.csv", index=False)
    return board


def suite_references(suites: list[Suite]) -> dict[str, dict[str, dict[str, float]]]:
    return {s.name: s.reference for s in suites}
