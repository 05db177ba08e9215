"""Report plots (matplotlib, Agg, no global pyplot state): per (suite, dataset)

* ``pareto``: primary mIoU vs training wall hours, 95% CI error bars, the Pareto front
  (rows no other row beats on both cost and mIoU) joined by a line;
* ``cam_curve``: CAM mIoU vs background threshold, mean over seeds with a ± std band, the
  oracle best threshold marked, the fixed thresholds used (cam_fixed_threshold) as dashed lines;
* ``per_class_<what>``: grouped per-class IoU bars (mean, std whiskers) for CAM, pseudo
  masks and the best val protocol.

Every function returns the written PNG paths keyed by a title that starts with
``"<suite>/<dataset>: "``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from harness.report.leaderboard import Leaderboard

DPI = 100


def _colors(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(sorted(labels))}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (lower x and higher y are better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def make_plots(board: "Leaderboard", curves: dict[str, list[tuple[float, float]]], out_dir: Path) -> dict[str, Path]:
    from harness.report.leaderboard import PER_CLASS_TITLES, SHORT_TITLES, per_class_whats, primary_metric

    out: dict[str, Path] = {}
    for (suite, dataset), sub in board.table.groupby(["suite", "dataset"], sort=True):
        prefix = f"{suite}/{dataset}: "
        stem = f"{_slug(suite)}-{_slug(dataset)}"
        colors = _colors(list(sub["label"]))
        names = _names(sub)
        primary = primary_metric(sub)
        if primary:
            path = pareto_plot(sub, primary, SHORT_TITLES[primary], colors, out_dir / f"{stem}-pareto.png", names)
            if path:
                out[prefix + f"{SHORT_TITLES[primary]} mIoU vs training cost"] = path
        runs = board.runs[(board.runs["suite"] == suite) & (board.runs["dataset"] == dataset) & (board.runs["status"] == "finished")]
        path = cam_curve_plot(runs, curves, colors, out_dir / f"{stem}-cam-curve.png", names)
        if path:
            out[prefix + "CAM mIoU vs background threshold"] = path
        pc = board.per_class
        if not pc.empty:
            pc = pc[(pc["suite"] == suite) & (pc["dataset"] == dataset)]
            for what in per_class_whats(pc):
                path = per_class_plot(pc[pc["what"] == what], list(sub["label"]), colors, PER_CLASS_TITLES[what],
                                      out_dir / f"{stem}-per-class-{what}.png", names)
                if path:
                    out[prefix + f"per-class IoU, {PER_CLASS_TITLES[what]}"] = path
    return out


def _names(sub: pd.DataFrame) -> dict[str, str]:
    """Row label -> the short tag the report's tables show (legends stay readable)."""
    if "tag" not in sub:
        return {}
    return {label: tag for label, tag in zip(sub["label"], sub["tag"]) if isinstance(tag, str) and tag}


def pareto_plot(sub: pd.DataFrame, metric: str, title: str, colors: dict, path: Path, names: dict[str, str] | None = None) -> Path | None:
    rows = sub[sub[f"{metric}_mean"].notna() & sub["train_wall_h"].notna() & (sub["train_wall_h"] > 0)]
    if rows.empty:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = rows["train_wall_h"].to_numpy(float), rows[f"{metric}_mean"].to_numpy(float)
    unit = "hours"
    if xs.max() < 1.0:
        xs, unit = xs * 60.0, "minutes"
    for (_, r), x, y in zip(rows.iterrows(), xs, ys):
        below, above = (y - r[f"{metric}_ci_low"], r[f"{metric}_ci_high"] - y) if not pd.isna(r[f"{metric}_ci_low"]) else (0.0, 0.0)
        ax.errorbar([x], [y], yerr=[[below], [above]], fmt="o", color=colors[r["label"]], capsize=3, label=f"{(names or {}).get(r['label'], r['label'])} (n={r['n_seeds']})")
    front = pareto_front(list(zip(xs, ys)))
    if len(front) > 1:
        ax.plot(xs[front], ys[front], color="0.4", linestyle="--", linewidth=1, label="Pareto front", zorder=0)
    if xs.max() / max(xs.min(), 1e-9) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(f"training wall {unit} (train_cam + pseudo_masks + train_seg), mean over seeds")
    ax.set_ylabel(f"{title} mIoU (%)")
    hardware = sorted(set(h for h in sub["hardware"] if h))
    ax.set_title(f"{title} vs training cost" + (f"\n{'; '.join(hardware)}" if 0 < len(hardware) <= 2 else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def cam_curve_plot(runs: pd.DataFrame, curves: dict[str, list[tuple[float, float]]], colors: dict, path: Path,
                   names: dict[str, str] | None = None) -> Path | None:
    by_label: dict[str, list[dict[float, float]]] = {}
    fixed: set[float] = set()
    for _, run in runs.iterrows():
        curve = curves.get(run["run_id"])
        if not curve:
            continue
        by_label.setdefault(run["label"], []).append({round(t, 4): v for t, v in curve})
        config = json.loads(run.get("config", "{}") or "{}")
        declared = run.get("cam_fixed_threshold")  # the threshold used (the method's own); older runs: the suite's
        if declared is not None and not pd.isna(declared):
            fixed.add(float(declared))
        elif "eval.fixed_threshold" in config:
            try:
                fixed.add(float(config["eval.fixed_threshold"]))
            except ValueError:
                pass
    if not by_label:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for label in sorted(by_label):
        seeds = by_label[label]
        thresholds = sorted(set.intersection(*(set(c) for c in seeds)))
        if not thresholds:
            continue
        values = np.array([[c[t] for t in thresholds] for c in seeds])
        mean = values.mean(0)
        color = colors.get(label, "k")
        ax.plot(thresholds, mean, color=color, label=f"{(names or {}).get(label, label)} (n={len(seeds)})")
        if len(seeds) > 1:
            std = values.std(0, ddof=1)
            ax.fill_between(thresholds, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        best = int(np.argmax(mean))
        ax.plot([thresholds[best]], [mean[best]], marker="*", markersize=11, color=color)
    for t in sorted(fixed):
        ax.axvline(t, color="0.3", linestyle="--", linewidth=1)
        ax.text(t, ax.get_ylim()[1], f"fixed t={t:g} ", rotation=90, va="top", ha="right", fontsize=8, color="0.3")
    ax.set_xlabel("background threshold t")
    ax.set_ylabel("CAM mIoU (%)")
    ax.set_title("CAM mIoU vs background threshold (mean ± std over seeds; ★ = oracle best t)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def per_class_plot(part: pd.DataFrame, labels: list[str], colors: dict, title: str, path: Path,
                   names: dict[str, str] | None = None) -> Path | None:
    if part.empty:
        return None
    from harness.report.leaderboard import _class_sort_key

    classes = sorted(set(part["class"]), key=_class_sort_key)
    labels = [lb for lb in sorted(labels) if lb in set(part["label"])]
    grid = part.set_index(["class", "label"])
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(max(6.4, 0.5 * len(classes) * max(1, len(labels)) ** 0.5 + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(classes))
    for i, label in enumerate(labels):
        means = [grid.loc[(c, label), "mean"] if (c, label) in grid.index else np.nan for c in classes]
        stds = [grid.loc[(c, label), "std"] if (c, label) in grid.index else np.nan for c in classes]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, means, width, yerr=np.nan_to_num(stds), capsize=2,
               color=colors.get(label, "k"), label=(names or {}).get(label, label), error_kw={"linewidth": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-class IoU, {title} (mean, whiskers = std over seeds)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
