"""The Ray backend against a real Ray cluster on 127.0.0.1 (one per test module, started like
a user would: ``ray start --head``): the 2x2 sweep equals the local one; a worker that dies
is retried (system failure) while an error in method code is recorded once and not retried;
a driver killed mid-sweep is resumed without duplicates; an unreachable address is one clear
message; and, without --ray-address, the harness starts its own cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from backend_helpers import (SWEEP, assert_one_finished_run_per_trial, attempts, cli_argv, cli_env, kill_group, live_runs_by_trial,
                             reference_metrics, run_cli, stages_done, trial_id_of, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_marked(marker: str) -> None:
    """Every process whose command line names this cluster's temp dir (nothing else)."""
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if marker.encode() in (pid_dir / "cmdline").read_bytes():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head` on 127.0.0.1 with its own temp dir; torn down (only it) afterwards."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the `ray` command is not installed in this environment")
    temp = tempfile.mkdtemp(prefix="wray-")  # short: Ray's socket paths live below it
    port = _free_port()
    token = Path(temp) / "auth_token"  # token authentication with this cluster's own token
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    previous = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)  # drivers (in-process and subprocesses) find it here
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    log = open(Path(temp) / "ray-start.log", "wb")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
                             "--object-store-memory=100000000", "--block"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (Path(temp) / "ray-start.log").read_text()[-3000:]
            if "Ray runtime started" in (Path(temp) / "ray-start.log").read_text(errors="replace"):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("ray start did not come up in 180 s")
        yield address
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_marked(temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if previous is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = previous


def test_sweep_on_ray_equals_local(ray_cluster, tmp_path_factory):
    reference = reference_metrics(tmp_path_factory)
    results = tmp_path_factory.mktemp("ray")
    assert run_cli(results, *SWEEP, "--backend", "ray", "--ray-address", ray_cluster) == 0
    assert assert_one_finished_run_per_trial(results, 4) == reference
    outcomes = [json.loads(p.read_text()) for p in (results / "trials").glob("*/outcome.json")]
    assert {o["backend"] for o in outcomes} == {"ray"} and all(o["job_id"].startswith("ray-") for o in outcomes)


def test_worker_death_is_retried_but_a_method_error_is_not(ray_cluster, tmp_path, capsys):
    code = run_cli(tmp_path, "--methods", "broken,crash_once", "--seeds", "0", "--cpus-per-trial", "1", "--backend", "ray",
                   "--ray-address", ray_cluster, "--ray-max-retries", "1")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1
    broken, crash = trial_id_of(tmp_path, "broken", 0), trial_id_of(tmp_path, "crash_once", 0)
    assert attempts(tmp_path, broken) == 1  # deterministic: never retried
    assert attempts(tmp_path, crash) == 2  # the worker died once (os._exit): Ray ran it again
    runs = {tid: group for tid, group in live_runs_by_trial(tmp_path).items()}
    assert len(runs[broken]) == 1 and runs[broken][0].data.tags["wsss.status"] == "failed"
    assert len(runs[crash]) == 1 and runs[crash][0].data.tags["wsss.status"] == "finished"  # one run across both attempts
    assert "broken on purpose" in out


def test_driver_killed_mid_sweep_then_rerun_finishes_the_rest(ray_cluster, tmp_path):
    args = ["--methods", "cam,cam_pause", "--seeds", "0", "--cpus-per-trial", "1", "--backend", "ray", "--ray-address", ray_cluster,
            "cam_pause.pause_s=20"]
    driver = subprocess.Popen(cli_argv(tmp_path, *args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    trials = tmp_path / "trials"
    try:
        wait_for(lambda: len(list(trials.glob("*/spec.json"))) == 2, 600, "both trials to start", proc=driver)
        cam, paused = trial_id_of(tmp_path, "cam", 0), trial_id_of(tmp_path, "cam_pause", 0)
        wait_for(lambda: (trials / cam / "outcome.json").exists(), 600, "the cam trial to finish", proc=driver)
        wait_for(lambda: "pseudo_masks" in stages_done(tmp_path, paused), 600, "cam_pause to reach its pause", proc=driver)
        os.kill(driver.pid, signal.SIGKILL)  # Ray notices the dead driver and kills its tasks
        driver.wait(timeout=30)
        wait_for(lambda: json.loads((trials / paused / "heartbeat.json").read_text())["state"] != "running"
                 or not _pid_running(json.loads((trials / paused / "heartbeat.json").read_text())["pid"]), 120,
                 "Ray to stop the dead driver's task")
    finally:
        if driver.poll() is None:
            kill_group(driver)
    checkpoint = (trials / paused / "checkpoints" / "train_cam.pt").stat().st_mtime_ns
    finished_state = (trials / cam / "state.json").stat().st_mtime_ns
    rerun = subprocess.run(cli_argv(tmp_path, *args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert_one_finished_run_per_trial(tmp_path, 2)
    assert (trials / cam / "state.json").stat().st_mtime_ns == finished_state
    assert (trials / paused / "checkpoints" / "train_cam.pt").stat().st_mtime_ns == checkpoint
    assert attempts(tmp_path, cam) == 1 and attempts(tmp_path, paused) == 2


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, ProcessLookupError):
        return False


def test_unreachable_address_is_one_clear_message(tmp_path, capsys):
    from harness.cli import main

    code = main(["run", "--methods", "cam", "--dataset", "synthetic", "--results", str(tmp_path), "--backend", "ray",
                 "--ray-address", f"127.0.0.1:{_free_port()}", "dataset.num_train=4", "dataset.num_val=2", "dataset.image_size=48"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert "Cannot reach the Ray cluster at 127.0.0.1:" in out and "ray start --head" in out and "Traceback" not in out


def test_without_address_a_local_cluster_starts_on_loopback(tmp_path_factory, monkeypatch):
    import ray

    if not os.environ.get("RAY_AUTH_TOKEN_PATH"):  # not ~/.ray/auth_token: leave the home alone. (Ray caches the
        token = tmp_path_factory.mktemp("ray-token") / "auth_token"  # token per process: keep one already in use.)
        token.write_text(secrets.token_hex(32))
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray's default for a new local cluster, restored afterwards

    from harness.backends import ray_backend

    reference = reference_metrics(tmp_path_factory)
    seen = {}
    original = ray_backend.connect

    def spy(address, num_cpus, num_gpus):
        started = original(address, num_cpus, num_gpus)
        seen["started"] = started
        seen["nodes"] = [n["NodeManagerAddress"] for n in ray.nodes()]
        return started

    monkeypatch.setattr(ray_backend, "connect", spy)
    results = tmp_path_factory.mktemp("ray-local")
    assert run_cli(results, "--methods", "cam", "--seeds", "0", "--cpus-per-trial", "1", "--backend", "ray", "--ray-num-cpus", "1") == 0
    assert seen["started"] is True and seen["nodes"] == ["127.0.0.1"]
    assert not ray.is_initialized()  # stopped at the end of the sweep
    metrics = assert_one_finished_run_per_trial(results, 1)
    assert metrics == {k: v for k, v in reference.items() if k in metrics}
