"""The local backend: the device pool (never two trials on one GPU), a parallel sweep that
equals the serial one, a failing trial among finishing ones, and a driver killed with
``kill -9`` mid-sweep whose rerun finishes only the rest, with no duplicate MLflow runs and
nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from argparse import Namespace

import pytest

from backend_helpers import (SWEEP, assert_one_finished_run_per_trial, attempts, cli_argv, cli_env, kill_group, live_runs_by_trial,
                             pid_alive, reference_metrics, run_cli, stages_done, trial_id_of, wait_for)
from harness.backends import BackendOptions
from harness.backends.local import plan_slots
from harness.errors import ConfigError


# -- the device pool (no GPU needed: GPU ids are given explicitly) ------------------------------

def test_cpu_slots_hide_gpus_and_split_threads():
    slots = plan_slots(2, "cpu", cpus_per_trial=3)
    assert [s.device for s in slots] == ["cpu", "cpu"]
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" and s.threads == 3 and s.env["OMP_NUM_THREADS"] == "3" for s in slots)


def test_gpu_slots_are_disjoint():
    slots = plan_slots(2, "cuda", devices=["0", "1", "2", "5"], gpus_per_trial=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,5"]
    assert all(s.device == "cuda" for s in slots)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_parallel=3, device="cuda", devices=["0", "1"]), "needs 3 GPUs, but only 2"),
    (dict(max_parallel=2, device="cuda", devices=["0", "1"], gpus_per_trial=2), "needs 4 GPUs"),
    (dict(max_parallel=2, device="cuda:1"), "would share it"),
    (dict(max_parallel=0, device="cpu"), "at least 1"),
    (dict(max_parallel=2, device="cpu", gpus_per_trial=1), "needs --device cuda"),
    (dict(max_parallel=2, device="cpu", devices=["0", "1"]), "pass --device cuda"),
])
def test_pool_refuses_to_share_a_gpu(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_slots(**kwargs)


@pytest.mark.parametrize("flags, message", [
    (dict(backend="local", partition="gpu"), "--partition applies to --backend slurm only"),
    (dict(backend="local", ray_address="127.0.0.1:6379"), "--ray-address applies to --backend ray only"),
    (dict(backend="ray", max_parallel=4), "--max-parallel applies to --backend local only"),
    (dict(backend="slurm", wait=False, time="1:00:00:00:00"), "--time"),
    (dict(backend="slurm", sbatch=["mail-type=END\n#SBATCH --x"]), "line break"),
    (dict(backend="local", cpus_per_trial=0), "--cpus-per-trial must be"),
])
def test_backend_option_errors(flags, message):
    defaults = dict(partition=None, account=None, qos=None, mem=None, time=None, constraint=None, array_parallelism=None, sbatch=None,
                    slurm_setup=None, max_timeouts=None, signal_delay=None, trials_per_job=None, wait=False, max_parallel=None,
                    devices=None, ray_address=None, ray_max_retries=None, ray_num_cpus=None, cpus_per_trial=None, gpus_per_trial=None)
    with pytest.raises(ConfigError, match=message.replace("-", r"\-").replace("(", r"\(")):
        BackendOptions.from_args(Namespace(**{**defaults, **flags}))


def test_bad_backend_option_is_one_clear_message(tmp_path, capsys):
    from harness.cli import main

    code = main(["run", "--methods", "cam", "--dataset", "synthetic", "--results", str(tmp_path), "--max-parallel", "2",
                 "--device", "cuda", "--devices", "0"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "share a GPU" in out and "Traceback" not in out


# -- end to end -------------------------------------------------------------------------------

@pytest.mark.slow
def test_parallel_sweep_equals_serial(tmp_path_factory):
    reference = reference_metrics(tmp_path_factory)  # the same sweep, serially in this process
    results = tmp_path_factory.mktemp("parallel")
    assert run_cli(results, *SWEEP, "--max-parallel", "2") == 0
    assert assert_one_finished_run_per_trial(results, 4) == reference
    outcomes = [json.loads(p.read_text()) for p in (results / "trials").glob("*/outcome.json")]
    assert len({o["pid"] for o in outcomes}) == 2  # two worker processes shared the four trials
    assert not (results / ".mlflow-server.json").exists()  # the sweep's tracking server is gone


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    code = run_cli(tmp_path, "--methods", "cam,broken", "--seeds", "0", "--max-parallel", "2", "--cpus-per-trial", "1")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 1
    runs = live_runs_by_trial(tmp_path)
    by_method = {group[0].data.tags["wsss.method"]: group[0] for group in runs.values()}
    assert by_method["cam"].data.tags["wsss.status"] == "finished"
    broken = by_method["broken"]
    assert broken.data.tags["wsss.status"] == "failed" and broken.info.status == "FAILED"
    assert "broken on purpose" in broken.data.tags["wsss.error"]
    from mlflow.tracking import MlflowClient

    from harness.tracking import default_tracking_uri

    artifacts = [a.path for a in MlflowClient(default_tracking_uri(tmp_path)).list_artifacts(broken.info.run_id)]
    assert "error.txt" in artifacts
    error = (tmp_path / "trials" / broken.data.tags["wsss.trial_id"] / "error.txt").read_text()
    assert "Traceback" in error and "ValueError: broken on purpose" in error
    assert "broken on purpose" in out and "failed" in out  # the summary lists it


@pytest.mark.slow
def test_driver_killed_mid_sweep_then_rerun_finishes_only_the_rest(tmp_path, tmp_path_factory):
    reference = reference_metrics(tmp_path_factory)
    args = ["--methods", "cam,cam_pause", "--seeds", "0", "--cpus-per-trial", "1", "--max-parallel", "2", "cam_pause.pause_s=20"]
    driver = subprocess.Popen(cli_argv(tmp_path, *args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        trials = tmp_path / "trials"
        wait_for(lambda: len(list(trials.glob("*/spec.json"))) == 2, 600, "both trials to start", proc=driver)
        cam, paused = trial_id_of(tmp_path, "cam", 0), trial_id_of(tmp_path, "cam_pause", 0)
        wait_for(lambda: (json.loads((trials / cam / "outcome.json").read_text()).get("state") == "finished"
                          if (trials / cam / "outcome.json").exists() else False), 600, "the cam trial to finish", proc=driver)
        wait_for(lambda: "pseudo_masks" in stages_done(tmp_path, paused), 600, "cam_pause to reach its pause", proc=driver)
        server = json.loads((tmp_path / ".mlflow-server.json").read_text())
        workers = {json.loads((trials / t / "heartbeat.json").read_text())["pid"] for t in (cam, paused)}
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: its workers and server must follow
        driver.wait(timeout=30)
        wait_for(lambda: not any(pid_alive(p) for p in workers), 60, "the worker processes to die with the driver")
        wait_for(lambda: not pid_alive(server["pid"]), 60, "the tracking server to stop with the driver")
    finally:
        if driver.poll() is None:
            kill_group(driver)
    from harness.backends.status import collect

    from harness.tracking import default_tracking_uri

    states = {s.trial_id: s.state for s in collect(tmp_path, default_tracking_uri(tmp_path))}
    assert states[cam] == "finished"
    assert states[paused].startswith("dead (no live worker") and "resumes at train_seg" in states[paused], states[paused]
    finished_state = (trials / cam / "state.json").stat().st_mtime_ns
    checkpoint = (trials / paused / "checkpoints" / "train_cam.pt").stat().st_mtime_ns
    runs_before = {tid: [r.info.run_id for r in group] for tid, group in live_runs_by_trial(tmp_path).items()}
    assert stages_done(tmp_path, paused) == {"train_cam", "cams", "pseudo_masks"}

    rerun = subprocess.run(cli_argv(tmp_path, *args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    metrics = assert_one_finished_run_per_trial(tmp_path, 2)
    assert (trials / cam / "state.json").stat().st_mtime_ns == finished_state  # not re-run
    assert (trials / paused / "checkpoints" / "train_cam.pt").stat().st_mtime_ns == checkpoint  # resumed, not restarted
    assert attempts(tmp_path, cam) == 1 and attempts(tmp_path, paused) == 2
    assert {tid: [r.info.run_id for r in group] for tid, group in live_runs_by_trial(tmp_path).items()} == runs_before  # same runs
    cam_reference = {k: v for k, v in reference.items() if k == cam}
    assert {cam: metrics[cam]} == cam_reference
    assert metrics[paused] == reference[cam]  # cam_pause computes what cam computes: the resumed trial equals an unbroken one
