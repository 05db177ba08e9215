"""Many workers, one MLflow store: 8 processes write at once through the tracking server the
harness starts (127.0.0.1, free port, SQLite behind it) and nothing is lost or locked; the
server stops with every process it spawned."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from harness.mlflow_server import health, recorded_server, start_server
from harness.tracking import Tracker, default_tracking_uri

pytestmark = [pytest.mark.integration]

WRITERS = 8
STEPS = 60
KEYS = 5
EXPERIMENT = "wsss-bench/concurrency"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    results = tmp_path_factory.mktemp("tracking")
    uri = default_tracking_uri(results)
    Tracker(uri, "concurrency")  # the driver creates the database and the experiment first
    srv = start_server(results, uri, detach=True)  # detached: recorded for later commands (checked below)
    yield srv
    srv.stop()


def _writer(uri: str, index: int, barrier, shared_run: str) -> str:
    """One worker: its own run (batches, single metrics, params, tags, an artifact) and its
    own key on a run shared by all writers."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run_id = client.create_run(experiment.experiment_id, tags={"writer": str(index)}).info.run_id
    barrier.wait(timeout=600)  # everyone writes at the same time
    for step in range(STEPS):
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"m{k}", float(index * 10000 + step * 10 + k), now, step) for k in range(KEYS)])
        client.log_metric(run_id, "single", float(step), step=step)
        client.log_metric(shared_run, f"writer_{index}", float(step), step=step)
    client.log_batch(run_id, params=[Param(f"p{k}", f"{index}-{k}") for k in range(20)])
    client.set_tag(run_id, "done", "yes")
    path = os.path.join(os.getcwd(), f"artifact-{index}.txt")
    with open(path, "w") as handle:
        handle.write(f"writer {index}")
    client.log_artifact(run_id, path)
    os.remove(path)
    client.set_terminated(run_id)
    return run_id


def test_eight_concurrent_writers_lose_nothing(server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    assert server.uri.startswith("http://127.0.0.1:") and health(server.uri)
    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    shared = client.create_run(experiment.experiment_id, tags={"shared": "yes"}).info.run_id
    monkeypatch.chdir(tmp_path)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(WRITERS)
        with ctx.Pool(WRITERS) as pool:
            run_ids = pool.starmap(_writer, [(server.uri, i, barrier, shared) for i in range(WRITERS)])
    assert len(set(run_ids)) == WRITERS
    for index, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["done"] == "yes"
        assert run.data.params == {f"p{k}": f"{index}-{k}" for k in range(20)}
        for k in range(KEYS):
            history = client.get_metric_history(run_id, f"m{k}")
            assert sorted((m.step, m.value) for m in history) == [(s, float(index * 10000 + s * 10 + k)) for s in range(STEPS)]
        assert sorted(m.step for m in client.get_metric_history(run_id, "single")) == list(range(STEPS))
        assert [a.path for a in client.list_artifacts(run_id)] == [f"artifact-{index}.txt"]
        shared_history = client.get_metric_history(shared, f"writer_{index}")
        assert sorted(m.step for m in shared_history) == list(range(STEPS))
    # the same numbers are in the SQLite file behind the server
    direct = MlflowClient(tracking_uri=server.backend_store_uri)
    assert len(direct.get_metric_history(run_ids[-1], "m0")) == STEPS


def test_server_is_recorded_and_stops_with_its_processes(server):
    results = server.results_dir
    assert recorded_server(results).pid == server.pid  # later commands on these results find and reuse it
    group = [p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == server.pid]
    assert len(group) >= 2  # the supervisor and `mlflow server` (+ uvicorn)
    server.stop()
    assert not health(server.uri)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == server.pid]
    assert recorded_server(results) is None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None
