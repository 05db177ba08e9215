"""An MLflow tracking server for parallel workers: ``mlflow server`` on 127.0.0.1 and a free
port, over the results directory's SQLite store, with an artifact root in the results dir.

Why: several processes writing one SQLite file hit "database is locked" and may run schema
migrations concurrently. With a server, the server is the only process that opens the
database and every worker (local pool, Ray task, SLURM job) logs over HTTP through
``MlflowClient``; the driver creates the database and the experiment before it starts.

The server runs under a small supervisor (``python -m harness.mlflow_server``), the leader of
its own process group, so stopping it takes every process ``mlflow server`` spawns with it:

* attached (default): the supervisor holds the read end of a pipe whose write end only the
  driver holds; when the driver exits for any reason (``kill -9`` included) the pipe closes
  and the supervisor stops the server. Nothing outlives the sweep.
* detached (``wsss-bench run --backend slurm`` without ``--wait``): the server must outlive
  the driver so queued jobs can log when they run. Its address is recorded in
  ``<results>/.mlflow-server.json``; later commands on the same results directory reuse it,
  and ``wsss-bench status --stop-server`` stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.errors import TrackingError

INFO_FILE = ".mlflow-server.json"
START_TIMEOUT_S = float(os.environ.get("WSSS_MLFLOW_SERVER_TIMEOUT", "300"))


def health(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class TrackingServer:
    uri: str
    port: int
    pid: int  # the supervisor: leader of the server's process group
    backend_store_uri: str
    artifacts: str
    log_path: str
    detached: bool
    results_dir: str
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lifeline: int | None = None

    # -- info file ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def write_info(self) -> None:
        from harness.files import atomic_write_text

        atomic_write_text(Path(self.results_dir) / INFO_FILE, json.dumps(self.to_dict(), indent=2))

    def healthy(self) -> bool:
        return health(self.uri)

    # -- stop -------------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and every process it spawned; forget its info file."""
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._group_alive():
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.2)
        if self._group_alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        info = Path(self.results_dir) / INFO_FILE
        try:
            if json.loads(info.read_text()).get("pid") == self.pid:
                info.unlink()
        except (OSError, ValueError):
            pass

    def _group_alive(self) -> bool:
        if self._proc is not None and self._proc.poll() is None:
            return True
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def __enter__(self) -> "TrackingServer":
        return self

    def __exit__(self, *exc) -> None:
        if not self.detached:
            self.stop()


def recorded_server(results_dir: Path) -> TrackingServer | None:
    """The detached server recorded for this results directory, if it still answers."""
    try:
        data = json.loads((Path(results_dir) / INFO_FILE).read_text())
        server = TrackingServer(**data)
    except (OSError, ValueError, TypeError):
        return None
    if _pid_alive(server.pid) and server.healthy():
        return server
    return None


def start_server(results_dir: Path, backend_store_uri: str, detach: bool = False, timeout: float | None = None) -> TrackingServer:
    """Start ``mlflow server`` on 127.0.0.1:<free port> and wait until it answers /health."""
    results_dir = Path(results_dir).resolve()
    artifacts = results_dir / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = results_dir / "logs" / "mlflow-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timeout = START_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        argv = [sys.executable, "-m", "harness.mlflow_server", "--port", str(port), "--backend-store-uri", backend_store_uri,
                "--artifacts", str(artifacts)]
        read_end = write_end = None
        if not detach:
            read_end, write_end = os.pipe()
            argv += ["--lifeline-fd", str(read_end)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    pass_fds=(read_end,) if read_end is not None else (), cwd=str(results_dir))
        if read_end is not None:
            os.close(read_end)
        server = TrackingServer(f"http://127.0.0.1:{port}", port, proc.pid, backend_store_uri, str(artifacts), str(log_path), detach, str(results_dir))
        server._proc, server._lifeline = proc, write_end
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_error = _tail(log_path)
                break
            if server.healthy():
                server.write_info()
                return server
            time.sleep(0.25)
        else:
            server.stop()
            raise TrackingError(f"The MLflow tracking server (port {port}, store {backend_store_uri}) did not answer within {timeout:.0f}s. "
                                f"Its log: {log_path}. On a busy machine raise WSSS_MLFLOW_SERVER_TIMEOUT (seconds).")
        server.stop()
    raise TrackingError(f"The MLflow tracking server failed to start (store {backend_store_uri}); see {log_path}:\n{last_error}")


def ensure_server(results_dir: Path, backend_store_uri: str, detach: bool = False) -> tuple[TrackingServer, bool]:
    """Reuse the results directory's detached server (same store) or start one.
    Returns (server, started_here)."""
    existing = recorded_server(results_dir)
    if existing is not None and existing.detached and existing.backend_store_uri == backend_store_uri:
        return existing, False
    return start_server(results_dir, backend_store_uri, detach=detach), True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- the supervisor (runs as `python -m harness.mlflow_server`) ---------------------------------

def _supervise(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job runners: nothing to leak
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1",
            "--backend-store-uri", args.backend_store_uri, "--artifacts-destination", args.artifacts]
    child = subprocess.Popen(argv, env=env)
    stopping = threading.Event()

    def shutdown(*_):
        if stopping.is_set():
            return
        stopping.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            os.killpg(0, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(0, signal.SIGKILL)  # whatever is left, this supervisor included

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    if args.lifeline_fd is not None:
        def watch() -> None:
            while True:
                try:
                    if not os.read(args.lifeline_fd, 1):
                        break
                except InterruptedError:
                    continue
                except OSError:
                    break
            os.kill(os.getpid(), signal.SIGTERM)  # the driver is gone

        threading.Thread(target=watch, daemon=True).start()
    code = child.wait()
    if not stopping.is_set():
        shutdown()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Supervise one `mlflow server` bound to 127.0.0.1 (used by wsss-bench).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-store-uri", required=True)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--lifeline-fd", type=int)
    return _supervise(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
