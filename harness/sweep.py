"""Plan a sweep (methods x seeds of a suite, with overrides) into trial specs, and execute
trials: skip finished ones, resume partial ones, record failures and keep going."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.common_seg import common_seg_config
from harness.config import EvalConfig, Overrides, Suite, TrialSpec, build_method_config, check_eval_config, coerce
from harness.datasets import create_dataset, dataset_options
from harness.errors import ConfigError, WsssError, suggest, unknown
from harness.refine import check_refine, merge_irn
from harness.runner import ProgressFn, TrialRunner
from harness.step_metrics import StepMetricBuffer
from harness.tracking import Tracker, current_code_tree, flatten, same_code
from harness.trial import STAGES, TrialDir
from harness.weights import check_sweep_weights
from methods import load_all
from methods.base import Method


def plan_trials(
    suite: Suite,
    methods: list[str],
    seeds: list[int] | None,
    overrides: Overrides,
    data_root: str | None,
    cache_dir: Path,
) -> list[TrialSpec]:
    """Resolve every (method, seed) of the sweep into a full TrialSpec, validating every
    name and value first, so a typo fails before any trial starts."""
    registry = load_all()
    if not methods:
        raise ConfigError(f"No methods selected. Pass --methods (valid: {', '.join(sorted(registry))}).")
    for name in methods:
        if name not in registry:
            raise unknown("method", name, registry)
    for scope in overrides.methods:
        if scope not in methods:
            raise ConfigError(f"Override scope `{scope}.` is neither a selected method ({', '.join(methods)}) nor `dataset.` / `eval.`.{suggest(scope, list(methods) + ['dataset', 'eval'])}")
    root = data_root or suite.data_root
    options = _dataset_options(suite, overrides)
    dataset = create_dataset(suite.dataset, Path(root) if root else None, cache_dir, dict(options))  # fail fast on bad data
    eval_values = {**dataclasses.asdict(_eval_config(suite, overrides))}
    common_seg_config(eval_values)  # a typo in the shared segmentation recipe fails here
    check_refine(eval_values)  # ... and one in eval.refine / eval.irn
    configs = {name: _method_config(name, registry[name], suite, overrides) for name in methods}
    evals = {name: _method_eval(name, suite, overrides, eval_values) for name in methods}
    configs = {name: _check_inputs(name, registry[name], config, dataset, suite, evals[name]) for name, config in configs.items()}
    _check_shared_overrides(overrides, registry, methods, options)
    check_sweep_weights(suite, overrides, {m: registry[m] for m in methods}, configs, real_data=root is not None, evals=evals)
    specs = []
    for seed in seeds if seeds is not None else suite.seeds:
        for name in methods:
            specs.append(
                TrialSpec(
                    suite=suite.name,
                    method=name,
                    method_config=configs[name],
                    dataset=suite.dataset,
                    data_root=str(Path(root).resolve()) if root else None,
                    dataset_options=options,
                    splits=dict(suite.splits),
                    eval=evals[name],
                    seed=int(seed),
                )
            )
    return specs


def _dataset_options(suite: Suite, overrides: Overrides) -> dict[str, Any]:
    defaults = dataset_options(suite.dataset)
    values = dict(defaults)
    for source, items in (("suite " + str(suite.path), suite.dataset_options), ("override", overrides.dataset)):
        for key, value in items.items():
            if key not in defaults:
                raise ConfigError(f"Dataset `{suite.dataset}` ({source}) has no option `{key}`.{suggest(key, defaults)} Options: {', '.join(defaults)}.")
            default = defaults[key]
            values[key] = coerce(value, type(default), f"dataset option `{key}`") if default is not None else value
    return values


def _eval_config(suite: Suite, overrides: Overrides) -> EvalConfig:
    config = dataclasses.replace(suite.eval)
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    for key, value in overrides.eval.items():
        if key not in fields:
            raise ConfigError(f"Unknown eval option `{key}`.{suggest(key, fields)} Options: {', '.join(fields)}.")
        value = coerce(value, fields[key].type, f"eval option `{key}`")
        setattr(config, key, merge_irn(config.irn, value) if key == "irn" else value)
    return check_eval_config(config, "eval options")


# Evaluation settings that a `[methods.<name>]` table or a `<name>.key=value` override may set
# for one method (e.g. `adcam.refine=irn`): harness stages run on the method's outputs, not its
# hyper-parameters, so they go to that method's trials' eval settings. No method's Config may
# have a field of these names (tests/test_config.py checks the registry).
PER_METHOD_EVAL: tuple[str, ...] = ("refine", "irn")


def _fields(cls: type) -> set[str]:
    """The hyper-parameter names of method class ``cls`` (its Config dataclass's fields)."""
    return {f.name for f in dataclasses.fields(cls.Config)}


def _method_config(name: str, cls: type, suite: Suite, overrides: Overrides) -> dict[str, Any]:
    fields = _fields(cls)
    values = {k: v for k, v in suite.method_params.get(name, {}).items() if k not in PER_METHOD_EVAL}
    values.update({k: v for k, v in overrides.shared.items() if k in fields})
    values.update({k: v for k, v in overrides.methods.get(name, {}).items() if k not in PER_METHOD_EVAL})
    config = build_method_config(cls.Config, values, f"method `{name}`")
    return config.to_dict()


def _method_eval(name: str, suite: Suite, overrides: Overrides, eval_values: dict[str, Any]) -> dict[str, Any]:
    """The eval settings of method ``name``'s trials: the sweep's, with the method's own
    ``refine`` / ``irn`` (:data:`PER_METHOD_EVAL`) when its table or overrides set them
    (checked as ``eval.refine`` / ``eval.irn`` are; ``irn`` keys are merged over the sweep's,
    so ``adcam.irn=epochs=1`` keeps the suite's other IRN settings)."""
    tables = [suite.method_params.get(name, {}), overrides.methods.get(name, {})]
    if not any(k in PER_METHOD_EVAL for table in tables for k in table):
        return eval_values
    fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    values = dict(eval_values)
    for table in tables:  # the suite's table, then the overrides; IRN settings merge key by key
        for key, value in table.items():
            if key in PER_METHOD_EVAL:
                value = coerce(value, fields[key].type, f"method `{name}` `{key}`")
                values[key] = merge_irn(values[key], value) if key == "irn" else value
    check_refine(values)
    return values


def recipe_params(suite: Suite, method: str) -> dict[str, str]:
    """The ``method.*`` / ``eval.*`` params (flattened as a trial's run records them) of the
    suite's own recipe for ``method``: what a plain ``run --suite`` gives, no override. The
    report marks the variant that matches it. Errors: ConfigError (unknown method, bad suite)."""
    registry = load_all()
    if method not in registry:
        raise unknown("method", method, registry)
    none = Overrides()
    config = _method_config(method, registry[method], suite, none)
    eval_values = _method_eval(method, suite, none, dataclasses.asdict(_eval_config(suite, none)))
    return {**flatten("method", config), **flatten("eval", eval_values)}


def _check_inputs(name: str, cls: type, config: dict[str, Any], dataset, suite: Suite, eval_values: dict[str, Any]) -> dict[str, Any]:
    """``Method.check_inputs`` with the ids each role's stage will ask for (the cam-eval and
    val splits cut to ``max_cam_eval`` / ``max_val`` as the runner cuts them): a method that
    reads files made elsewhere checks them before any trial runs, and may complete its config."""
    if cls.check_inputs.__func__ is Method.check_inputs.__func__:
        return config  # the default accepts everything: do not list split ids for nothing
    splits = {role: dataset.split(suite.splits.get(role) or dataset.default_splits()[role]).ids for role in ("train", "cam_eval", "val")}
    split_ids = {"train": list(splits["train"]), "known": sorted(set().union(*splits.values())),
                 "cam_eval": sorted(splits["cam_eval"])[: eval_values["max_cam_eval"] or None],
                 "val": sorted(splits["val"])[: eval_values["max_val"] or None]}
    try:
        checked = cls.check_inputs(build_method_config(cls.Config, config, f"method `{name}`"), dataset.info, split_ids)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"method `{name}`: {exc}") from None
    return checked.to_dict()


def _check_shared_overrides(overrides: Overrides, registry: dict, methods: list[str], dataset_options: Iterable[str]) -> None:
    """A bare ``key=value`` must name a field of a selected method. When it does not, the
    hint names the ``dataset.`` / ``eval.`` option it is (or is closest to), never one that
    does not exist."""
    every = set().union(*(_fields(registry[m]) for m in methods))
    scoped = [f"dataset.{k}" for k in dataset_options] + [f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)]
    for key in overrides.shared:
        if key in every:
            continue
        exact = [name for name in scoped if name.split(".", 1)[1] == key]
        owners = sorted(m for m in registry if key in _fields(registry[m]))
        if owners:  # a real field, of methods not selected: say so rather than suggest a near name
            hint = f" It is a field of {', '.join(owners)} (not selected): drop it, or select one of them."
        elif exact:
            hint = f" Did you mean `{exact[0]}={overrides.shared[key]}`?"
        else:
            hint = suggest(key, sorted(every) + scoped)
        raise ConfigError(f"Override `{key}` is not a field of any selected method ({', '.join(methods)}).{hint} "
                          "A bare key=value sets a method hyper-parameter; dataset and evaluation options take the "
                          "`dataset.` / `eval.` prefix (`wsss-bench list` shows the dataset options).")


def partial_shared_overrides(overrides: Overrides, methods: list[str]) -> list[str]:
    """One notice per bare ``key=value`` that only some selected methods have (the others keep
    their value, and their trial ids, silently otherwise), e.g. "`epochs=2` sets `epochs` of
    adcam; weaktr, afa have no such field and are left as they are." """
    registry = load_all()
    fields = {m: _fields(registry[m]) for m in methods}
    notices = []
    for key, value in overrides.shared.items():
        has = [m for m in methods if key in fields[m]]
        lacks = [m for m in methods if m not in has]
        if has and lacks:
            notices.append(f"`{key}={value}` sets `{key}` of {', '.join(has)}; {', '.join(lacks)} "
                           f"{'has' if len(lacks) == 1 else 'have'} no such field and {'is' if len(lacks) == 1 else 'are'} left as "
                           f"{'it is' if len(lacks) == 1 else 'they are'} (use `<method>.{key}=` to aim at one method).")
    return notices


def sweep_key(specs: list[TrialSpec]) -> str:
    """Order-free identity of a sweep: the same trials give the same parent run."""
    return hashlib.sha256(",".join(sorted(s.trial_id for s in specs)).encode()).hexdigest()[:16]


# -- execution ----------------------------------------------------------------------------------

@dataclass
class TrialOutcome:
    spec: TrialSpec
    state: str  # finished | skipped | failed | interrupted
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    run_id: str | None = None
    resumed_from: str | None = None
    disk_error: str = ""  # what could not be written to the results directory, if anything


# errno values that mean "the results directory cannot take this write", not a bug
DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO}


def disk_error(exc: BaseException, path: Path | None = None) -> str:
    """A one-line description when ``exc`` is a refused write (read-only, full, no
    permission), else "". ``path`` names the file meant (not the temp file of an atomic write)."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return f"cannot write {path or exc.filename or 'the results directory'} ({exc.strerror})"
    return ""


def trial_state(spec: TrialSpec, results_dir: Path, tracker: Tracker, reuse_older_code: bool = False) -> str:
    """finished / finished with older code / partial (next stage) / failed / new, from the
    trial dir and MLflow."""
    root = results_dir / "trials" / spec.trial_id
    tdir_done = (root / "state.json").exists() and TrialDir(results_dir, spec).is_complete()
    if tdir_done and tracker.finished_run(spec.trial_id):
        if reuse_older_code or tracker.finished_run(spec.trial_id, current_code_tree()):
            return "finished"
        return "finished with older code (re-runs; --reuse-older-code keeps it)"
    status = tracker.trial_status(spec.trial_id)
    if (root / "state.json").exists():
        nxt = TrialDir(results_dir, spec).next_stage()
        if nxt is None:
            return "finished (not yet in MLflow)"
        return f"{'failed' if status == 'failed' else 'partial'}, resumes at {nxt}"
    return "failed" if status == "failed" else "new"


def execute_trial(
    spec: TrialSpec,
    results_dir: Path,
    tracking_uri: str,
    device: str = "cpu",
    force: bool = False,
    parent_run_id: str | None = None,
    progress: ProgressFn | None = None,
    stop_after: str | None = None,
) -> TrialOutcome:
    """Run one trial end to end with tracking. Used in-process and by remote workers."""
    tracker = Tracker(tracking_uri, spec.suite)
    tdir = TrialDir(results_dir, spec)
    if force:
        tracker.supersede(spec.trial_id)
        tdir.clear()
    elif (finished := tracker.finished_run(spec.trial_id)) is not None:
        # MLflow holds the finished run's numbers: never run it again, even if the trial
        # directory was removed (a complete directory without a run is re-logged below).
        return TrialOutcome(spec, "skipped", run_id=finished)
    run_id = tracker.open_trial_run(spec, parent_run_id, device)
    row_name = load_all()[spec.method].row_name(spec.method_config)
    if row_name != spec.method:  # a method that names its rows from its config
        tracker.client.set_tag(run_id, "wsss.method", row_name)
    # Per-step training losses go through a buffer written from a background thread: a
    # synchronous MLflow write per step would cost the training loop ~15 ms each.
    step_metrics = StepMetricBuffer(lambda points: tracker.log_metric_points(run_id, points))
    runner = TrialRunner(spec, results_dir, device=device, progress=progress, stop_after=stop_after,
                         log_metric=step_metrics.log, flush_metrics=step_metrics.flush)
    try:
        try:
            result = runner.run()
        finally:
            step_metrics.close()  # every buffered point reaches the store before the run ends
    except KeyboardInterrupt:
        tracker.client.set_tag(run_id, "wsss.status", "interrupted")
        tracker.client.set_terminated(run_id, status="KILLED")
        raise
    except Exception as exc:  # the sweep goes on; the error is recorded, never lost
        message = str(exc) if isinstance(exc, WsssError) else f"{type(exc).__name__}: {exc}"
        try:
            error_path = tdir.write_error(traceback.format_exc())
        except OSError:  # a read-only / full results directory: MLflow still gets the message
            error_path = None
        tracker.fail_trial(run_id, error_path, message)
        return TrialOutcome(spec, "failed", error=message, run_id=run_id, disk_error=disk_error(exc))
    if not tdir.is_complete():  # stop_after: a clean, resumable stop
        tracker.client.set_tag(run_id, "wsss.status", "partial")
        tracker.client.set_terminated(run_id, status="KILLED")
        return TrialOutcome(spec, "interrupted", result.metrics, run_id=run_id, resumed_from=result.resumed_from)
    tracker.finish_trial(run_id, result, tdir.root)
    return TrialOutcome(spec, "finished", result.metrics, run_id=run_id, resumed_from=result.resumed_from)


def run_local(
    specs: list[TrialSpec],
    results_dir: Path,
    tracking_uri: str,
    device: str,
    force: bool,
    parent_run_id: str | None,
    progress_factory: Callable[[TrialSpec], ProgressFn] | None = None,
    on_outcome: Callable[[TrialOutcome], None] | None = None,
) -> list[TrialOutcome]:
    """Run trials one after another in this process."""
    outcomes = []
    for spec in specs:
        progress = progress_factory(spec) if progress_factory else None
        outcome = execute_trial(spec, results_dir, tracking_uri, device, force, parent_run_id, progress)
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    return outcomes


__all__ = ["plan_trials", "execute_trial", "run_local", "trial_state", "sweep_key", "TrialOutcome", "STAGES", "disk_error", "same_code"]
