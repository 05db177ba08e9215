"""A real single-node SLURM cluster on 127.0.0.1 for the integration tests, built from the
Debian packages (slurmctld, slurmd, munge; slurmdbd + MariaDB so that ``sacct`` works).

Everything lives in one temporary directory: its own munge key and socket, its own MariaDB
data directory, its own ports, config files and spool / state / log directories, so the
machine's own services (if any) are never touched. ``SLURM_CONF`` points every client
command (``sbatch``, ``sacct``, submitit) at it.

Use it from a test module with ``pytest_plugins = ["tests.slurm_cluster"]`` (or by importing
the fixture) and mark the tests ``integration``. The fixture is session-scoped: one cluster
for the whole test session; it skips with the reason when a binary is missing (a laptop
without SLURM) and fails loudly when the binaries exist but the cluster does not come up.

Run it by hand to poke at it::

    python tests/slurm_cluster.py   # starts, prints `export SLURM_CONF=...`, waits for Ctrl-C
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db")
CLIENTS = ("sbatch", "sacct", "squeue", "scontrol", "sacctmgr", "sinfo", "scancel", "mariadb")


def missing_binaries() -> list[str]:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=search) is None]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin")
    assert found, name
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class ClusterError(RuntimeError):
    pass


@dataclass
class SlurmCluster:
    root: Path
    cluster_name: str = field(default_factory=lambda: f"wsss{os.getpid()}")
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    partition: str = "debug"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- layout -----------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    # -- start ------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "SlurmCluster":
        for sub in ("etc", "log", "munge", "db", "run", "spool/ctld", "spool/d", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname().split(".")[0]
        self.user = getpass.getuser()
        self.ports = {name: free_port() for name in ("mariadb", "dbd", "ctld", "d")}
        self.munge_socket = self.root / "munge" / "munge.sock"
        deadline = time.monotonic() + timeout
        try:
            self._start_munge(deadline)
            self._start_mariadb(deadline)
            self._write_configs()
            self._start_slurmdbd(deadline)
            self._run(["sacctmgr", "-i", "add", "cluster", self.cluster_name])
            self._start_daemon("slurmctld", [_which("slurmctld"), "-D", "-i"])
            self._wait(deadline, "slurmctld answers `scontrol ping`", lambda: "UP" in self._run(["scontrol", "ping"], check=False).stdout)
            self._start_daemon("slurmd", [_which("slurmd"), "-D", "-N", self.host])
            self._wait(deadline, "the node becomes idle", self._node_idle)
        except BaseException as exc:
            logs = self.logs_tail()
            self.stop()
            raise ClusterError(f"SLURM test cluster did not come up in {self.root} ({exc}):\n{logs}") from None
        return self

    def _start_daemon(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        handle = open(self.log(name + ".out"), "ab")
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, **kwargs)
        handle.close()
        self.procs[name] = proc
        return proc

    def _wait(self, deadline: float, what: str, probe) -> None:
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with code {proc.returncode} while waiting until {what}")
            if probe():
                return
            time.sleep(0.3)
        raise ClusterError(f"timed out waiting until {what}")

    def _run(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [_which(argv[0]), *argv[1:]]
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
        return result

    def _start_munge(self, deadline: float) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        os.chmod(self.root / "munge", 0o755)
        self._start_daemon("munged", [
            _which("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            f"--log-file={self.log('munged')}",
        ])
        self._wait(deadline, "munged listens", self.munge_socket.exists)

    def _start_mariadb(self, deadline: float) -> None:
        datadir = self.root / "db" / "data"
        self.db_socket = self.root / "db" / "mysql.sock"
        result = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", f"--user={self.user}",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            capture_output=True, text=True, timeout=300,
        )
        if result.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed: {result.stderr.strip()[-2000:]}")
        self._start_daemon("mariadbd", [
            _which("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--user={self.user}",
            "--bind-address=127.0.0.1", f"--port={self.ports['mariadb']}", f"--socket={self.db_socket}",
            f"--pid-file={self.root / 'db' / 'mariadbd.pid'}", f"--log-error={self.log('mariadbd')}",
            "--skip-name-resolve", "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
            "--performance-schema=OFF",
        ])
        self._wait(deadline, "MariaDB listens", lambda: _port_open(self.ports["mariadb"]))
        self.db_password = os.urandom(12).hex()
        sql = (
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}';"
            f"CREATE USER 'slurm'@'localhost' IDENTIFIED BY '{self.db_password}';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
            "FLUSH PRIVILEGES;"
        )
        result = subprocess.run([_which("mariadb"), "--no-defaults", f"--socket={self.db_socket}", "-u", "root", "-e", sql],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise ClusterError(f"creating the slurm database user failed: {result.stderr.strip()}")

    def _write_configs(self) -> None:
        r = self.root
        common = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\nSlurmUser={self.user}\n"
        memory = max(1024, int(_real_memory_mb() * 0.8))
        self.conf.write_text(
            f"ClusterName={self.cluster_name}\n"
            f"SlurmctldHost={self.host}(127.0.0.1)\n"
            f"SlurmctldPort={self.ports['ctld']}\nSlurmdPort={self.ports['d']}\n"
            + common +
            f"SlurmdUser={self.user}\n"
            "CryptoType=crypto/munge\nMpiDefault=none\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2\n"
            "SchedulerType=sched/backfill\nSchedulerParameters=sched_interval=2,bf_interval=2\n"
            "JobRequeue=1\nKillWait=5\nMinJobAge=600\nInactiveLimit=0\nMessageTimeout=30\nSlurmdTimeout=120\n"
            "MailProg=/bin/true\nJobCompType=jobcomp/none\n"
            "AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={self.ports['dbd']}\nAccountingStoragePass={self.munge_socket}\n"
            "JobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=30\n"
            f"StateSaveLocation={r / 'spool' / 'ctld'}\nSlurmdSpoolDir={r / 'spool' / 'd'}\n"
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}\nSlurmdPidFile={r / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.log('slurmctld')}\nSlurmdLogFile={self.log('slurmd')}\n"
            "SlurmctldDebug=info\nSlurmdDebug=info\n"
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN\n"
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )
        dbd = self.conf.with_name("slurmdbd.conf")
        dbd.write_text(
            common
            + f"DbdAddr=127.0.0.1\nDbdHost=localhost\nDbdPort={self.ports['dbd']}\n"
            f"PidFile={r / 'run' / 'slurmdbd.pid'}\nLogFile={self.log('slurmdbd')}\nDebugLevel=info\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={self.ports['mariadb']}\nStorageUser=slurm\nStoragePass={self.db_password}\nStorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)

    def _start_slurmdbd(self, deadline: float) -> None:
        self._start_daemon("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait(deadline, "slurmdbd listens", lambda: _port_open(self.ports["dbd"]))

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-o", "%T"], check=False).stdout.split()
        return "idle" in out

    # -- helpers for tests --------------------------------------------------------------------
    def sacct_state(self, job_id: str) -> str:
        out = self._run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], check=False).stdout.split()
        return out[-1] if out else ""

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run(list(argv), check=check)

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            # cancel whatever the tests left behind, so no job outlives the cluster
            subprocess.run([_which("scancel"), "--full", "-u", getattr(self, "user", getpass.getuser())], env=self.env,
                           capture_output=True, timeout=30, check=False)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # job steps run in their own sessions: kill any left over from this cluster
        _kill_job_leftovers(self.root)


def _real_memory_mb() -> int:
    try:
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        for token in out.split():
            if token.startswith("RealMemory="):
                return int(token.split("=", 1)[1])
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return 1024


def _kill_job_leftovers(root: Path) -> None:
    """Processes whose environment names this cluster's config (job steps, submitit workers)."""
    marker = f"SLURM_CONF={root / 'etc' / 'slurm.conf'}".encode()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            if marker in (pid_dir / "environ").read_bytes().split(b"\0"):
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def start_cluster() -> SlurmCluster:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM integration tests need the Debian packages slurmctld slurmd slurm-client slurmdbd munge "
                    f"mariadb-server (run .ci/system-packages); missing here: {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM test cluster needs root (slurmd launches job steps as the submitting user)")
    root = Path(tempfile.mkdtemp(prefix="wsss-slurm-"))
    return SlurmCluster(root).start()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM cluster with accounting; SLURM_CONF set for the session."""
    cluster = start_cluster()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="wsss-slurm-")))
    started = time.monotonic()
    cluster.start()
    print(f"SLURM up in {time.monotonic() - started:.1f}s\nexport SLURM_CONF={cluster.conf}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
