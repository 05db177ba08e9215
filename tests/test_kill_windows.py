"""kill -9 and crash windows (issue 17, items 1-5): the driver is killed at an exact instant
(a ``WSSS_TEST_HOLD`` point blocks it there, then the test sends SIGKILL), and a rerun must
leave exactly one finished MLflow run per trial whose params and metrics are bit-identical
to an uninterrupted sweep. Tiny cam trials on synthetic data (a few seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from backend_helpers import (REPO, assert_one_finished_run_per_trial, cli_argv, cli_env, kill_group, live_runs_by_trial, pid_alive,
                             run_cli, wait_for)
from harness.backends.worker import lock_held, trial_lock
from harness.tracking import default_tracking_uri

SEEDS = ["--methods", "cam", "--seeds", "0,1", "--cpus-per-trial", "1"]


def _params_and_quality(results: Path, uri: str | None = None) -> dict[str, tuple[dict, dict]]:
    """trial id -> (params, quality metrics) of its one live run."""
    out = {}
    for trial_id, runs in live_runs_by_trial(results, uri).items():
        (run,) = runs
        metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith(("time_", "cpu_", "peak_"))}
        out[trial_id] = (dict(run.data.params), metrics)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """The uninterrupted sweep: params and every non-timing metric per trial."""
    results = tmp_path_factory.mktemp("reference")
    assert run_cli(results, *SEEDS) == 0
    assert_one_finished_run_per_trial(results, 2)
    return _params_and_quality(results)


def _run_until(results: Path, point: str, hold: Path, *args: str, uri: str | None = None) -> subprocess.Popen:
    """Start the driver in a subprocess; return once it blocks at hold point ``point``."""
    hold.mkdir(parents=True, exist_ok=True)
    env = cli_env(WSSS_TEST_HOLD=point, WSSS_TEST_HOLD_DIR=str(hold), PYTHONPATH=str(REPO))
    argv = cli_argv(results, *SEEDS, *args, *(["--tracking-uri", uri] if uri else []))
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: (hold / f"{point}.reached").exists(), 180, f"the driver to reach {point}", proc=proc)
    except BaseException:
        kill_group(proc)
        raise
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the driver alone (as `kill -9 <pid>` does), then reap it and any leftovers."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kill_group(proc)


def _assert_rerun_equals_reference(results: Path, reference) -> None:
    assert run_cli(results, *SEEDS) == 0
    assert_one_finished_run_per_trial(results, 2)
    assert _params_and_quality(results) == reference


@pytest.mark.slow
def test_killed_between_finished_tag_and_run_status(tmp_path, reference):
    """Item 1. Before: the rerun skipped the run whose tag said finished (status RUNNING) and
    created a second live run. After: that run is not finished by the one rule, so it is reused."""
    results = tmp_path / "r"
    _kill9(_run_until(results, "trial.finished_tag", tmp_path / "hold"))
    (run,) = [r for runs in live_runs_by_trial(results).values() for r in runs]
    assert run.data.tags["wsss.status"] == "finished" and run.info.status == "RUNNING"  # exactly the window
    _assert_rerun_equals_reference(results, reference)
    assert len(live_runs_by_trial(results)) == 2


@pytest.mark.slow
def test_killed_after_run_creation_before_params(tmp_path, reference):
    """Item 2. Before: the reused run never got its params (the finished trial had none).
    After: reuse logs the missing params (and the spec.json artifact)."""
    results = tmp_path / "r"
    _kill9(_run_until(results, "trial.created", tmp_path / "hold"))
    (run,) = [r for runs in live_runs_by_trial(results).values() for r in runs]
    assert run.data.params == {}
    _assert_rerun_equals_reference(results, reference)
    for runs in live_runs_by_trial(results).values():
        files = {a.path for a in MlflowClient(default_tracking_uri(results)).list_artifacts(runs[0].info.run_id)}
        assert "spec.json" in files


CRF_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np

    from harness.backends.worker import trial_lock
    from methods.base import CRFParams
    from methods.common.crf import dense_crf_many

    root = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(2000)]
    probs = [rng.dirichlet(np.ones(4), size=(96, 96)).transpose(2, 0, 1).astype(np.float32) for _ in range(2000)]
    with trial_lock(root):
        dense_crf_many(images, probs, CRFParams(iterations=20), workers=2)  # minutes of work: killed long before
""")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_crf_pool_dies_with_its_parent_and_never_holds_the_trial_lock(tmp_path):
    """Item 3. Before: the forked CRF workers outlived a kill -9 of the process holding the
    trial lock, and kept the lock (status: running for ever). After: they die with it and
    the lock is free."""
    root = tmp_path / "trials" / "t"
    proc = subprocess.Popen([sys.executable, "-c", CRF_SCRIPT, str(root)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            start_new_session=True)
    try:
        children = wait_for(lambda: len(_children(proc.pid)) >= 2 and _children(proc.pid), 120, "the CRF pool to start", proc=proc)
        assert lock_held(root)
        time.sleep(0.5)  # the workers are computing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not any(pid_alive(c) for c in children), 10, "the CRF workers to die with their parent")
        assert not lock_held(root)
    finally:
        kill_group(proc)  # the workers are in its process group: nothing is left behind


CRF_PLUGIN = str(Path(__file__).resolve().with_name("plugin_crf_slow.py"))


@pytest.mark.slow
def test_driver_killed_in_the_crf_pool_then_rerun_equals_reference(tmp_path, monkeypatch):
    """Item 3, end to end. Before: after kill -9 of the driver inside the dense-CRF evaluation
    its pool workers kept running and kept the trial lock: `status` said running for ever and
    the rerun skipped the trial ("already running") with exit 0. After: the workers die with
    the driver, the trial is not running, the rerun finishes it equal to an uninterrupted run."""
    from backend_helpers import PLUGIN, trial_id_of

    monkeypatch.setenv("WSSS_PLUGINS", os.pathsep.join([PLUGIN, CRF_PLUGIN]))
    monkeypatch.delenv("WSSS_TEST_CRF_ITERATIONS", raising=False)
    args = ["--methods", "cam_crf", "--seeds", "0", "--cpus-per-trial", "1"]
    reference = tmp_path / "reference"
    assert main_run(reference, args) == 0
    expected = _params_and_quality(reference)

    results = tmp_path / "r"
    env = cli_env(WSSS_PLUGINS=os.pathsep.join([PLUGIN, CRF_PLUGIN]), WSSS_TEST_CRF_ITERATIONS="100000", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cli_argv(results, *args), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        def in_crf_pool():
            beat = results / "trials"
            stages = [json.loads(p.read_text()).get("stage") for p in beat.glob("*/heartbeat.json")] if beat.exists() else []
            return stages == ["segment"] and len(_children(proc.pid)) >= 2 and _children(proc.pid)

        children = wait_for(in_crf_pool, 240, "the driver to enter the CRF pool", proc=proc)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: not any(pid_alive(c) for c in children), 10, "the CRF workers to die with the driver")
        trial = trial_id_of(results, "cam_crf", 0)
        assert not lock_held(results / "trials" / trial)
    finally:
        kill_group(proc)
    assert main_run(results, args) == 0
    assert_one_finished_run_per_trial(results, 1)
    assert _params_and_quality(results) == expected


def main_run(results: Path, args: list[str]) -> int:
    from backend_helpers import TINY
    from harness.cli import main

    return main(["run", "--dataset", "synthetic", "--results", str(results), *args, *TINY])


def test_a_trial_left_unfinished_is_not_exit_0(tmp_path, capsys):
    """Item 3 (exit code). Before: a trial skipped as "already running" (its lock held by a
    live process) ended the sweep with exit 0. After: exit 1, naming it."""
    from backend_helpers import TINY
    from harness.config import load_suite, parse_overrides
    from harness.sweep import plan_trials

    results = tmp_path / "r"
    (spec,) = plan_trials(load_suite("synthetic"), ["cam"], [0], parse_overrides(TINY), None, tmp_path / "cache")
    with trial_lock(results / "trials" / spec.trial_id):
        assert run_cli(results, "--methods", "cam", "--seeds", "0") == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "already queued or running" in out and "not finished: cam/synthetic/seed0" in out


SLURM_WAIT_DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    from harness.backends import BackendOptions, run_sweep, slurm
    from harness.config import load_suite, parse_overrides
    from harness.sweep import plan_trials
    from harness.tracking import default_tracking_uri

    results = Path(sys.argv[1])

    def submit(tasks, options, folder):  # a stand-in scheduler: the jobs are "running"
        return [slurm.Submitted("4242", tasks, folder)]

    def wait_jobs(submitted, results_dir, on_done=None, poll=None, interval=2.0):
        (results_dir / "waiting").write_text("x")
        while True:
            time.sleep(1)

    slurm.submit, slurm.wait_jobs = submit, wait_jobs
    slurm.check_cluster = lambda options: {}
    slurm.job_states = lambda ids, timeout=30: {i: "RUNNING" for i in ids}
    specs = plan_trials(load_suite("synthetic"), ["cam"], [0], parse_overrides(sys.argv[2:]), None, results / "cache")
    options = BackendOptions(backend="slurm", wait=True, slurm=slurm.SlurmOptions())
    run_sweep(specs, results, default_tracking_uri(results), options)
""")


@pytest.mark.slow
def test_slurm_wait_tracking_server_outlives_a_killed_driver(tmp_path):
    """Item 4. Before: with --wait the server was attached to the driver and died with it
    (the running jobs then failed after MLflow's retries). After: it is detached, recorded in
    .mlflow-server.json and still answers after kill -9 of the driver."""
    from backend_helpers import TINY
    from harness.mlflow_server import recorded_server

    results = tmp_path / "r"
    results.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLURM_WAIT_DRIVER, str(results), *TINY], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    server = None
    try:
        wait_for(lambda: (results / "waiting").exists(), 300, "the driver to wait for its jobs", proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(2)  # an attached server notices the closed lifeline within a second
        server = recorded_server(results)
        assert server is not None and server.detached and server.healthy()
    finally:
        if server is not None:
            server.stop()
        kill_group(proc)


def _mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    chunk = b"\0" * (1 << 20)
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs and remount it read-only")
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_results_dir_turns_read_only_or_full_mid_sweep(tmp_path, reference, fault):
    """Item 5. Before: the driver died with a raw OSError traceback writing trial 1's
    outcome.json, trial 2 was never attempted and the sweep run stayed RUNNING. After: trial 1
    stays finished in MLflow, trial 2 is attempted and recorded failed, one paragraph says what
    failed, exit 1, sweep run FAILED; once writable again, a rerun equals the uninterrupted sweep."""
    results = tmp_path / "mnt"
    if not _mount_tmpfs(results):
        pytest.skip("cannot mount a tmpfs here")
    store = tmp_path / "store"
    store.mkdir()
    uri = default_tracking_uri(store)
    proc = None
    try:
        proc = _run_until(results, "worker.outcome", tmp_path / "hold", uri=uri)
        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(results)], check=True)
        else:
            _fill(results)
        (tmp_path / "hold" / "worker.outcome.release").write_text("go")
        out, _ = proc.communicate(timeout=300)
        flat = " ".join(out.split())
        assert proc.returncode == 1, out[-3000:]
        assert "Traceback" not in out and "refused writes" in flat
        assert ("Read-only file system" if fault == "read-only" else "No space left on device") in flat
        runs = live_runs_by_trial(results, uri)
        states = sorted(r.data.tags["wsss.status"] for group in runs.values() for r in group)
        assert states == ["failed", "finished"]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("wsss-bench/synthetic")
        (sweep,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("wsss.kind") == "sweep"]
        assert sweep.info.status == "FAILED"
        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,rw", str(results)], check=True)
        else:
            (results / "filler").unlink()
        assert run_cli(results, *SEEDS, "--tracking-uri", uri) == 0
        assert_one_finished_run_per_trial(results, 2, uri)
        assert _params_and_quality(results, uri) == reference
    finally:
        if proc is not None and proc.poll() is None:
            kill_group(proc)  # a failed assertion must not leave the held driver behind
        subprocess.run(["umount", "-l", str(results)], capture_output=True)
