"""The Ray backend: one Ray task per trial, with ``num_cpus`` / ``num_gpus`` per trial.

* Cluster: ``--ray-address host:port`` joins an existing cluster (checked for reachability
  first, so a typo fails in seconds with one clear message instead of a long hang); without
  it, a local cluster is started in this process bound to 127.0.0.1 (no dashboard, a small
  object store) and stopped at the end.
* Retries: ``max_retries`` covers system failures only (the worker process died: OOM kill,
  node loss); ``retry_exceptions`` stays False, and an error in method code never even
  reaches Ray: the worker records it and returns a failed outcome, so a deterministic error
  never burns retries.
* The source of truth for "finished" is the trial directory + MLflow, never Ray: a killed
  driver (Ray then kills its tasks) is resumed by running the same command again.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

from harness.errors import ConfigError


def _ray_trial(task: dict[str, Any]) -> dict[str, Any]:
    """The Ray task (module-level: Ray imports it by name in the worker)."""
    import ray

    from harness.backends.worker import run_trial

    gpus = ray.get_gpu_ids()
    task = dict(task, device="cuda" if gpus else "cpu")
    context = ray.get_runtime_context()
    return run_trial(task, job_id=f"ray-{context.get_task_id()[:16]}")


def parse_address(address: str) -> tuple[str, int] | None:
    """host:port of a GCS / Ray client address (None for 'auto')."""
    text = address.strip()
    if text == "auto":
        return None
    for prefix in ("ray://", "http://", "https://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not host:port (e.g. 127.0.0.1:6379, as printed by `ray start --head`), "
                          "ray://host:10001 for a Ray client server, or auto.")
    return host.strip("[]"), int(port)


def check_address(address: str, timeout: float = 5.0) -> None:
    target = parse_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"Cannot reach the Ray cluster at {address} ({reason}). Start one with `ray start --head --node-ip-address=127.0.0.1 "
            f"--port=6379` and pass the address it prints, check the host and port, or drop --ray-address to let wsss-bench start "
            "a local Ray cluster on 127.0.0.1 for this sweep."
        ) from None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _pin_loopback() -> None:
    """Make Ray keep 127.0.0.1 as this node's address. Ray replaces a loopback
    ``node_ip_address`` by the machine's routable IP unless its "single-machine" switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ray is imported) is off; the variable
    also reaches the workers the local cluster starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported before: apply the same switch
        constants.ENABLE_RAY_CLUSTER = False


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (bool(path) and os.path.isfile(path)) or \
        os.path.isfile(os.path.join(os.path.expanduser("~"), ".ray", "auth_token"))


def _refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its config when imported; re-read it if ray already is
    (what Ray itself does when it turns token authentication on)."""
    import sys

    if "ray" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")


def connect(address: str | None, num_cpus: int | None, num_gpus: int | None) -> bool:
    """Join or start a cluster; returns True when this call started it (then shut it down)."""
    target = parse_address(address) if address else None
    if address is None or (target is not None and target[0] in LOOPBACK):
        _pin_loopback()
    if address and "RAY_AUTH_MODE" not in os.environ and _token_available():
        # Ray clusters started where a token exists require it, but a client joining them
        # only sends it in token mode; a token sent to a cluster without auth is ignored.
        os.environ["RAY_AUTH_MODE"] = "token"
    _refresh_ray_config()  # in case ray was imported before the environment said how to authenticate
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            check_address(address)
            ray.init(address=address, namespace="wsss-bench", logging_level="WARNING", log_to_driver=True,
                     configure_logging=True)
        else:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=100 * 1024 * 1024, namespace="wsss-bench", logging_level="WARNING")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - version mismatch, bad address type, authentication, ...
        try:
            ray.shutdown()  # a half-started local cluster (its GCS) must not outlive the failure
        except Exception:  # noqa: BLE001
            pass
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster on 127.0.0.1"
        hint = ""
        if address:
            hint = (" If the cluster uses token authentication (Ray's default when a token exists), give this machine its token: "
                    "RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token (`ray get-auth-token` prints it on the head node).")
        raise ConfigError(f"Could not connect to {where}: {type(exc).__name__}: {str(exc).strip()[:600]}.{hint}") from None
    return True


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def run_ray(tasks: list[dict[str, Any]], address: str | None, cpus_per_trial: float, gpus_per_trial: float, max_retries: int,
            num_cpus: int | None = None, num_gpus: int | None = None,
            on_start: Callable[[dict[str, Any]], None] | None = None,
            on_done: Callable[[dict[str, Any]], None] | None = None,
            poll: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run every task as a Ray task; returns trial_id -> outcome dict."""
    started = connect(address, num_cpus, num_gpus)  # before importing ray: it reads settings from the environment
    import ray
    from ray.exceptions import RayError, TaskCancelledError

    outcomes: dict[str, dict[str, Any]] = {}
    refs: dict[Any, dict[str, Any]] = {}
    try:
        resources = cluster_resources()
        if cpus_per_trial > resources.get("CPU", 0) or gpus_per_trial > resources.get("GPU", 0):
            raise ConfigError(f"Each trial asks for {cpus_per_trial:g} CPU(s) and {gpus_per_trial:g} GPU(s) but the Ray cluster has "
                              f"{resources.get('CPU', 0):g} CPU(s) and {resources.get('GPU', 0):g} GPU(s) in all: no trial could ever "
                              "be scheduled. Lower --cpus-per-trial / --gpus-per-trial, or add nodes to the cluster.")
        remote = ray.remote(_ray_trial)
        for task in tasks:
            task = dict(task, threads=max(1, int(cpus_per_trial)), submitted_at=time.time())
            ref = remote.options(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=max_retries, retry_exceptions=False,
                                 name=f"wsss-trial-{task['trial_id']}").remote(task)
            refs[ref] = task
            if on_start:
                on_start(task)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=2.0)
            for ref in ready:
                task = refs.pop(ref)
                try:
                    outcome = ray.get(ref)
                except TaskCancelledError:
                    outcome = {"state": "interrupted", "error": "cancelled"}
                except RayError as exc:  # the worker died (after max_retries): a system failure
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    outcome = {"state": "failed", "metrics": {}, "run_id": None, "resumed_from": None, "system_failure": True,
                               "error": f"Ray worker died ({type(exc).__name__}: {first[:300]}) after {max_retries} retr"
                                        f"{'y' if max_retries == 1 else 'ies'}; finished stages are kept and a re-run resumes the trial"}
                outcome.setdefault("trial_id", task["trial_id"])
                outcomes[task["trial_id"]] = outcome
                if on_done:
                    on_done(outcome)
            if poll:
                poll()
    except BaseException:
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        if started:
            ray.shutdown()
    return outcomes
