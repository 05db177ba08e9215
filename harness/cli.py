"""``wsss-bench``: run sweeps, write leaderboards, list what exists.

    wsss-bench run --methods cam,weaktr --dataset synthetic [--seeds 0,1,2] [key=value ...]
    wsss-bench report [--suite NAME ...]
    wsss-bench list
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.errors import ConfigError, ResultsError, WsssError

console = Console()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-bench", description="Benchmark weakly-supervised semantic segmentation methods.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a sweep of trials")
    run.add_argument("--methods", required=True, help="comma-separated method names (see `wsss-bench list`)")
    run.add_argument("--dataset", help="dataset name; uses the suite of the same name when one exists")
    run.add_argument("--suite", help="suite name (benchmarks/<name>.toml) or path to a suite file")
    run.add_argument("--data-root", help="dataset root directory (overrides the suite's)")
    run.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    _common(run)
    run.add_argument("--force", action="store_true", help="re-run finished trials (old runs are kept, marked superseded)")
    run.add_argument("--dry-run", action="store_true", help="print the trial matrix with each trial's state; run nothing")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="hyper-parameter overrides: key=, method.key=, dataset.key=, eval.key=")

    report = sub.add_parser("report", help="write leaderboard.md / .csv from MLflow")
    _common(report)
    report.add_argument("--suite", action="append", help="only these suites (repeatable); default all")
    report.add_argument("--out", help="output directory (default <results>/report)")

    sub.add_parser("list", help="list methods, datasets and suites")
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=os.environ.get("WSSS_RESULTS", "results"), help="results directory (default ./results)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="MLflow tracking URI (default sqlite:///<results>/mlflow.db)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run, "report": cmd_report, "list": cmd_list}[args.command](args)
    except WsssError as exc:
        console.print(f"[bold red]{type(exc).__name__}:[/] {escape(str(exc))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted. Finished trials and stages are kept; run the same command again to resume.")
        return 130


def _results_dir(path: str) -> Path:
    results = Path(path).expanduser().resolve()
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ResultsError(f"Results directory {results} is not writable ({exc.strerror}). Pass --results DIR with a writable directory.") from None
    return results


def _tracking_uri(args, results: Path) -> str:
    from harness.tracking import default_tracking_uri

    return args.tracking_uri or default_tracking_uri(results)


def _split_list(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not items:
        raise ConfigError(f"--{what} is empty; give a comma-separated list.")
    return items


def cmd_run(args) -> int:
    from harness.config import default_suite, load_suite, parse_overrides
    from harness.report import suite_references, write_report
    from harness.sweep import plan_trials, run_local, sweep_key, trial_state
    from harness.tracking import Tracker

    if not args.suite and not args.dataset:
        raise ConfigError("Pass --dataset NAME (e.g. synthetic, voc, coco) or --suite NAME|FILE.")
    suite = load_suite(args.suite) if args.suite else default_suite(args.dataset)
    if args.suite and args.dataset and args.dataset != suite.dataset:
        raise ConfigError(f"--dataset {args.dataset} contradicts suite {suite.name!r}, whose dataset is {suite.dataset!r}.")
    methods = _split_list(args.methods, "methods")
    try:
        seeds = [int(s) for s in _split_list(args.seeds, "seeds")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}.") from None
    results = _results_dir(args.results)
    overrides = parse_overrides(args.overrides)
    specs = plan_trials(suite, methods, seeds, overrides, args.data_root, results / "cache")
    uri = _tracking_uri(args, results)
    tracker = Tracker(uri, suite.name)

    if args.dry_run:
        table = Table(title=f"Trials of suite {suite.name} ({len(specs)})")
        for column in ("trial", "method", "dataset", "seed", "state"):
            table.add_column(column)
        for spec in specs:
            table.add_row(spec.trial_id, spec.method, spec.dataset, str(spec.seed), trial_state(spec, results, tracker))
        console.print(table)
        return 0

    parent = tracker.sweep_run(sweep_key(specs), f"wsss-bench run --methods {args.methods} ({suite.name})")
    console.print(f"[bold]Suite[/] {suite.name}: {len(specs)} trial(s) -> {results}  (MLflow: {uri})")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as progress:
        sweep_task = progress.add_task("[bold]trials", total=len(specs))

        def factory(spec):
            stage_task = progress.add_task(f"{spec.label} [dim]{spec.trial_id}", total=None)

            def report(stage: str, done: int, total: int) -> None:
                progress.update(stage_task, description=f"{spec.label} · {stage}", completed=done, total=total or None)

            return report

        outcomes = run_local(specs, results, uri, args.device, args.force, parent, factory,
                             on_outcome=lambda outcome: progress.advance(sweep_task))
    _print_summary(outcomes)
    board = write_report(uri, results / "report" / suite.name, [suite.name], suite_references([suite]))
    _print_leaderboard(board, results / "report" / suite.name)
    return 1 if any(o.state == "failed" for o in outcomes) else 0


def _print_summary(outcomes) -> None:
    table = Table(title="Trials")
    for column in ("trial", "method", "seed", "state", "CAM", "mask", "val SS", "val MS+CRF", "time (s)"):
        table.add_column(column)
    for o in outcomes:
        m = o.metrics
        cell = lambda k: f"{m[k]:.1f}" if k in m else "-"  # noqa: E731
        state = {"failed": "[red]failed", "skipped": "[dim]skipped", "finished": "[green]finished"}.get(o.state, o.state)
        table.add_row(o.spec.trial_id, o.spec.method, str(o.spec.seed), state, cell("cam_miou"), cell("mask_miou"), cell("val_miou_ss"), cell("val_miou_ms_crf"), f"{m.get('time_total_s', 0):.0f}")
    console.print(table)
    for o in outcomes:
        if o.state == "failed":
            console.print(f"[red]{o.spec.label} ({o.spec.trial_id}) failed:[/] {escape(o.error)}", soft_wrap=True)


def _print_leaderboard(board, out_dir: Path) -> None:
    """A compact terminal view; the full table is in the written files."""
    from harness.report import leaderboard_table

    console.print(leaderboard_table(board))
    if not board.failed.empty:
        console.print(f"[red]{len(board.failed)} failed or unfinished trial(s) are listed in the report, not averaged.")
    console.print(f"Leaderboard written to {out_dir}/leaderboard.md and .csv")


def cmd_report(args) -> int:
    from harness.config import list_suites, load_suite
    from harness.report import suite_references, write_report

    results = _results_dir(args.results)
    uri = _tracking_uri(args, results)
    from harness.tracking import check_tracking_uri

    check_tracking_uri(uri)
    suites = [load_suite(str(p)) for p in list_suites().values()]
    out = Path(args.out) if args.out else results / "report"
    board = write_report(uri, out, args.suite, suite_references(suites))
    _print_leaderboard(board, out)
    return 0


def cmd_list(args) -> int:
    from harness.config import list_suites, load_suite
    from harness.datasets import DATASETS, dataset_options
    from methods import load_all

    table = Table(title="Methods")
    table.add_column("name")
    table.add_column("fused seg")
    table.add_column("summary")
    for name, cls in sorted(load_all().items()):
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        table.add_row(name, "yes" if cls.fused_segmentation else "no", doc[0] if doc else "")
    console.print(table)
    table = Table(title="Datasets")
    table.add_column("name")
    table.add_column("options")
    for name in sorted(DATASETS):
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in dataset_options(name).items()))
    console.print(table)
    table = Table(title="Suites (benchmarks/)")
    for column in ("name", "dataset", "seeds", "methods", "description"):
        table.add_column(column)
    for name, path in list_suites().items():
        suite = load_suite(str(path))
        table.add_row(name, suite.dataset, ",".join(map(str, suite.seeds)), ",".join(suite.methods), suite.description)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
