"""Store faults and stale results (issue 17, items 6, 7, 12, 14): a corrupt mlflow.db, two
drivers creating one store at once, param values over MLflow's limit, and trials finished by
older code."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from backend_helpers import assert_one_finished_run_per_trial, live_runs_by_trial, quality, run_cli, trial_runs
from harness.cli import main
from harness.config import TrialSpec
from harness.tracking import CUT_MARK, PARAM_LIMIT, Tracker, default_tracking_uri, param_value


# -- item 6: a corrupt store ----------------------------------------------------------------------

@pytest.mark.parametrize("command", [["run", "--methods", "cam", "--dataset", "synthetic"],
                                     ["run", "--methods", "cam", "--dataset", "synthetic", "--dry-run"],
                                     ["report"], ["status"]])
def test_corrupt_store_is_one_clear_message(tmp_path, capsys, command):
    """Before: run / --dry-run / report died with a raw traceback (exit 1) and status showed
    finished trials as "finished (not yet in MLflow)". After: one message naming the file, exit 2."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a database\n" * 100)
    (tmp_path / "trials" / "abc").mkdir(parents=True)
    (tmp_path / "trials" / "abc" / "spec.json").write_text(json.dumps({"suite": "synthetic", "method": "cam", "seed": 0}))
    code = main([*command, "--results", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2, out
    assert f"MLflow store {db} is not an SQLite database" in out
    assert "Traceback" not in out


# -- item 7: two drivers creating one new store -----------------------------------------------------

def _open_store(uri: str, barrier, queue) -> None:
    import mlflow  # noqa: F401 - imported before the barrier: the race is in store creation, not imports

    barrier.wait()
    try:
        tracker = Tracker(uri, "synthetic")
        queue.put(("ok", tracker.experiment_id))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
def test_concurrent_drivers_create_one_store(tmp_path):
    """Before: drivers started at once on a new results directory raced through MLflow's
    schema migrations (tracebacks, sometimes a half-migrated store). After: creation is
    serialised by a lock file next to the database; every driver gets the one experiment."""
    uri = default_tracking_uri(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(uri, barrier, queue)) for _ in range(n)]
    for proc in procs:
        proc.start()
    answers = [queue.get(timeout=240) for _ in procs]
    for proc in procs:
        proc.join(60)
    assert all(kind == "ok" for kind, _ in answers), answers
    assert len({value for _, value in answers}) == 1
    client = MlflowClient(uri)  # the store is usable afterwards
    assert client.get_experiment_by_name("wsss-bench/synthetic") is not None
    assert (tmp_path / ".mlflow.db.lock").exists()


# -- item 12: long param values -----------------------------------------------------------------

def test_param_value_cut_is_marked():
    # 6000 characters fit; 6001 are cut to exactly 6000, the last len(CUT_MARK) being the mark
    assert param_value("a" * PARAM_LIMIT) == "a" * PARAM_LIMIT
    cut = param_value("b" * (PARAM_LIMIT + 1))
    assert len(cut) == PARAM_LIMIT and cut.endswith(CUT_MARK) and cut.startswith("b" * (PARAM_LIMIT - len(CUT_MARK)))


def test_long_param_is_marked_and_full_config_is_an_artifact(tmp_path):
    """Before: a 7000-character value was cut to 6000 silently and the full config was not in
    the run until the trial finished. After: the cut is marked and spec.json is logged at
    creation."""
    long_value = "x" * 7000
    spec = TrialSpec(suite="synthetic", method="cam", method_config={"note": long_value, "epochs": 1}, dataset="synthetic",
                     data_root=None, dataset_options={}, splits={}, eval={}, seed=0)
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "synthetic")
    run_id = tracker.open_trial_run(spec, None, "cpu")
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["method.note"].endswith(CUT_MARK) and len(params["method.note"]) == PARAM_LIMIT
    assert params["method.epochs"] == "1"
    local = MlflowClient(uri).download_artifacts(run_id, "spec.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["method_config"]["note"] == long_value


# -- item 14: finished with older code ---------------------------------------------------------

def _run(results: Path, *extra: str) -> int:
    return run_cli(results, "--methods", "cam", "--seeds", "0", *extra)


@pytest.mark.slow
def test_trial_finished_with_older_code_reruns(tmp_path, capsys, monkeypatch):
    """Before: a trial finished by older method / harness code counted as finished for ever
    (--dry-run "finished", no re-run). After: only for the code tree that produced it."""
    import harness.tracking as tracking

    results = tmp_path / "r"
    real = tracking.code_version()
    monkeypatch.setattr(tracking, "code_version", lambda: {**real, "wsss.code_tree": "tree-old"})
    assert _run(results) == 0
    (old,) = trial_runs(results)
    assert old.data.tags["wsss.code_tree"] == "tree-old"

    monkeypatch.setattr(tracking, "code_version", lambda: {**real, "wsss.code_tree": "tree-new"})
    capsys.readouterr()
    assert _run(results, "--dry-run") == 0
    assert "finished with older code" in " ".join(capsys.readouterr().out.split())
    assert _run(results, "--dry-run", "--reuse-older-code") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "finished" in out and "older code" not in out
    assert _run(results, "--reuse-older-code") == 0  # opted out: nothing re-runs
    assert len(trial_runs(results)) == 1

    assert _run(results) == 0  # re-runs under the new tree; the old run is kept, superseded
    runs = trial_runs(results)
    assert len(runs) == 2
    (superseded,) = [r for r in runs if r.data.tags.get("wsss.superseded") == "true"]
    assert superseded.info.run_id == old.info.run_id
    (new,) = assert_one_finished_run_per_trial(results, 1).values()
    (live,) = [r for group in live_runs_by_trial(results).values() for r in group]
    assert live.data.tags["wsss.code_tree"] == "tree-new"
    assert new == quality(old.data.metrics)  # same code content here, so the same numbers
    assert "finished with older code" in " ".join(capsys.readouterr().out.split())
    assert _run(results) == 0 and len(trial_runs(results)) == 2  # now finished for this tree: skipped


# -- item 1, stores left by the old rule -----------------------------------------------------------

def test_leftover_run_of_a_finished_trial_is_superseded(tmp_path):
    """A store written before the one rule may hold, beside a trial's finished run, the run a
    kill left with a finished tag but RUNNING status (the report listed it as unfinished). The
    next sweep marks it superseded: one live run per trial. Nothing is trained here."""
    from backend_helpers import TINY
    from harness.backends import BackendOptions, run_sweep
    from harness.config import load_suite, parse_overrides
    from harness.sweep import plan_trials

    (spec,) = plan_trials(load_suite("synthetic"), ["cam"], [0], parse_overrides(TINY), None, tmp_path / "cache")
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "synthetic")
    leftover = tracker.open_trial_run(spec, None, "cpu")
    tracker.client.set_tag(leftover, "wsss.status", "finished")  # killed before set_terminated
    tracker.client.set_tag(leftover, "wsss.superseded", "true")  # hidden while the second run is made, as the old code did
    finished = tracker.open_trial_run(spec, None, "cpu")
    tracker.client.set_tag(finished, "wsss.status", "finished")
    tracker.client.set_terminated(finished, "FINISHED")
    tracker.client.set_tag(leftover, "wsss.superseded", "false")
    result = run_sweep([spec], tmp_path, uri, BackendOptions())
    assert [o.state for o in result.outcomes] == ["skipped"]
    runs = {r.info.run_id: r for r in trial_runs(tmp_path)}
    assert runs[leftover].data.tags["wsss.superseded"] == "true"
    assert runs[finished].data.tags.get("wsss.superseded") != "true"
