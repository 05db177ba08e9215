"""The SLURM backend: trials as submitit job arrays.

* Options map one to one onto sbatch: partition, account, qos, gpus per trial, cpus, memory,
  time, constraint, array parallelism, and extra ``#SBATCH`` lines (``--sbatch KEY=VALUE``,
  validated and handed to submitit's ``slurm_additional_parameters``, which quotes values).
  ``--slurm-setup`` lines run in the job script before the trial (e.g. ``module load cuda``).
* Submission returns at once (job ids are recorded in each trial's ``submission.json``);
  ``--wait`` follows the jobs to the end. ``wsss-bench status`` shows each trial's state from
  SLURM (``sacct``, falling back to ``squeue``), the trial's heartbeat file and MLflow.
* Preemption / timeout: SLURM sends ``USR2`` ``--signal-delay`` seconds before the end;
  submitit calls :meth:`TrialJob.checkpoint`, which resubmits the same job (``scontrol
  requeue``). A requeued job (by submitit, a preemption, or ``scontrol requeue``) runs the
  trial again, and the trial directory makes it resume at its last finished stage (and,
  within a stage, from the method's own checkpoint in ``work/<stage>/``).
* Arrays larger than the cluster's MaxArraySize are split; ``--trials-per-job K`` packs K
  short trials into one job (run one after another, each resumable on its own).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.errors import ConfigError

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "CONFIGURING",
                 "COMPLETING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT", "STOPPED"}
SETTLE_S = 15.0  # a job must look over for this long before it counts as over (requeue in flight)
_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_trial: int = 0
    cpus_per_trial: int = 1
    mem: str | None = None
    time: str | None = None
    constraint: str | None = None
    array_parallelism: int | None = None
    sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    max_timeouts: int = 3
    signal_delay_s: int = 120
    trials_per_job: int = 1
    job_name: str = "wsss-bench"

    def validate(self) -> dict[str, Any]:
        """Check every value; return submitit SlurmExecutor parameters."""
        params: dict[str, Any] = {"job_name": self.job_name, "nodes": 1, "ntasks_per_node": 1,
                                  "cpus_per_task": _positive(self.cpus_per_trial, "--cpus-per-trial"),
                                  "time": parse_time(self.time) if self.time else 60 * 24,
                                  "signal_delay_s": _positive(self.signal_delay_s, "--signal-delay"),
                                  "stderr_to_stdout": True}
        for name, value in (("partition", self.partition), ("account", self.account), ("qos", self.qos), ("constraint", self.constraint)):
            if value is not None:
                _check_text(value, f"--{name}")
                params[name] = value
        if self.gpus_per_trial:
            params["gpus_per_node"] = _positive(self.gpus_per_trial, "--gpus-per-trial")
        if self.mem is not None:
            params["mem"] = parse_mem(self.mem)
        if self.array_parallelism is not None:
            params["array_parallelism"] = _positive(self.array_parallelism, "--array-parallelism")
        extra = parse_sbatch_lines(self.sbatch)
        if extra:
            params["additional_parameters"] = extra
        if self.setup:
            for line in self.setup:
                if "\n" in line or "\r" in line or "\0" in line:
                    raise ConfigError(f"--slurm-setup {line!r}: one shell line per option (it contains a line break).")
            params["setup"] = list(self.setup)
        _positive(self.trials_per_job, "--trials-per-job")
        if self.max_timeouts < 0:
            raise ConfigError(f"--max-timeouts must be >= 0, got {self.max_timeouts}.")
        return params


def _positive(value: int, flag: str) -> int:
    if int(value) < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value}.")
    return int(value)


def _check_text(value: str, flag: str) -> None:
    if not value or any(c in value for c in "\n\r\0") or value != value.strip():
        raise ConfigError(f"{flag} {value!r}: expected one word / one line without surrounding spaces.")


def parse_time(text: str) -> int:
    """sbatch --time forms -> minutes: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    value = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ConfigError(f"--time {text!r}: use minutes (90), H:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00), as sbatch does.")
    days, a, b, c = match.groups()
    if days is not None:  # D-H[:M[:S]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + (1 if c and int(c) else 0)
    elif c is not None:  # H:M:S
        minutes = int(a) * 60 + int(b) + (1 if int(c) else 0)
    elif b is not None:  # M:S
        minutes = int(a) + (1 if int(b) else 0)
    else:
        minutes = int(a)
    if minutes < 1:
        raise ConfigError(f"--time {text!r} is shorter than a minute.")
    return minutes


def parse_mem(text: str) -> str:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--mem {text!r}: use a size such as 16G, 512M or 32000 (megabytes), as sbatch does.")
    number, unit = match.groups()
    unit = (unit or "M").upper()
    value = float(number)
    if unit == "K":
        value, unit = value / 1024, "M"
    if value != int(value):
        value, unit = value * 1024, {"T": "G", "G": "M", "M": "K"}[unit]
    return f"{int(value)}{unit}"


def parse_sbatch_lines(lines: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE``, ``--key=value``, ``#SBATCH --key=value`` or a bare ``--flag`` ->
    submitit additional parameters. Rejects anything that could escape its #SBATCH line."""
    out: dict[str, Any] = {}
    for raw in lines:
        line = raw.strip()
        if any(c in raw for c in "\n\r\0"):
            raise ConfigError(f"--sbatch {raw!r}: one option per --sbatch (it contains a line break).")
        if line.startswith("#SBATCH"):
            line = line[len("#SBATCH"):].strip()
        line = line.lstrip("-")
        key, sep, value = line.partition("=")
        if not sep and " " in key:
            key, _, value = key.partition(" ")
            sep = " "
        key = key.strip().replace("_", "-").lower()
        if not _KEY.match(key):
            raise ConfigError(f"--sbatch {raw!r}: expected KEY=VALUE with an sbatch option name (e.g. --sbatch mail-type=END, "
                              "--sbatch exclusive); see `man sbatch`.")
        if key in ("array", "output", "error", "wrap", "parsable", "signal", "open-mode"):
            raise ConfigError(f"--sbatch {key}: wsss-bench sets --{key} itself (job arrays, log files and the requeue signal); "
                              "use the dedicated options instead.")
        out[key.replace("-", "_")] = value.strip() if sep else True
    return out


# -- cluster checks ----------------------------------------------------------------------------------

def _slurm_cmd(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"--backend slurm needs the SLURM client commands, but `{name}` is not on PATH. Run wsss-bench on a "
                          "SLURM login node (or install slurm-client and point SLURM_CONF at the cluster's slurm.conf).")
    return path


def run_cmd(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([_slurm_cmd(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout)


def cluster_config() -> dict[str, str]:
    try:
        result = run_cmd(["scontrol", "show", "config"], timeout=30)
    except subprocess.TimeoutExpired:
        raise ConfigError("The SLURM controller did not answer `scontrol show config` within 30 s; is slurmctld up and SLURM_CONF right?") from None
    if result.returncode != 0:
        raise ConfigError(f"Cannot talk to the SLURM controller (`scontrol show config` failed: {_first_line(result.stderr)}). "
                          "Check that slurmctld is running and that SLURM_CONF points at the cluster's slurm.conf.")
    config = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    return config


def partitions() -> list[str]:
    result = run_cmd(["sinfo", "-h", "-o", "%P"])
    return [p.strip().rstrip("*") for p in result.stdout.split() if p.strip()]


def check_cluster(options: SlurmOptions) -> dict[str, str]:
    config = cluster_config()
    if options.partition is not None:
        known = partitions()
        if options.partition not in known:
            from harness.errors import suggest

            raise ConfigError(f"SLURM partition {options.partition!r} is unknown to this cluster ({config.get('ClusterName', '?')}).{suggest(options.partition, known)} "
                              f"Partitions: {', '.join(known) or '(none)'}; `sinfo` lists them with their limits.")
    return config


def _first_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


# -- the job ------------------------------------------------------------------------------------------

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # pragma: no cover - submitit is a dependency; keep `import` cheap errors clear
    submitit = None
    Checkpointable = object  # type: ignore[assignment,misc]


class TrialJob(Checkpointable):
    """The submitit callable: runs its trials (usually one) in the job, in order. On
    preemption / timeout, :meth:`checkpoint` hands submitit the same call to requeue; each
    trial then resumes from its trial directory."""

    def __call__(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from harness.backends.worker import run_trial

        env = submitit.JobEnvironment()
        return [run_trial(task, job_id=str(env.job_id)) for task in tasks]

    def checkpoint(self, tasks: list[dict[str, Any]]) -> "DelayedSubmission":
        return DelayedSubmission(self, tasks)


# -- submission ------------------------------------------------------------------------------------------

@dataclass
class Submitted:
    job_id: str
    tasks: list[dict[str, Any]]  # at least trial_id and submitted_at
    folder: Path
    job: Any = None  # the submitit Job when submitted by this process

    @property
    def log(self) -> Path:
        if self.job is not None:
            try:
                return Path(self.job.paths.stdout)
            except Exception:  # noqa: BLE001
                pass
        return self.folder / f"{self.job_id}_0_log.out"


def submit(tasks: list[dict[str, Any]], options: SlurmOptions, folder: Path) -> list[Submitted]:
    if submitit is None:
        raise ConfigError("--backend slurm needs the `submitit` package (pip install submitit).")
    params = options.validate()
    config = check_cluster(options)
    device = "cuda" if options.gpus_per_trial else "cpu"
    groups = [tasks[i:i + options.trials_per_job] for i in range(0, len(tasks), options.trials_per_job)]
    groups = [[dict(t, device=device, threads=options.cpus_per_trial) for t in group] for group in groups]
    max_array = max(1, int(config.get("MaxArraySize", "1001") or 1001) - 1)
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_timeouts, python=sys.executable)
    executor.update_parameters(**params)
    submitted: list[Submitted] = []
    try:
        for start in range(0, len(groups), max_array):
            chunk = groups[start:start + max_array]
            jobs = executor.map_array(TrialJob(), chunk)
            submitted += [Submitted(str(job.job_id), group, folder, job) for job, group in zip(jobs, chunk)]
    except submitit.core.utils.FailedJobError as exc:  # sbatch refused: its stderr is the message
        raise ConfigError(f"sbatch rejected the job array: {_first_line(str(exc))[:500]}. Check --partition / --account / --qos / "
                          "--gpus-per-trial / --mem / --time / --constraint / --sbatch against `sinfo` and "
                          "`sacctmgr show assoc user=$USER`.") from None
    return submitted


# -- job states ----------------------------------------------------------------------------------------

def _expand(job_id: str) -> list[str]:
    """'12_[0-3%2]' / '12_[1,4-5]' -> ['12_0', ...]; plain ids unchanged."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-%]+)\]", job_id)
    if not match:
        return [job_id]
    base, spec = match.groups()
    spec = spec.split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def job_states(job_ids: Iterable[str], timeout: float = 30) -> dict[str, str]:
    """job id -> SLURM state (e.g. RUNNING, COMPLETED, 'CANCELLED by 0' -> CANCELLED), from
    sacct, or squeue when accounting is unavailable (then jobs gone from the queue are
    absent: callers fall back on the trial's outcome / heartbeat files). Never raises."""
    ids = sorted({j for j in job_ids if j})
    if not ids:
        return {}
    states: dict[str, str] = {}
    try:
        result = run_cmd(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)], timeout=timeout)
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                jid, _, state = line.partition("|")
                for one in _expand(jid.strip()):
                    states[one] = state.split()[0] if state.strip() else "UNKNOWN"
            if all(j in states for j in ids):
                return {j: states[j] for j in ids}
    except (subprocess.TimeoutExpired, ConfigError, OSError):
        pass
    try:  # squeue knows live jobs even without accounting (and sacct may lag a new array)
        result = run_cmd(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(sorted({j.split("_")[0] for j in ids}))], timeout=timeout)
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                jid, _, state = line.partition("|")
                states[jid.strip()] = state.strip()
    except (subprocess.TimeoutExpired, ConfigError, OSError):
        pass
    return {j: states[j] for j in ids if j in states}


def cancel(job_ids: Iterable[str]) -> None:
    ids = sorted({j for j in job_ids if j})
    if ids:
        try:
            run_cmd(["scancel", *ids], timeout=30)
        except (subprocess.TimeoutExpired, ConfigError, OSError):
            pass


def wait_jobs(submitted: list[Submitted], results_dir: Path, on_done: Callable[[dict[str, Any]], None] | None = None,
              poll: Callable[[], None] | None = None, interval: float = 2.0) -> dict[str, dict[str, Any]]:
    """Follow jobs until each is over; returns trial_id -> outcome dict. The trial's own
    outcome.json (written by the worker) is the result; a job that ends without one (killed,
    out of memory, node failure) is a system failure with a pointer to its log."""
    from harness.backends.worker import OUTCOME, read_json, trial_root

    outcomes: dict[str, dict[str, Any]] = {}
    open_jobs = {s.job_id: s for s in submitted}
    over_since: dict[str, float] = {}
    while open_jobs:
        states = job_states(open_jobs)
        for job_id, sub in list(open_jobs.items()):
            state = states.get(job_id)
            if state in ACTIVE_STATES:
                over_since.pop(job_id, None)
                continue
            if state != "COMPLETED":  # unknown / failed / preempted / timed out: maybe a requeue in flight
                first = over_since.setdefault(job_id, time.monotonic())
                if time.monotonic() - first < (SETTLE_S if state else 2 * SETTLE_S):
                    continue
            for task in sub.tasks:
                tid = task["trial_id"]
                outcome = read_json(trial_root(results_dir, tid) / OUTCOME)
                if not outcome or (outcome.get("timing") or {}).get("submitted_at") != task.get("submitted_at"):
                    outcome = {"trial_id": tid, "state": "failed", "metrics": {}, "run_id": None, "resumed_from": None, "system_failure": True,
                               "error": f"SLURM job {job_id} ended ({state or 'gone from the queue'}) without a result for this trial; "
                                        f"log: {sub.log}. Finished stages are kept; run the same command again to resume."}
                outcomes[tid] = outcome
                if on_done:
                    on_done(outcome)
            del open_jobs[job_id]
        if poll:
            poll()
        if open_jobs:
            time.sleep(interval)
    return outcomes
