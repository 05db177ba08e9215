"""The report's content, independent of the output format: a list of blocks that
harness/report/markdown.py and harness/report/html.py render, plus the cell formatting
(``fmt_*``) shared by every text output.

Blocks::

    ("h1" | "h2" | "h3" | "p", text)      text may use **bold**, *italic* and `code`
    ("ul", [text, ...])
    ("table", head, rows, css_class)       cells are plain text
    ("img", title, key)                    key: the plot's title in the ``plots`` mapping
    ("gallery", gallery)                   one (suite, dataset) entry of collect_gallery
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.references import REFERENCE_METRICS
from harness.report.leaderboard import (METRIC_TITLES, PER_CLASS_TITLES, PRIMARY_ORDER, QUALITY_METRICS, SHORT_TITLES, THRESHOLD_METRICS, Leaderboard,
                                        _class_sort_key, _is_true, per_class_whats, primary_metric)
from harness.trial import STAGES


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
