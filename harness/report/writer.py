"""``write_report``: store -> leaderboard -> every renderer, into one output folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from harness.errors import ResultsError
from harness.report.csv import write_csvs
from harness.report.gallery import collect_gallery
from harness.report.leaderboard import Leaderboard, build_leaderboard
from harness.report.markdown import to_markdown
from harness.report.store import _describe_selection, fetch_curves, fetch_runs


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
    baselines: bool = True,
    cache_dir: Path | None = None,
    pairwise_metrics: list[str] | None = None,
    recipes: dict[tuple[str, str], dict[str, str]] | None = None,
) -> Leaderboard:
    """Write leaderboard.md / .csv / .html (+ pairwise.csv, per_class.csv, runs.csv, plots/,
    gallery/) into ``out_dir`` (its plots/ and gallery/ folders are replaced); returns the
    leaderboard. ``require_runs``: raise a ResultsError instead of writing an empty report
    when nothing matches. ``baselines``: add the trivial-baseline rows
    (harness/report/baselines.py), computed from the data where it is at hand and cached in
    ``cache_dir`` (the results' ``cache/``; None: a temporary folder, nothing kept).
    ``pairwise_metrics``: metrics whose pairwise comparisons the md / html show (default the
    primary one; pairwise.csv has every metric). ``recipes``: (suite, method) -> the suite
    recipe's params (harness.sweep.recipe_params), to mark the variant that is the recipe."""
    runs = fetch_runs(tracking_uri, suites, experiments, filter_string)
    if runs.empty and require_runs:
        raise ResultsError(
            f"No wsss-bench trial runs in {tracking_uri} match ({_describe_selection(suites, experiments, filter_string)}). "
            "Run `wsss-bench run --methods ... --dataset ...` first, or point --results / --tracking-uri at the store that has them."
        )
    base_rows, base_notes = None, []
    if baselines and not runs.empty:
        from harness.report.baselines import compute_baselines

        if cache_dir is None:
            with tempfile.TemporaryDirectory(prefix="wsss-baselines-") as tmp:
                base_rows, base_notes = compute_baselines(runs, Path(tmp) / "cache")
        else:
            base_rows, base_notes = compute_baselines(runs, Path(cache_dir))
    board = build_leaderboard(runs, references, expected_seeds, base_rows, recipes)
    board.warnings += base_notes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("plots", "gallery"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)  # stale files from an older report
    plot_files: dict[str, Path] = {}
    if plots and not board.table.empty:
        from harness.report.plots import make_plots

        curves = fetch_curves(tracking_uri, board.runs.loc[board.runs["status"] == "finished", "run_id"])
        plot_files = make_plots(board, curves, out_dir / "plots")
    gallery_data = collect_gallery(board, tracking_uri, out_dir) if gallery else {}
    rel_plots = {title: path.relative_to(out_dir).as_posix() for title, path in plot_files.items()}
    rel_gallery = {
        key: {"ids": g["ids"], "rows": [{**e, "images": {i: {k: p.relative_to(out_dir).as_posix() for k, p in kinds.items()}
                                                             for i, kinds in e["images"].items()}} for e in g["rows"]]}
        for key, g in gallery_data.items()
    }
    (out_dir / "leaderboard.md").write_text(to_markdown(board, rel_plots, rel_gallery, pairwise_metrics))
    write_csvs(board, out_dir)
    if html:
        from harness.report.html import render_html

        (out_dir / "leaderboard.html").write_text(render_html(board, plot_files, gallery_data, pairwise_metrics), encoding="utf-8")
    return board
