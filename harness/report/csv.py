"""The CSV files (leaderboard.csv, pairwise.csv, per_class.csv, runs.csv); their columns
are documented in harness/report/__init__.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report.leaderboard import PAIRWISE_COLUMNS, PER_CLASS_COLUMNS, RUN_COLUMNS, RUN_METRICS, Leaderboard, leaderboard_columns


def write_csvs(board: Leaderboard, out_dir: Path) -> None:
    board.table.reindex(columns=leaderboard_columns()).to_csv(out_dir / "leaderboard.csv", index=False)
    board.pairwise.reindex(columns=PAIRWISE_COLUMNS).to_csv(out_dir / "pairwise.csv", index=False)
    board.per_class.reindex(columns=PER_CLASS_COLUMNS).to_csv(out_dir / "per_class.csv", index=False)
    board.runs.reindex(columns=RUN_COLUMNS + list(RUN_METRICS)).to_csv(out_dir / "runs.csv", index=False) if not board.runs.empty else \
        pd.DataFrame(columns=RUN_COLUMNS + list(RUN_METRICS)).to_csv(out_dir / "runs.csv", index=False)
