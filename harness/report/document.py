"""The report's content, independent of the output format: a list of blocks that
harness/report/markdown.py and harness/report/html.py render, plus the cell formatting
(``fmt_*``) shared by every text output.

Blocks::

    ("h1" | "h2" | "h3" | "p", text)      text may use **bold**, *italic* and `code`
    ("ul", [text, ...])
    ("table", head, rows, css_class)       cells are plain text
    ("img", title, key)                    key: the plot's title in the ``plots`` mapping
    ("gallery", gallery)                   one (suite, dataset) entry of collect_gallery
    ("details", summary, blocks, open)     a collapsible part holding more blocks
    table cells are text, or (text, hover title) where the HTML shows e.g. a CI on hover
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from harness.references import REFERENCE_METRICS
from harness.report.leaderboard import (METRIC_TITLES, PER_CLASS_TITLES, QUALITY_METRICS, SHORT_TITLES, THRESHOLD_METRICS, Leaderboard,
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


HEADLINE_METRICS: tuple[str, ...] = ("cam_miou", "cam_miou_fixed", "mask_miou", "val_miou_ss", "val_miou_ms_crf")
# Which baseline number fills which headline column: the cam-eval split's score for the CAM
# and pseudo-mask columns, the val split's for the val columns (a constant prediction is the
# same at every scale; no CRF is applied to it).
BASELINE_SOURCE = {"cam_miou": "cam_eval_miou", "cam_miou_fixed": "cam_eval_miou", "mask_miou": "cam_eval_miou",
                   "val_miou_ss": "val_miou", "val_miou_ms": "val_miou", "val_miou_ms_crf": "val_miou"}
COST_PLOT_SUFFIX = "mIoU vs training cost"


def _runs(n: str) -> str:
    return "1 run" if n == "1" else f"{n} runs"


def report_blocks(board: Leaderboard, plots: dict[str, Any] | None = None, gallery: dict | None = None,
                  pairwise_metrics: list[str] | None = None) -> list[tuple]:
    """The report's content, independent of the output format, in the order a reader needs
    it: per (suite, dataset) the headline table, its variant legend and the mIoU-vs-cost plot
    (the first screen); then everything else in collapsible ``details`` blocks.
    ``pairwise_metrics``: the metrics whose pairwise comparisons are shown (default: the
    section's primary metric; pairwise.csv always has them all)."""
    plots = plots or {}
    out: list[tuple] = [("h1", "wsss-bench leaderboard")]
    if board.meta.get("tracking_uri"):
        out.append(("p", f"Generated {board.meta.get('generated', '')} from `{board.meta['tracking_uri']}` "
                         f"({board.meta.get('selection', '')}; {_runs(board.meta.get('n_runs', '?'))})."))
    if board.empty:
        out.append(("p", "**Protocol.** " + PROTOCOL))
        out.append(("p", "*No trial runs matched.*"))
        return out
    out.append(("p", "mIoU in %, mean ± sample std over seeds (hover a cell for its 95% CI and n); n = finished / expected seeds. "
                     "Rank 1 = best; a row's rank is 1 + the number of rows distinguishably better than it (rows are listed by mean, so "
                     "ranks need not increase down the table), '=' = not distinguishable from seed noise, '-' = fewer than 2 seeds. "
                     "The `baseline:` rows are trivial predictions scored on the same splits. The protocol, "
                     "warnings and every other table are below the headline tables."))
    for suite, dataset in sections(board):
        out += _headline_blocks(board, suite, dataset, plots)
    if board.warnings:
        out.append(("details", f"Warnings ({len(board.warnings)})", [("ul", list(board.warnings))], False))
    for suite, dataset in sections(board):
        out += _detail_blocks(board, suite, dataset, plots, gallery, pairwise_metrics)
    if not board.failed.empty:
        tags = _tags(board)
        out.append(("details", f"Failed or unfinished trials (not averaged): {len(board.failed)}",
                    [("table", ["suite", "dataset", "row", "seed", "trial", "status", "error"],
                      [[r["suite"], r["dataset"], tags.get(r["label"], r["label"]), str(r["seed"]), str(r["trial_id"]), r["status"],
                        str(r["error"] or "")[:300]] for _, r in board.failed.iterrows()], "failed")], False))
    out.append(("details", "Protocol", [("p", "**Protocol.** " + PROTOCOL)], False))
    out.append(("p", "CSV files: `leaderboard.csv` (one row per table row, with the full configuration label), `pairwise.csv`, "
                     "`per_class.csv`, `runs.csv`; their columns are documented in `harness/report/__init__.py`."))
    return out


def _section(frame: pd.DataFrame, suite: str, dataset: str) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[(frame["suite"] == suite) & (frame["dataset"] == dataset)]


def _tags(board: Leaderboard) -> dict[str, str]:
    """Full row label -> its short display tag (the label itself for older tables)."""
    if board.table.empty or "tag" not in board.table:
        return {}
    return {label: (tag if isinstance(tag, str) and tag else label) for label, tag in zip(board.table["label"], board.table["tag"])}


BELOW_BASELINE = "▾"  # a headline mean at or below the all-background baseline


def _headline_cell(row: pd.Series, metric: str, background: float = math.nan) -> tuple[str, str] | str:
    """'62.0 ± 2.0' with '95% CI [57.0, 67.0], n=3' as the hover title ('45.0 (n=1)': no CI);
    a mean at or below ``background`` (the all-background baseline on the same images) gets
    :data:`BELOW_BASELINE`, so a reader sees at once what does not beat trivial."""
    text = fmt_stat(row, metric, ci=False)
    if text == "-":
        return text
    n = int(row.get(f"{metric}_n", 0) or 0)
    low, high = row.get(f"{metric}_ci_low", math.nan), row.get(f"{metric}_ci_high", math.nan)
    title = f"95% CI [{low:.1f}, {high:.1f}], n={n}" if not pd.isna(low) else f"n={n}: no std or CI"
    mean = row.get(f"{metric}_mean", math.nan)
    if not pd.isna(background) and not pd.isna(mean) and round(float(mean), 1) <= round(float(background), 1):
        text, title = f"{text} {BELOW_BASELINE}", f"{title}; at or below the all-background baseline ({background:.1f})"
    return (text, title)


def _device_cell(row: pd.Series) -> str:
    """Device hours of the whole trial: GPU-h on a GPU, CPU core-h on a CPU."""
    hours = row.get("device_h_total", math.nan)
    if pd.isna(hours):
        return "-"
    unit = {"gpu": "GPU-h", "cpu": "CPU-h"}.get(row.get("device_kind", ""), "device-h")
    return f"{hours:.2g} {unit}" if hours < 10 else f"{hours:.0f} {unit}"


def _published_metric(sub: pd.DataFrame, primary: str | None) -> str | None:
    """The published number shown in the headline: the primary metric's where any row has
    one, else the first reference metric that any row has."""
    present = [m for m in REFERENCE_METRICS if f"reference_{m}" in sub and sub[f"reference_{m}"].notna().any()]
    if not present:
        return None
    return primary if primary in present else present[0]


def _published_cell(row: pd.Series, metric: str) -> tuple[str, str] | str:
    ref = row.get(f"reference_{metric}", math.nan)
    if pd.isna(ref):
        return "-"
    note = row.get(f"reference_note_{metric}", "")
    if isinstance(note, str) and note:
        return (f"{ref:.1f} (Δ n/a)", note)
    delta = row.get(f"delta_{metric}", math.nan)
    return (f"{ref:.1f} (Δ {_signed_1(delta)})", "Δ = ours − published, same declared protocol")


def _signed_1(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:+.1f}"


def _headline_blocks(board: Leaderboard, suite: str, dataset: str, plots: dict[str, Any]) -> list[tuple]:
    """The first screen of a section: one table (rank, method, n, the five mIoU numbers,
    device hours, published number and Δ), trivial baselines as rows, the variant legend and
    the mIoU-vs-cost plot."""
    out: list[tuple] = [("h2", f"{suite} / {dataset}")]
    sub = _section(board.table, suite, dataset)
    if sub.empty:
        out.append(("p", "*No finished trials.*"))
        return out
    primary = primary_metric(sub)
    metrics = [m for m in HEADLINE_METRICS if f"{m}_n" in sub and (sub[f"{m}_n"] > 0).any()]
    published = _published_metric(sub, primary)
    head = ["rank" + (f" ({SHORT_TITLES[primary]})" if primary else ""), "method", "n"] + [SHORT_TITLES[m] for m in metrics]
    head += ["device time"] + ([f"published {SHORT_TITLES[published]} (Δ)"] if published else [])
    rows: list[list[Any]] = []
    base = _section(board.baselines, suite, dataset)
    background = base[base["baseline"] == "all background"] if not base.empty else base
    floor = {m: float(background[BASELINE_SOURCE[m]].iloc[0]) if len(background) and BASELINE_SOURCE[m] in background else math.nan
             for m in metrics}
    for _, r in _ordered(sub, primary).iterrows():
        expected = r["n_seeds"] + (len(str(r["missing_seeds"]).split()) if r["missing_seeds"] else 0)
        cells: list[Any] = [fmt_rank(r, primary, board.table) if primary else "-", _tag(r) + _flag(r), f"{r['n_seeds']}/{expected}"]
        cells += [_headline_cell(r, m, floor[m]) for m in metrics] + [_device_cell(r)]
        if published:
            cells.append(_published_cell(r, published))
        rows.append(cells)
    for _, b in base.iterrows():
        where = f"{b['cam_eval_split']} ({b['n_cam_eval']} images) / {b['val_split']} ({b['n_val']} images)"
        cells = ["", f"baseline: {b['baseline']}", "-"]
        cells += [(fmt_num(b.get(BASELINE_SOURCE[m], math.nan)), f"computed by the harness on {where}") for m in metrics]
        cells += ["-"] + (["-"] if published else [])
        rows.append(cells)
    out.append(("table", head, rows, "main"))
    departures = board.departures.get((suite, dataset), [])
    if departures:
        out.append(("p", "**Not the suite's recipe**: every row of a method shares these settings, which differ from the "
                         "suite's: " + "; ".join(f"{method} `{text}`" for method, text in departures) + "."))
    legend = board.legends.get((suite, dataset), [])
    if legend:
        out.append(("p", "Variants (only the settings that differ between a method's configurations; the rest is the suite's "
                         "recipe, full labels in leaderboard.csv): " + "; ".join(f"`{tag}` {text}" for tag, text in legend) + "."))
    if not base.empty:
        out.append(("p", "Baselines: *all background* labels every pixel background; *image label everywhere* labels every pixel "
                         "with the image's present class (the first in class order when several): what image labels give with no "
                         "localisation at all. CAM / mask columns: on the cam-eval images; val columns: on the val images. "
                         f"{BELOW_BASELINE} = a mean at or below the all-background baseline."))
    cost = [title for title in plots if title.startswith(f"{suite}/{dataset}:") and title.endswith(COST_PLOT_SUFFIX)]
    out += [("img", title, title) for title in cost]
    return out


def _tag(row: pd.Series) -> str:
    tag = row.get("tag", "")
    return tag if isinstance(tag, str) and tag else row["label"]


def _detail_blocks(board: Leaderboard, suite: str, dataset: str, plots: dict[str, Any], gallery: dict | None,
                   pairwise_metrics: list[str] | None) -> list[tuple]:
    """Everything below the first screen for one section, each part collapsible."""
    out: list[tuple] = [("h2", f"{suite} / {dataset}: details")]
    if (suite, dataset) in board.protocols:
        out.append(("p", f"Evaluation: {board.protocols[(suite, dataset)]}."))
    sub = _section(board.table, suite, dataset)
    if not sub.empty:
        out += _suite_blocks(board, sub, pairwise_metrics)
    shown = [title for title in plots if title.startswith(f"{suite}/{dataset}:") and not title.endswith(COST_PLOT_SUFFIX)]
    if shown:
        out.append(("details", "Plots: CAM threshold curves, per-class IoU", [("img", title, title) for title in shown], False))
    if gallery and (suite, dataset) in gallery:
        out.append(("details", "Gallery", [
            ("p", "The same fixed images for every method (from each row's lowest finished seed): image, ground truth, "
                  "CAM (max over present classes, on the image), pseudo mask, single-scale prediction. White = ignore (255)."),
            ("gallery", gallery[(suite, dataset)])], False))
    return out


def _reference_cell(r: pd.Series, metric: str) -> str:
    """'published / ours / Δ', the Δ replaced by the reason when the protocols differ."""
    note = r.get(f"reference_note_{metric}", "")
    if isinstance(note, str) and note:
        last = note
    else:
        last = "-" if pd.isna(r[f"delta_{metric}"]) else format(r[f"delta_{metric}"], "+.1f")
    return f"{fmt_num(r[f'reference_{metric}'])} / {fmt_num(r[f'{metric}_mean'])} / {last}"


def _suite_blocks(board: Leaderboard, sub: pd.DataFrame, pairwise_metrics: list[str] | None = None) -> list[tuple]:
    """The collapsible parts of a section: full quality table, published numbers, pairwise
    comparisons, cost, per-class IoU."""
    out: list[tuple] = []
    suite, dataset = sub["suite"].iloc[0], sub["dataset"].iloc[0]
    metrics = main_columns(sub)
    primary = primary_metric(sub)
    head = ["rank" + (f" ({SHORT_TITLES[primary]})" if primary else ""), "method", "seg", "n", "seeds"]
    head += [METRIC_TITLES[m] for m in metrics]
    rows = []
    for _, r in _ordered(sub, primary).iterrows():
        cells = [fmt_rank(r, primary, board.table) if primary else "-", _tag(r) + _flag(r), r["segmentation"], str(r["n_seeds"]),
                 (r["seeds"] or "none") + (f" (missing {r['missing_seeds']})" if r["missing_seeds"] else "")
                 + (f" ({r['n_failed']} failed)" if r["n_failed"] else "")]
        cells += [fmt_stat(r, m, 2 if m in THRESHOLD_METRICS else 1, n_if_differs=r["n_seeds"]) for m in metrics]
        rows.append(cells)
    quality: list[tuple] = [("table", head, rows, "quality")]
    if any(r["code_flag"] for _, r in sub.iterrows()):
        quality.append(("p", "Flags: † mixed code versions (one row per commit, never averaged together), ‡ uncommitted changes, "
                             "? commit unknown."))
    quality += _versions_blocks(sub)
    out.append(("details", "Quality (mIoU %): every metric with its 95% CI, seeds, library versions", quality, False))

    refs = [m for m in REFERENCE_METRICS if sub[f"reference_{m}"].notna().any()]
    if refs:
        part: list[tuple] = []
        sources = sorted({s for s in sub["reference_source"] if isinstance(s, str) and s})
        if sources:
            part.append(("p", "Source: " + "; ".join(sources) + "."))
        part.append(("p", "Δ = ours − published, printed only where the published number's declared protocol (split, "
                          "scales, CRF, IRN, oracle epoch, method settings such as L_reg or backbone: the suite file's "
                          "`[reference.<method>]`) matches the row's; otherwise the cell says why not. On a different "
                          "dataset size or budget the difference is context, not a reproduction verdict."))
        with_refs = sub[sub[[f"reference_{m}" for m in refs]].notna().any(axis=1)]
        part.append(("table", ["method", "n"] + [f"{SHORT_TITLES[m]}: published / ours / Δ" for m in refs],
                     [[_tag(r), str(r["n_seeds"])] + [_reference_cell(r, m) for m in refs] for _, r in with_refs.iterrows()], "refs"))
        out.append(("details", "Published numbers", part, False))

    pair = _section(board.pairwise, suite, dataset)
    shown = [m for m in (pairwise_metrics or ([primary] if primary else [])) if not pair.empty and (pair["metric"] == m).any()]
    if shown:
        out.append(("details", "Pairwise comparisons (" + ", ".join(SHORT_TITLES[m] for m in shown) + "; paired over matched seeds, "
                               "Holm-corrected)", _pairwise_blocks(pair, sub, shown), False))

    cost_head = ["method", "hardware"] + [f"{s}" for s in STAGES] + ["total", "device time", "train", "params (M)", "GMACs",
                                                                      "peak RSS (MB)", "peak GPU (MB)"]
    cost = [("p", "Per stage: wall time (device time), means over seeds; device time = GPU time on a GPU, CPU core time "
                  "(process CPU time) on a CPU. train = train_cam + pseudo_masks + train_seg wall time; peak memory = "
                  "largest over stages and seeds; GMACs = one forward pass per network at its input size."),
            ("table", cost_head, [[_tag(r), r["hardware"] or "-"] +
                                  [f"{fmt_hours(r[f'time_{s}_s_mean'] / 3600)} ({fmt_hours(r[f'device_h_{s}'])})" for s in STAGES] +
                                  [fmt_hours(r["time_total_s_mean"] / 3600), fmt_hours(r["device_h_total"]), fmt_hours(r["train_wall_h"]),
                                   fmt_num(r["params_total"] / 1e6, 2), fmt_num(r["gmacs_total"], 2), fmt_num(r["peak_rss_mb"], 0),
                                   fmt_num(r["peak_gpu_mb"], 0)] for _, r in sub.iterrows()], "cost")]
    nets = [(_tag(r), r["networks"]) for _, r in sub.iterrows() if isinstance(r["networks"], str) and r["networks"]]
    if nets:
        cost.append(("p", "Networks (params / GMACs): " + "; ".join(f"{label}: {text}" for label, text in nets)))
    out.append(("details", "Cost: time per stage, memory, parameters", cost, False))

    pc = _section(board.per_class, suite, dataset)
    if not pc.empty:
        tags = dict(zip(sub["label"], (_tag(r) for _, r in sub.iterrows())))
        labels = [lb for lb in _ordered(sub, primary)["label"] if lb in set(pc["label"])]
        part = []
        for what in per_class_whats(pc):
            piece = pc[pc["what"] == what]
            classes = sorted(set(piece["class"]), key=_class_sort_key)
            grid = piece.set_index(["class", "label"])
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
            part.append(("h3", f"Per-class IoU: {PER_CLASS_TITLES[what]}"))
            part.append(("table", ["class"] + [tags[lb] for lb in labels], rows, "per-class"))
        out.append(("details", "Per-class IoU", part, False))
    return out


def _pairwise_blocks(pair: pd.DataFrame, sub: pd.DataFrame, metrics: list[str]) -> list[tuple]:
    """Per metric: the compact grid (row − column, mean paired difference) and the list with
    CIs, p and Holm-adjusted p."""
    tags = dict(zip(sub["label"], (_tag(r) for _, r in sub.iterrows())))
    out: list[tuple] = [("p", "A − B in mIoU points: mean over the seeds both rows have, with the 95% t-interval of the mean paired "
                              "difference and the paired t-test's p; *distinguishable* when the interval excludes 0. p (Holm) "
                              "corrects p for the number of pairs compared on the metric (Holm's step-down): a **\\*** in the grid "
                              "marks p (Holm) < 0.05, i.e. a difference that survives comparing every pair. Ranks use the "
                              "per-pair interval. Grid cells: row − column; `n<2`: fewer than two matched seeds.")]
    for metric in metrics:
        part = pair[pair["metric"] == metric]
        primary = metric
        order = [lb for lb in _ordered(sub, primary)["label"] if lb in set(part["a"]) | set(part["b"])]
        lookup = {(p["a"], p["b"]): p for _, p in part.iterrows()}
        rows = []
        for a in order:
            cells = [tags.get(a, a)]
            for b in order:
                if a == b:
                    cells.append("·")
                    continue
                p, sign = (lookup[(a, b)], 1.0) if (a, b) in lookup else (lookup.get((b, a)), -1.0)
                if p is None or pd.isna(p["mean_diff"]):
                    cells.append("-")
                elif p["n_matched"] < 2:
                    cells.append(f"{sign * p['mean_diff']:+.1f} n<2")
                else:
                    star = "*" if not pd.isna(p.get("p_holm", math.nan)) and p["p_holm"] < 0.05 else ""
                    cells.append(f"{sign * p['mean_diff']:+.1f}{star}")
            rows.append(cells)
        out.append(("h3", f"{SHORT_TITLES[metric]}: row − column"))
        out.append(("table", [SHORT_TITLES[metric]] + [tags.get(b, b) for b in order], rows, "pairwise-grid"))
        listed = part.sort_values(["a", "b"])
        out.append(("table", ["A", "B", "n matched", "A − B", "95% CI", "p", "p (Holm)", "verdict"],
                    [[tags.get(p["a"], p["a"]), tags.get(p["b"], p["b"]), str(p["n_matched"]), _signed(p["mean_diff"]),
                      "-" if pd.isna(p["ci_low"]) else f"[{p['ci_low']:+.2f}, {p['ci_high']:+.2f}]",
                      "-" if pd.isna(p["p_value"]) else f"{p['p_value']:.3f}",
                      "-" if pd.isna(p.get("p_holm", math.nan)) else f"{p['p_holm']:.3f}",
                      _retag(p["verdict"], tags)] for _, p in listed.iterrows()], "pairwise"))
    return out


def _retag(text: str, tags: dict[str, str]) -> str:
    """A verdict such as 'weaktr [a=1] better' with the row's short tag."""
    for label in sorted(tags, key=len, reverse=True):
        if text.startswith(label + " "):
            return tags[label] + text[len(label):]
    return text


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
