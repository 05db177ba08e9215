"""The leaderboard as a rich table for the terminal (key columns only; the files have
everything)."""

from __future__ import annotations

from harness.report.document import BASELINE_SOURCE, _flag, fmt_hours, fmt_num, fmt_rank, fmt_stat
from harness.report.leaderboard import SHORT_TITLES, Leaderboard, primary_metric


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
    shown = set(zip(board.table["suite"], board.table["dataset"]))
    for _, b in board.baselines.iterrows() if not board.baselines.empty else []:
        if (b["suite"], b["dataset"]) not in shown:
            continue
        lead = [b["suite"]] if len(suites) > 1 else []
        table.add_row(*lead, f"[italic]baseline: {escape(b['baseline'])}", "-",
                      *[fmt_num(b[BASELINE_SOURCE[m]]) for m, _ in columns], "-", "-", "-", "-")
    table.caption = (f"n = finished/expected seeds. CAM* = best background threshold (oracle); CAM@t = the method's own fixed threshold. Rank by "
                     f"{SHORT_TITLES.get(primary, '-')}; '=' = not distinguishable from seed noise; no rank with n < 2."
                     + (" Baselines: trivial predictions on the same splits." if not board.baselines.empty else ""))
    return table
