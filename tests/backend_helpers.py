"""Shared pieces of the backend tests: the tiny sweep, the local reference it must match on
every backend, and MLflow checks (no duplicate runs, every trial finished)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.tracking import default_tracking_uri

REPO = Path(__file__).resolve().parents[1]
PLUGIN = str(Path(__file__).resolve().with_name("plugin_methods.py"))
# test_run.py's tiny cam trial; SWEEP runs one thread per trial on every backend, so every
# backend computes bit-identical numbers.
TINY = ["dataset.num_train=12", "dataset.num_val=6", "dataset.image_size=64", "epochs=1", "seg_epochs=1",
        "crop=64", "seg_crop=64", "batch_size=6", "seg_batch_size=6", "eval.gallery_size=2"]
SWEEP = ["--methods", "cam,cam_b", "--seeds", "0,1", "--cpus-per-trial", "1"]


def run_cli(results: Path, *args: str) -> int:
    """`wsss-bench run` in this process on the tiny synthetic suite."""
    os.environ["WSSS_PLUGINS"] = PLUGIN
    return main(["run", "--dataset", "synthetic", "--results", str(results), *args, *TINY])


def cli_argv(results: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "run", "--dataset", "synthetic", "--results", str(results), *args, *TINY]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, WSSS_PLUGINS=PLUGIN, PYTHONUNBUFFERED="1", COLUMNS="200")
    env.update(extra)
    return env


def trial_runs(results: Path, uri: str | None = None) -> list:
    """Every trial run (not sweep runs) of the synthetic experiment."""
    client = MlflowClient(uri or default_tracking_uri(results))
    exp = client.get_experiment_by_name("wsss-bench/synthetic")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("wsss.kind") != "sweep"]


def live_runs_by_trial(results: Path, uri: str | None = None) -> dict[str, list]:
    out: dict[str, list] = {}
    for run in trial_runs(results, uri):
        if run.data.tags.get("wsss.superseded") != "true":
            out.setdefault(run.data.tags["wsss.trial_id"], []).append(run)
    return out


def assert_one_finished_run_per_trial(results: Path, expected: int, uri: str | None = None) -> dict[str, dict[str, float]]:
    """No duplicates: exactly one live MLflow run per trial, each finished. Returns the
    quality metrics by trial id."""
    runs = live_runs_by_trial(results, uri)
    assert len(runs) == expected, {k: len(v) for k, v in runs.items()}
    for trial_id, group in runs.items():
        assert len(group) == 1, f"trial {trial_id} has {len(group)} MLflow runs"
        run = group[0]
        assert run.info.status == "FINISHED" and run.data.tags["wsss.status"] == "finished", (trial_id, run.info.status, run.data.tags.get("wsss.error"))
    return {tid: quality(group[0].data.metrics) for tid, group in runs.items()}


def quality(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "iou" in k or "threshold" in k}


def reference_metrics(tmp_path_factory) -> dict[str, dict[str, float]]:
    """The sweep run serially in this process (the local backend's default): trial id ->
    quality metrics. Computed once per test session and cached in the session's base temp."""
    base = tmp_path_factory.getbasetemp()
    cache = base / "backend-reference.json"
    if cache.exists():
        return json.loads(cache.read_text())
    results = base / "backend-reference"
    assert run_cli(results, *SWEEP) == 0
    metrics = assert_one_finished_run_per_trial(results, 4)
    cache.write_text(json.dumps(metrics))
    return metrics


def attempts(results: Path, trial_id: str) -> int:
    path = results / "trials" / trial_id / "attempts.jsonl"
    return len([line for line in path.read_text().splitlines() if line.strip()]) if path.exists() else 0


def trial_id_of(results: Path, method: str, seed: int) -> str:
    for spec_path in (results / "trials").glob("*/spec.json"):
        spec = json.loads(spec_path.read_text())
        if spec["method"] == method and spec["seed"] == seed:
            return spec_path.parent.name
    raise AssertionError(f"no trial {method} seed {seed} under {results}")


def stages_done(results: Path, trial_id: str) -> set[str]:
    path = results / "trials" / trial_id / "state.json"
    try:
        return set(json.loads(path.read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return set()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)
