"""The SLURM backend against a real single-node SLURM cluster with accounting (started by the
``slurm_cluster`` fixture from the Debian packages, on 127.0.0.1 in a temp dir): the 2x2
sweep equals the local one; submission returns at once, `status` shows the jobs, a re-run
does not submit twice, a job requeued mid-run (``scontrol requeue``) and one preempted
(``USR2``: submitit checkpoints and requeues) both resume at their last finished stage, and
``--wait`` re-attaches; bad options are one clear message."""

from __future__ import annotations

import json

import pytest

from backend_helpers import (SWEEP, assert_one_finished_run_per_trial, attempts, live_runs_by_trial, reference_metrics, run_cli,
                             stages_done, trial_id_of, wait_for)
from harness.backends.slurm import SlurmOptions, parse_mem, parse_sbatch_lines, parse_time
from harness.errors import ConfigError
from slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture


# -- option parsing (no cluster needed) ------------------------------------------------------------

@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("2-00:00:00", 2880), ("1-12", 2160), ("45:30", 46)])
def test_time_forms(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text, value", [("16G", "16G"), ("512M", "512M"), ("1.5G", "1536M"), ("32000", "32000M"), ("2gb", "2G")])
def test_mem_forms(text, value):
    assert parse_mem(text) == value


def test_sbatch_lines_become_submitit_parameters():
    assert parse_sbatch_lines(["mail-type=END", "--exclusive", "#SBATCH --comment=a b", "nice 10"]) == {
        "mail_type": "END", "exclusive": True, "comment": "a b", "nice": "10"}


@pytest.mark.parametrize("line, message", [
    ("comment=x\n#SBATCH --wrap=rm", "line break"),
    ("array=0-99", "sets --array itself"),
    ("--output=/tmp/x", "sets --output itself"),
    ("$(reboot)=1", "sbatch option name"),
])
def test_sbatch_lines_that_could_escape_are_refused(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_sbatch_lines([line])


def test_setup_lines_are_single_lines():
    with pytest.raises(ConfigError, match="line break"):
        SlurmOptions(setup=["module load cuda\nrm -rf /"]).validate()
    params = SlurmOptions(partition="debug", gpus_per_trial=2, cpus_per_trial=8, mem="16G", time="2:00:00", constraint="a100",
                          array_parallelism=4, sbatch=["mail-type=END"], setup=["module load cuda"]).validate()
    assert params["gpus_per_node"] == 2 and params["cpus_per_task"] == 8 and params["mem"] == "16G" and params["time"] == 120
    assert params["additional_parameters"] == {"mail_type": "END"} and params["setup"] == ["module load cuda"]


# -- against the real cluster ----------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_sweep_on_slurm_equals_local(slurm_cluster, tmp_path_factory, capsys):  # noqa: F811
    reference = reference_metrics(tmp_path_factory)
    results = tmp_path_factory.mktemp("slurm")
    code = run_cli(results, *SWEEP, "--backend", "slurm", "--wait", "--partition", slurm_cluster.partition, "--time", "30",
                   "--mem", "2G", "--sbatch", "comment=wsss-bench-test", "--array-parallelism", "2", "--trials-per-job", "2")
    assert code == 0, capsys.readouterr().out[-3000:]
    assert assert_one_finished_run_per_trial(results, 4) == reference
    jobs = {json.loads(p.read_text())["job_id"] for p in (results / "trials").glob("*/submission.json")}
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 1  # one job array, two trials per job
    assert {slurm_cluster.sacct_state(j) for j in jobs} == {"COMPLETED"}
    from harness.mlflow_server import recorded_server

    # with --wait the server is detached (it would outlive a killed driver) and stopped once no job is left
    assert recorded_server(results) is None
    from harness.cli import main

    capsys.readouterr()
    assert main(["status", "--results", str(results), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [s["state"] for s in status] == ["finished"] * 4 and {s["scheduler"] for s in status} == {"COMPLETED"}


@pytest.mark.integration
@pytest.mark.slow
def test_requeued_and_preempted_jobs_resume_and_wait_reattaches(slurm_cluster, tmp_path, tmp_path_factory, capsys):  # noqa: F811
    from harness.cli import main
    from harness.mlflow_server import recorded_server

    reference = reference_metrics(tmp_path_factory)
    args = ["--methods", "cam_pause", "--seeds", "0,1", "--cpus-per-trial", "1", "--backend", "slurm", "--time", "30",
            "cam_pause.pause_s=15"]  # overrides last: run_cli appends the TINY ones
    assert run_cli(tmp_path, *args) == 0  # returns after submission
    out = capsys.readouterr().out
    assert "Submitted to SLURM" in out and "wsss-bench status" in out
    first, second = trial_id_of(tmp_path, "cam_pause", 0), trial_id_of(tmp_path, "cam_pause", 1)
    job = {t: json.loads((tmp_path / "trials" / t / "submission.json").read_text())["job_id"] for t in (first, second)}
    server = recorded_server(tmp_path)
    assert server is not None and server.detached  # outlives the driver for the queued jobs

    assert run_cli(tmp_path, *args) == 0  # the same command again: nothing is submitted twice
    assert "already queued or running" in " ".join(capsys.readouterr().out.split())
    assert len(list((tmp_path / "slurm").iterdir())) == 1

    assert main(["status", "--results", str(tmp_path), "--json"]) == 0
    status = {s["trial_id"]: s for s in json.loads(capsys.readouterr().out)}
    assert {status[t]["job_id"] for t in (first, second)} == set(job.values())
    assert all(status[t]["state"].startswith(("queued", "running")) for t in (first, second)), status
    assert main(["status", "--results", str(tmp_path)]) == 0  # the table, too
    assert "Trials in" in capsys.readouterr().out

    # 1. scontrol requeue while the trial pauses in train_seg: SLURM kills and requeues it
    wait_for(lambda: "pseudo_masks" in stages_done(tmp_path, first), 600, "trial 0 to reach its pause")
    checkpoints = {t: tmp_path / "trials" / t / "checkpoints" / "train_cam.pt" for t in (first, second)}
    mtime = {first: checkpoints[first].stat().st_mtime_ns}
    slurm_cluster.run("scontrol", "requeue", job[first])
    # 2. a preemption notice (USR2) for the other one: submitit checkpoints and requeues
    wait_for(lambda: "pseudo_masks" in stages_done(tmp_path, second), 600, "trial 1 to reach its pause")
    mtime[second] = checkpoints[second].stat().st_mtime_ns
    slurm_cluster.run("scancel", "--signal=USR2", job[second])

    assert run_cli(tmp_path, "--wait", *args) == 0  # re-attaches to the queued jobs and waits
    out = " ".join(capsys.readouterr().out.split())
    assert "Waiting also for 2 trial(s)" in out
    metrics = assert_one_finished_run_per_trial(tmp_path, 2)
    for trial, seed in ((first, 0), (second, 1)):
        assert attempts(tmp_path, trial) == 2, trial  # ran twice: before and after the requeue
        assert checkpoints[trial].stat().st_mtime_ns == mtime[trial]  # train_cam was not redone: resumed
        cam = [tid for tid in reference if json.loads((tmp_path_factory.getbasetemp() / "backend-reference" / "trials" / tid / "spec.json")
                                                      .read_text())["method"] == "cam"
               and json.loads((tmp_path_factory.getbasetemp() / "backend-reference" / "trials" / tid / "spec.json").read_text())["seed"] == seed]
        assert metrics[trial] == reference[cam[0]]  # the resumed trial equals an unbroken cam trial
    assert {slurm_cluster.sacct_state(j) for j in job.values()} == {"COMPLETED"}
    heartbeat = json.loads((tmp_path / "trials" / second / "attempts.jsonl").read_text().splitlines()[0])
    assert heartbeat["job_id"] == job[second]
    assert len(live_runs_by_trial(tmp_path)) == 2

    assert main(["status", "--results", str(tmp_path), "--stop-server"]) == 0
    assert recorded_server(tmp_path) is None


@pytest.mark.integration
def test_unknown_partition_is_one_clear_message(slurm_cluster, tmp_path, capsys):  # noqa: F811
    code = run_cli(tmp_path, "--methods", "cam", "--seeds", "0", "--backend", "slurm", "--partition", "debgu")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert "partition 'debgu' is unknown" in out and 'Did you mean "debug"' in out and "Traceback" not in out
