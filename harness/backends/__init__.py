"""Execution backends: where a sweep's trials run. This package face is the registry of
backends (:data:`BACKENDS`) and their options (:class:`BackendOptions`, with the flags each
backend alone accepts); the backend modules only submit trials and watch them:

=====================  =====================================================================
``local``              this process, or a pool of N device-pinned worker processes
``ray_backend``        one Ray task per trial
``slurm``              submitit job arrays
``worker``             the one function every backend ends in (:func:`worker.run_trial`,
                       which calls :func:`harness.sweep.execute_trial`), its lock, heartbeat
                       and outcome files
``status``             what is queued or running, for ``wsss-bench status``
``orchestration``      the sweep around them: skip finished, pre-flight, tracking server,
                       progress (:func:`run_sweep`, what ``wsss-bench run`` calls)
=====================  =====================================================================

Every backend writes to the same MLflow experiment, so results do not depend on the backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError

BACKENDS: dict[str, str] = {
    "local": "in this process, or a pool of --max-parallel worker processes with one device slot each",
    "ray": "one Ray task per trial on a local (127.0.0.1) or existing (--ray-address) Ray cluster",
    "slurm": "submitit job arrays on a SLURM cluster; requeue on preemption / timeout resumes trials",
}

_ONLY = {
    "local": ("max_parallel", "devices"),
    "ray": ("ray_address", "ray_max_retries", "ray_num_cpus"),
    "slurm": ("partition", "account", "qos", "mem", "time", "constraint", "array_parallelism", "sbatch", "slurm_setup",
              "max_timeouts", "signal_delay", "trials_per_job", "wait"),
}


def plugin_list() -> tuple[str, ...]:
    """``WSSS_PLUGINS``: extra modules (names or .py paths, separated by ``os.pathsep``) that
    register methods outside methods/ - private methods, test and benchmark doubles. The
    driver and every worker import them."""
    items = [p.strip() for p in os.environ.get("WSSS_PLUGINS", "").split(os.pathsep) if p.strip()]
    return tuple(str(Path(p).resolve()) if p.endswith(".py") else p for p in items)


@dataclass
class BackendOptions:
    backend: str = "local"
    max_parallel: int = 1
    devices: list[str] | None = None
    cpus_per_trial: int | None = None
    gpus_per_trial: int | None = None
    ray_address: str | None = None
    ray_max_retries: int = 2
    ray_num_cpus: int | None = None
    slurm: Any = None  # slurm.SlurmOptions
    wait: bool = False
    plugins: tuple[str, ...] = ()  # extra method modules workers import (tests, benchmarks)

    @classmethod
    def from_args(cls, args) -> "BackendOptions":
        """From the CLI namespace; options of another backend are an error, not ignored."""
        backend = getattr(args, "backend", None) or "local"
        if backend not in BACKENDS:
            from harness.errors import unknown

            raise unknown("backend", backend, BACKENDS)
        for other, names in _ONLY.items():
            if other == backend:
                continue
            for name in names:
                value = getattr(args, name, None)
                if value not in (None, False, []):
                    flag = "--" + name.replace("_", "-")
                    raise ConfigError(f"{flag} applies to --backend {other} only; this sweep runs on --backend {backend}. "
                                      f"Drop {flag} or pass --backend {other}.")
        for name in ("cpus_per_trial", "gpus_per_trial", "max_parallel", "ray_num_cpus"):
            value = getattr(args, name, None)
            if value is not None and value < (1 if name != "gpus_per_trial" else 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'gpus_per_trial' else 'a positive integer'}, got {value}.")
        plugins = plugin_list()
        if plugins:
            from harness.backends.worker import load_plugins

            try:
                load_plugins(plugins)  # registers their methods here, before the sweep is planned
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"WSSS_PLUGINS: cannot import {', '.join(plugins)}: {type(exc).__name__}: {exc}") from None
        options = cls(backend=backend, max_parallel=getattr(args, "max_parallel", None) or 1, plugins=plugins,
                      devices=[d.strip() for d in args.devices.split(",") if d.strip()] if getattr(args, "devices", None) else None,
                      cpus_per_trial=getattr(args, "cpus_per_trial", None), gpus_per_trial=getattr(args, "gpus_per_trial", None),
                      ray_address=getattr(args, "ray_address", None), ray_num_cpus=getattr(args, "ray_num_cpus", None),
                      wait=bool(getattr(args, "wait", False)))
        if getattr(args, "ray_max_retries", None) is not None:
            if args.ray_max_retries < 0:
                raise ConfigError(f"--ray-max-retries must be >= 0, got {args.ray_max_retries}.")
            options.ray_max_retries = args.ray_max_retries
        if backend == "local" and options.max_parallel > 1:
            from harness.backends.local import plan_slots

            plan_slots(options.max_parallel, getattr(args, "device", None) or "cpu", options.devices, options.gpus_per_trial,
                       options.cpus_per_trial)
        if backend == "ray" and options.ray_address and not getattr(args, "dry_run", False):
            from harness.backends.ray_backend import check_address

            check_address(options.ray_address)  # seconds, not after planning and a server start
        if backend == "slurm":
            from harness.backends.slurm import SlurmOptions

            slurm = SlurmOptions(partition=args.partition, account=args.account, qos=args.qos, mem=args.mem, time=args.time,
                                 constraint=args.constraint, array_parallelism=args.array_parallelism,
                                 sbatch=list(args.sbatch or []), setup=list(args.slurm_setup or []),
                                 cpus_per_trial=options.cpus_per_trial or 1, gpus_per_trial=options.gpus_per_trial or 0)
            for name, attr in (("max_timeouts", "max_timeouts"), ("signal_delay", "signal_delay_s"), ("trials_per_job", "trials_per_job")):
                if getattr(args, name, None) is not None:
                    setattr(slurm, attr, getattr(args, name))
            slurm.validate()
            options.slurm = slurm
        return options

    def preflight(self, device: str = "cpu") -> None:
        """Cheap checks before anything is started or submitted: a device pool that would
        share a GPU, a Ray address that does not answer, a SLURM controller or partition
        that does not exist."""
        if self.backend == "local" and self.max_parallel > 1:
            from harness.backends.local import plan_slots

            plan_slots(self.max_parallel, device, self.devices, self.gpus_per_trial, self.cpus_per_trial)
        elif self.backend == "ray" and self.ray_address:
            from harness.backends.ray_backend import check_address

            check_address(self.ray_address)
        elif self.backend == "slurm":
            from harness.backends.slurm import check_cluster

            check_cluster(self.slurm)

    @property
    def parallel_writers(self) -> bool:
        return self.backend in ("ray", "slurm") or self.max_parallel > 1


# The sweep orchestration lives in harness/backends/orchestration.py; its entry points are
# re-exported here for callers of the face (harness/cli.py, benchmarks, tests).
from harness.backends.orchestration import SweepResult, dry_run_states, record_system_failure, run_sweep  # noqa: E402

__all__ = ["BACKENDS", "BackendOptions", "SweepResult", "dry_run_states", "plugin_list", "record_system_failure", "run_sweep"]
