"""``wsss-bench``: run sweeps, write leaderboards, list what exists.

    wsss-bench run --methods cam,weaktr --dataset synthetic [--seeds 0,1,2] [key=value ...]
    wsss-bench report [--suite NAME ...]
    wsss-bench export-cams --trial ID --out DIR [--format npz|dense|irn|weaktr]
    wsss-bench list
    wsss-bench weights list | fetch [NAMES]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.errors import ConfigError, ResultsError, WsssError

# Off a terminal (logs, CI, pipes) rich would assume 80 columns and fold the tables; COLUMNS
# still wins when set.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 132)


# The headline metrics of a trial's one-line summary, in stage order.
OUTCOME_METRICS = (("cam_miou", "CAM"), ("mask_miou", "mask"), ("val_miou_ss", "val SS"), ("val_miou_ms_crf", "val MS+CRF"))


def _outcome_line(outcome) -> str:
    """One line per trial as it ends, so logs (SLURM, CI, nohup) show the sweep's progress."""
    import time

    spec = outcome.spec
    figures = ", ".join(f"{name} {outcome.metrics[key]:.1f}" for key, name in OUTCOME_METRICS if key in outcome.metrics)
    colour = {"finished": "green", "skipped": "dim", "failed": "red"}.get(outcome.state, "yellow")
    detail = figures if outcome.state != "failed" else escape(outcome.error.splitlines()[0][:200] if outcome.error else "")
    return f"{time.strftime('%H:%M:%S')} [{colour}]{outcome.state}[/] {escape(spec.label)} ({spec.trial_id})" + (f": {detail}" if detail else "")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-bench", description="Benchmark weakly-supervised semantic segmentation methods.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a sweep of trials")
    run.add_argument("--methods", help="comma-separated method names (see `wsss-bench list`; default: the suite's `methods`)")
    run.add_argument("--dataset", help="dataset name; uses the suite of the same name when one exists")
    run.add_argument("--suite", help="suite name (benchmarks/<name>.toml) or path to a suite file")
    run.add_argument("--data-root", help="dataset root directory (overrides the suite's)")
    run.add_argument("--seeds", help="comma-separated seeds (default: the suite's)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    _common(run)
    run.add_argument("--force", action="store_true", help="re-run finished trials (old runs are kept, marked superseded)")
    run.add_argument("--reuse-older-code", action="store_true",
                     help="count trials finished with older code (another wsss.code_tree) as finished instead of re-running them")
    run.add_argument("--dry-run", action="store_true", help="print the trial matrix with each trial's state; run nothing")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="hyper-parameter overrides: key=, method.key=, dataset.key=, eval.key=")
    _backend_options(run)

    report = sub.add_parser("report", help="write leaderboard.md / .csv / .html (+ plots, gallery) from MLflow")
    _common(report)
    report.add_argument("--suite", action="append", help="only these suites (repeatable); default every wsss-bench suite in the store")
    report.add_argument("--experiment", action="append", help="only these MLflow experiments, by full name (repeatable)")
    report.add_argument("--filter", help="MLflow search filter ANDed with 'is a trial run', e.g. \"tags.`wsss.method` = 'afa'\"")
    report.add_argument("--out", help="one report of the whole selection in this directory (default: one per suite in "
                                      "<results>/report/<suite>/, the files `run` writes)")
    report.add_argument("--pairwise", action="append", metavar="METRIC",
                        help="also show the pairwise comparisons of this metric (repeatable; default only the primary one; "
                             "pairwise.csv has them all), e.g. cam_miou, mask_miou, val_miou_ss")
    report.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    report.add_argument("--no-gallery", action="store_true", help="skip the image gallery (no artifact downloads)")

    sub.add_parser("list", help="list methods, datasets and suites")

    export = sub.add_parser("export-cams", help="write a finished trial's CAMs (+ pseudo masks, predictions) as files `--methods external` reads")
    _common(export)
    export.add_argument("--trial", required=True, help="trial id (see `wsss-bench status` or results/trials/)")
    export.add_argument("--out", required=True, help="output directory: cams/, masks/, predictions/ are written in it")
    export.add_argument("--format", default="npz", choices=["npz", "dense", "irn", "weaktr"], help="CAM file layout (default npz)")
    export.add_argument("--device", default="cpu", help="device the CAMs are recomputed on (default cpu)")

    status = sub.add_parser("status", help="each trial's state from SLURM, worker heartbeats and MLflow")
    _common(status)
    status.add_argument("--suite", action="append", help="only trials of these suites (repeatable)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--stop-server", action="store_true", help="stop the results directory's detached MLflow tracking server")

    weights = sub.add_parser("weights", help="pretrained checkpoints: list the registry, or fetch into the cache ahead of time")
    weights.add_argument("action", choices=["list", "fetch"])
    weights.add_argument("names", nargs="*", help="registry names (default for fetch: every entry with a download URL)")
    return parser


def _backend_options(run: argparse.ArgumentParser) -> None:
    """Where trials run: --backend local|ray|slurm and each backend's options."""
    run.add_argument("--backend", choices=["local", "ray", "slurm"], default=os.environ.get("WSSS_BACKEND", "local"),
                     help="where trials run (default local; env WSSS_BACKEND)")
    run.add_argument("--cpus-per-trial", type=int, help="CPU cores per trial (ray num_cpus, slurm --cpus-per-task, local threads)")
    run.add_argument("--gpus-per-trial", type=int, help="GPUs per trial (ray num_gpus, slurm --gpus-per-node, local GPUs per slot); "
                     "default 1 with --device cuda, else 0")
    local = run.add_argument_group("local backend")
    local.add_argument("--max-parallel", type=int, help="trials at once, each in its own worker process with its own device slot (default 1: in this process)")
    local.add_argument("--devices", help="GPU ids for the local pool, e.g. 0,1,3 (default: every visible GPU)")
    ray = run.add_argument_group("ray backend")
    ray.add_argument("--ray-address", help="join this Ray cluster (host:port from `ray start --head`); default: start a local one on 127.0.0.1")
    ray.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray cluster wsss-bench starts (default: all)")
    ray.add_argument("--ray-max-retries", type=int, help="retries when a Ray worker dies (system failures only; default 2)")
    slurm = run.add_argument_group("slurm backend (submitit job arrays)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--account", help="SLURM account")
    slurm.add_argument("--qos", help="SLURM quality of service")
    slurm.add_argument("--mem", help="memory per trial, e.g. 16G")
    slurm.add_argument("--time", help="time limit per job: minutes, H:MM:SS or D-HH:MM:SS (default 1 day)")
    slurm.add_argument("--constraint", help="node features, e.g. a100|h100")
    slurm.add_argument("--array-parallelism", type=int, help="at most this many array tasks run at once")
    slurm.add_argument("--sbatch", action="append", metavar="KEY=VALUE", help="extra #SBATCH option (repeatable), e.g. --sbatch mail-type=END")
    slurm.add_argument("--slurm-setup", action="append", metavar="LINE", help="shell line run in the job before the trial (repeatable), e.g. 'module load cuda'")
    slurm.add_argument("--max-timeouts", type=int, help="requeues after hitting the time limit (default 3; preemptions always requeue)")
    slurm.add_argument("--signal-delay", type=int, help="seconds before the time limit when the job checkpoints and requeues (default 120)")
    slurm.add_argument("--trials-per-job", type=int, help="pack this many trials into one job, run one after another (default 1)")
    slurm.add_argument("--wait", action="store_true", help="wait for the jobs and print the summary (default: return after submission)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=os.environ.get("WSSS_RESULTS", "results"), help="results directory (default ./results)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), help="MLflow tracking URI (default sqlite:///<results>/mlflow.db)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import logging

    for name in ("mlflow", "alembic"):  # schema-migration chatter on a new store
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return {"run": cmd_run, "report": cmd_report, "list": cmd_list, "status": cmd_status, "weights": cmd_weights,
                "export-cams": cmd_export_cams}[args.command](args)
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
    from harness.config import default_suite, expand_data_root, load_suite, parse_overrides
    from harness.datasets.preflight import preflight
    from harness.sweep import partial_shared_overrides, plan_trials, sweep_key, trial_state
    from harness.tracking import Tracker, tracker_for_reading

    if not args.suite and not args.dataset:
        raise ConfigError("Pass --dataset NAME (e.g. synthetic, voc, coco) or --suite NAME|FILE.")
    suite = load_suite(args.suite) if args.suite else default_suite(args.dataset)
    if args.suite and args.dataset and args.dataset != suite.dataset:
        raise ConfigError(f"--dataset {args.dataset} contradicts suite {suite.name!r}, whose dataset is {suite.dataset!r}.")
    methods = _split_list(args.methods, "methods") if args.methods is not None else list(suite.methods)
    if not methods:
        raise ConfigError(f"Pass --methods NAME,...: suite {suite.name!r} lists no default methods.")
    try:
        seeds = [int(s) for s in _split_list(args.seeds, "seeds")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}.") from None
    # --dry-run writes nothing: with no results directory yet, dataset caches go to a scratch one.
    results = Path(args.results).expanduser().resolve() if args.dry_run else _results_dir(args.results)
    scratch = tempfile.TemporaryDirectory(prefix="wsss-dry-run-") if args.dry_run and not results.exists() else None
    cache = Path(scratch.name) if scratch else results / "cache"
    from harness.backends import BackendOptions, dry_run_states, run_sweep
    from harness.weights import describe_trial, fetch_sweep_weights
    from methods import load_all

    options = BackendOptions.from_args(args)  # bad backend options fail before anything runs
    overrides = parse_overrides(args.overrides)
    specs = plan_trials(suite, methods, seeds, overrides, expand_data_root(args.data_root), cache)
    for notice in partial_shared_overrides(overrides, methods):
        console.print(f"[yellow]{escape(notice)}", soft_wrap=True)
    # Before anything is recorded: canonical data root, split fallbacks, cheap data checks.
    specs = preflight(specs, cache, notice=lambda text: console.print(f"[yellow]{escape(text)}", soft_wrap=True))
    uri = _tracking_uri(args, results)
    if args.dry_run:
        states = dry_run_states(specs, results, tracker_for_reading(uri, suite.name), args.reuse_older_code)
        table = Table(title=f"Trials of suite {suite.name} ({len(specs)})")
        for column in ("trial", "method", "dataset", "seed", "state", "weights"):
            table.add_column(column)
        weights = {spec.trial_id: describe_trial(spec, load_all()) for spec in specs}
        for spec in specs:
            table.add_row(spec.trial_id, spec.method, spec.dataset, str(spec.seed), states[spec.trial_id], escape(weights[spec.trial_id]))
        console.print(table)
        if any("[missing]" in cell for cell in weights.values()):
            console.print("Weights marked \\[missing] are downloaded when the run starts; on an offline machine fetch them "
                          "first with `wsss-bench weights fetch NAMES` (see `wsss-bench weights list`).", soft_wrap=True)
        if scratch is not None:
            scratch.cleanup()
        return 0

    tracker = Tracker(uri, suite.name)
    todo = specs if args.force else [s for s in specs if trial_state(s, results, tracker) != "finished"]
    fetch_sweep_weights(todo, load_all(), log=lambda text: console.print(escape(text), soft_wrap=True),
                        pretrain_cache=results / "cache")  # before any trial
    parent = tracker.sweep_run(sweep_key(specs), f"wsss-bench run --methods {','.join(methods)} ({suite.name})")
    console.print(f"[bold]Suite[/] {suite.name}: {len(specs)} trial(s) -> {results}  (MLflow: {uri}; backend: {options.backend})")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as progress:
        sweep_task = progress.add_task("[bold]trials", total=len(specs))

        def factory(spec):
            stage_task = progress.add_task(f"{spec.label} [dim]{spec.trial_id}", total=None)
            log_stage = None if console.is_terminal else _stage_logger(spec, progress.console)

            def report(stage: str, done: int, total: int) -> None:
                progress.update(stage_task, description=f"{spec.label} · {stage}", completed=done, total=total or None)
                if log_stage is not None:  # off a terminal the bar is invisible: one line per stage start / end
                    log_stage(stage, done, total)

            return report

        try:
            swept = run_sweep(specs, results, uri, options, args.device, args.force, parent, factory,
                              on_outcome=lambda outcome: (progress.advance(sweep_task), progress.console.print(_outcome_line(outcome), soft_wrap=True)),
                              log=lambda text: progress.console.print(escape(text), soft_wrap=True), reuse_older_code=args.reuse_older_code,
                              tracker=tracker)
        except BaseException as exc:  # the trials record their own state; the parent must not stay RUNNING
            tracker.close_sweep(parent, None, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
    outcomes = swept.outcomes
    if not swept.submitted and not swept.already_queued:  # trials still queued elsewhere keep the parent open
        tracker.close_sweep(parent, [o.state for o in outcomes])
    for spec, where in swept.already_queued:
        console.print(f"[yellow]{spec.label} ({spec.trial_id}) is already queued or running ({where}); not submitted again.")
    if swept.submitted:
        table = Table(title=f"Submitted to SLURM ({len(swept.submitted)} trial(s))")
        for column in ("trial", "method", "seed", "job"):
            table.add_column(column)
        for spec, job_id in swept.submitted:
            table.add_row(spec.trial_id, spec.method, str(spec.seed), job_id)
        console.print(table)
        if swept.server is not None:
            console.print(f"Workers log to the MLflow server {swept.server.uri} (pid {swept.server.pid}), left running for the queued jobs; "
                          f"`wsss-bench status --results {results} --stop-server` stops it.", soft_wrap=True)
        console.print(f"Follow them with `wsss-bench status --results {results}`; run the same command again (or `wsss-bench report`) "
                      "once they are done.", soft_wrap=True)
        if outcomes:
            _print_summary(outcomes)
        return 1 if any(o.state == "failed" for o in outcomes) else 0
    _print_summary(outcomes)
    if swept.disk_errors:
        console.print(f"[red]{escape(swept.disk_paragraph(results))}", soft_wrap=True)
        return 1
    if any(o.run_id for o in outcomes):  # else no run of this sweep is in MLflow yet: nothing to report
        _write_reports(uri, results, [suite.name], extra_suite=suite)
    if swept.unfinished:
        console.print(f"[red]{len(swept.unfinished)} trial(s) are not finished: {escape(', '.join(s.label for s in swept.unfinished))}.", soft_wrap=True)
    return 1 if swept.failed or swept.unfinished else 0


def _print_summary(outcomes) -> None:
    table = Table(title="Trials")
    for column in ("trial", "method", "seed", "state", "CAM", "mask", "val SS", "val MS+CRF", "time (s)"):
        table.add_column(column)
    for o in outcomes:
        m = o.metrics
        cell = lambda k: f"{m[k]:.1f}" if k in m else "-"  # noqa: E731
        state = {"failed": "[red]failed", "skipped": "[dim]skipped", "finished": "[green]finished"}.get(o.state, o.state)
        seconds = m.get("time_total_s")
        # a tiny trial takes under a second: one decimal there, so its time never reads as "0"
        took = "-" if seconds is None else f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"
        table.add_row(o.spec.trial_id, o.spec.method, str(o.spec.seed), state, cell("cam_miou"), cell("mask_miou"), cell("val_miou_ss"),
                      cell("val_miou_ms_crf"), took)
    console.print(table)
    for o in outcomes:
        if o.state == "failed":
            console.print(f"[red]{o.spec.label} ({o.spec.trial_id}) failed:[/] {escape(o.error)}", soft_wrap=True)


def _stage_logger(spec, out: Console):
    """A progress callback's log lines: ``HH:MM:SS <trial> · <stage> started`` when a stage
    begins, ``... <stage>: <n>/<n> (<s> s), scoring`` when its counted work is through (the
    stage then still scores and saves: mask mIoU, gallery, ...) and ``... <stage> done (<s> s)``
    when the next one begins (the trial's outcome line ends the last)."""
    import time

    state: dict = {"stage": None, "start": 0.0, "counted": True}

    def line(text: str) -> None:
        out.print(f"{time.strftime('%H:%M:%S')} {escape(spec.label)} · {text}", soft_wrap=True)

    def log(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != state["stage"]:
            if state["stage"] is not None:
                line(f"{state['stage']} done ({now - state['start']:.0f} s)")
            state.update(stage=stage, start=now, counted=False)
            line(f"{stage} started")
        if total and done >= total and not state["counted"]:
            state["counted"] = True
            line(f"{stage}: {done}/{total} ({now - state['start']:.0f} s), scoring")

    return log


def _write_reports(uri: str, results: Path, names: list[str] | None, extra_suite=None, out: Path | None = None, **options) -> None:
    """The one way `run` and `report` write leaderboards: per suite ``<results>/report/<suite>/``
    (or one report of the whole selection in ``out``), with the published numbers and
    expected seeds of every suite file (plus ``extra_suite``, a suite file `run` loaded), the
    trivial baselines cached in ``<results>/cache``, and the same terminal table. Raises the
    ResultsError of an empty selection only when every target is empty."""
    from harness.config import list_suites, load_suite
    from harness.report import store_suites, suite_references, suite_seeds, write_report

    suites = {}
    for name, path in list_suites().items():
        try:
            suites[name] = load_suite(str(path))
        except ConfigError as exc:  # one broken suite file must not block reports of the others
            console.print(f"[yellow]Suite {name}: no published numbers or expected seeds ({escape(str(exc))})", soft_wrap=True)
    if extra_suite is not None:
        suites[extra_suite.name] = extra_suite
    references, seeds = suite_references(list(suites.values())), suite_seeds(list(suites.values()))
    options["recipes"] = _suite_recipes(suites)
    if out is not None or options.get("experiments"):
        targets = [(out or results / "report", names)]
    else:
        targets = [(results / "report" / name, [name]) for name in (names or store_suites(uri))]
    errors = []
    for target, selection in targets or [(results / "report", names)]:
        try:
            board = write_report(uri, target, selection, references, expected_seeds=seeds, require_runs=True,
                                 cache_dir=results / "cache", **options)
        except ResultsError as exc:
            errors.append(exc)
            continue
        _print_leaderboard(board, target)
    if errors and len(errors) == len(targets or [None]):
        raise errors[0]


def _suite_recipes(suites: dict) -> dict[tuple[str, str], dict[str, str]]:
    """(suite, method) -> the params of the suite's own recipe, for every method a suite file
    names (one that cannot be resolved is left out: its variants are just not marked)."""
    from harness.sweep import recipe_params

    recipes = {}
    for suite in suites.values():
        for method in dict.fromkeys([*suite.methods, *suite.method_params]):
            try:
                recipes[(suite.name, method)] = recipe_params(suite, method)
            except ConfigError:
                continue
    return recipes


def _print_leaderboard(board, out_dir: Path) -> None:
    """A compact terminal view; the full table is in the written files."""
    from harness.report import leaderboard_table

    console.print(leaderboard_table(board))
    if not board.failed.empty:
        console.print(f"[red]{len(board.failed)} failed or unfinished trial(s) are listed in the report, not averaged.")
    console.print(f"Leaderboard written to {out_dir}/leaderboard.md and .csv")


def cmd_report(args) -> int:
    from harness.report import RANK_METRICS
    from harness.tracking import check_tracking_uri

    results = _results_dir(args.results)
    uri = _tracking_uri(args, results)
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise ResultsError(f"No MLflow store at {uri[len('sqlite:///'):]}: nothing has been run with --results {results}. "
                           "Run `wsss-bench run ...` first, or pass the --results / --tracking-uri of the store that has the runs.")
    for metric in args.pairwise or []:
        if metric not in RANK_METRICS:
            raise ConfigError(f"--pairwise {metric}: unknown metric; expected one of {', '.join(RANK_METRICS)}.")
    _write_reports(uri, results, args.suite, out=Path(args.out) if args.out else None, experiments=args.experiment,
                   filter_string=args.filter, plots=not args.no_plots, gallery=not args.no_gallery, pairwise_metrics=args.pairwise)
    console.print("Each folder also has leaderboard.html, pairwise.csv, per_class.csv, runs.csv" + ("" if args.no_plots else ", plots/")
                  + ("" if args.no_gallery else ", gallery/") + ".")
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
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
        summary = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
        table.add_row(name, "yes" if cls.fused_segmentation else "no", summary)
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


def cmd_weights(args) -> int:
    """``weights list``: the registry and what is cached; ``weights fetch [NAMES]``: download
    into the cache ($WSSS_WEIGHTS). Exit 1 when a fetch fails (each failure says why)."""
    from harness.errors import unknown
    from methods.common import weights

    for name in args.names:
        if name not in weights.SOURCES:
            raise unknown("checkpoint", name, weights.SOURCES)
    arches: dict[str, list[str]] = {}
    for arch, name in weights.ARCH_WEIGHTS.items():
        arches.setdefault(name, []).append(arch)
    chosen = [weights.SOURCES[n] for n in args.names] or list(weights.SOURCES.values())
    if args.action == "list":
        table = Table(title=f"Pretrained checkpoints (cache: {weights.cache_dir()})")
        for column in ("name", "architectures", "source", "file", "checksum", "state"):
            table.add_column(column, overflow="fold")
        for source in chosen:
            state = "cached" if weights.is_cached(source) else ("download by hand" if source.kind == "manual" else "not cached")
            checksum = f"sha256 {source.sha256}" + ("..." if len(source.sha256) < 64 else "") if source.sha256 else "-"
            table.add_row(source.name, ", ".join(arches.get(source.name, [])), escape(source.location), source.filename, checksum, state)
        console.print(table)
        return 0
    failed = 0
    for source in chosen if args.names else [s for s in chosen if s.kind != "manual" or weights.is_cached(s)]:
        try:
            path = weights.fetch(source)
            console.print(f"[green]ok[/] {source.name}: {path}", soft_wrap=True)
        except weights.WeightsError as exc:
            failed += 1
            console.print(f"[red]failed[/] {source.name}: {escape(str(exc))}", soft_wrap=True)
    manual = [s for s in chosen if s.kind == "manual" and not weights.is_cached(s)]
    if manual and not args.names:
        console.print("Not fetched (no direct URL; download by hand, `wsss-bench weights fetch NAME` says from where): "
                      + ", ".join(s.name for s in manual), soft_wrap=True)
    return 1 if failed else 0


def cmd_status(args) -> int:
    """Each trial of the results directory: stages done, scheduler state, heartbeat, MLflow."""
    from harness.backends.status import collect, summary_json
    from harness.mlflow_server import recorded_server

    results = _results_dir(args.results)
    server = recorded_server(results)
    if args.stop_server:
        if server is None:
            console.print(f"No running MLflow tracking server is recorded for {results}.")
        else:
            server.stop()
            console.print(f"Stopped the MLflow tracking server {server.uri} (pid {server.pid}).")
        return 0
    uri = args.tracking_uri or (server.uri if server else _tracking_uri(args, results))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        uri = None  # nothing tracked yet: show the trial directories alone
    statuses = collect(results, uri, suites=args.suite)
    if args.json:
        print(summary_json(statuses))
        return 0
    if not statuses:
        console.print(f"No trials under {results / 'trials'}.")
        return 0
    table = Table(title=f"Trials in {results} ({len(statuses)})")
    for column in ("trial", "suite", "method", "seed", "stages", "state", "job", "MLflow"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        colour = "green" if s.state == "finished" else "red" if s.state.startswith(("failed", "dead")) else "yellow"
        job = f"{s.backend}:{s.job_id}" if s.job_id else "-"
        if s.scheduler:
            job += f" ({s.scheduler})"
        table.add_row(s.trial_id, s.suite, s.method, s.seed, f"{len(s.stages_done)}/5", f"[{colour}]{escape(s.state)}", job, s.mlflow or "-")
    console.print(table)
    for s in statuses:
        if s.error and s.state.startswith(("failed", "dead")):
            console.print(f"[red]{s.method} seed {s.seed} ({s.trial_id}):[/] {escape(s.error.splitlines()[0][:300])}", soft_wrap=True)
    if server is not None:
        console.print(f"MLflow tracking server: {server.uri} (pid {server.pid}); `wsss-bench status --stop-server` stops it.")
    return 0


def cmd_export_cams(args) -> int:
    """A finished trial's CAMs of its cam-eval and train images, recomputed in float32 from
    the train_cam checkpoint exactly as the cams stage computed them (same batches, seed and
    device), its pseudo masks (copied) and its single-scale val predictions (recomputed), as
    the files ``--methods external`` reads: evaluating them gives the same CAM, mask and
    val-SS mIoU, bit for bit on the same machine and device."""
    import json
    import shutil

    import numpy as np
    import torch

    from harness.config import TrialSpec
    from harness.runner import _ids, _size_groups, build_method, seed_everything
    from harness.trial import STAGES, TrialDir
    from harness.visualize import save_label_png
    from methods.base import stack_samples
    from methods.external.formats import write_cam_file

    results = _results_dir(args.results)
    root = results / "trials" / args.trial
    if not (root / "spec.json").is_file():
        raise ResultsError(f"No trial {args.trial!r} in {results / 'trials'} (no spec.json). `wsss-bench status --results {results}` lists the trials.")
    spec = TrialSpec.from_dict(json.loads((root / "spec.json").read_text()))
    from harness.backends import plugin_list
    from harness.backends.worker import load_plugins
    from harness.runner import TrialRunner
    from methods import load_all

    load_plugins(plugin_list())  # a trial of a method registered by WSSS_PLUGINS
    if spec.method not in load_all():
        raise ConfigError(f"Trial {args.trial} is of method {spec.method!r}, which is not registered here; "
                          "set WSSS_PLUGINS to the module that registers it.")

    runner = TrialRunner(spec, results, device=args.device)
    done = set(TrialDir(results, spec).records())
    checkpoint = runner.dir.checkpoint_path("train_cam")
    if "cams" not in done or not checkpoint.is_file():
        raise ResultsError(f"Trial {args.trial} has no finished cams stage with a train_cam checkpoint ({checkpoint}); finish it first (run the same command again).")
    out = Path(args.out).expanduser().resolve()
    for sub_dir in ("cams", "masks", "predictions"):
        (out / sub_dir).mkdir(parents=True, exist_ok=True)
    method = build_method(spec, runner.dataset, runner.device)
    method.load_state_dict(torch.load(checkpoint, map_location=runner.device, weights_only=True))
    ev, C = spec.eval, runner.dataset.info.num_classes
    seed_everything(spec.seed * 100 + STAGES.index("cams"))  # as the runner seeds the cams stage
    cam_eval, train = runner.split("cam_eval"), runner.split("train")
    passes = [(cam_eval, runner._limited(cam_eval, ev["max_cam_eval"])), (train, list(range(len(train))))]  # the runner's batches
    written: set[str] = set()
    for split, indices in passes:
        for batch in _size_groups(split, indices, ev["batch_size"]):
            if all(s.id in written for s in batch):
                continue
            images, labels = stack_samples(batch)
            with torch.no_grad():
                cams = method.cams(images.to(runner.device), labels.to(runner.device), **_ids(method, batch)).float().cpu().numpy()
            for sample, cam in zip(batch, cams):
                if sample.id not in written:
                    present = np.flatnonzero(sample.labels > 0)
                    write_cam_file(out / "cams", sample.id, present, cam[present], C, args.format)
                    written.add(sample.id)
    masks = sorted((root / "pseudo").glob("*.png")) if "pseudo_masks" in done else []
    for path in masks:
        shutil.copyfile(path, out / "masks" / path.name)
    predicted = 0
    if "segment" in done:
        val = runner.split("val")
        for batch in _size_groups(val, runner._limited(val, ev["max_val"]), ev["batch_size"]):
            images, _ = stack_samples(batch)
            segmenter = runner._segmenter()
            with torch.no_grad():
                preds = segmenter.segment(images.to(runner.device), multiscale=False, **_ids(segmenter, batch)).argmax(1).cpu().numpy()
            for sample, pred in zip(batch, preds):
                save_label_png(pred.astype(np.uint8), out / "predictions" / f"{sample.id}.png")
                predicted += 1
    console.print(f"Trial {args.trial} ({escape(spec.label)}): {len(written)} CAM file(s) ({args.format}), {len(masks)} pseudo mask(s), "
                  f"{predicted} prediction(s) -> {out}", soft_wrap=True)
    console.print(f"Evaluate them: wsss-bench run --methods external --suite {escape(spec.suite)} --seeds {spec.seed} "
                  f"external.name=NAME external.cams={out / 'cams'}" + (f" external.masks={out / 'masks'}" if masks else "")
                  + (f" external.predictions={out / 'predictions'}" if predicted else ""), soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
