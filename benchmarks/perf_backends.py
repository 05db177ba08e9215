"""Execution-backend overhead and parallel speed-up (not a test).

1. Scheduling overhead on each backend, over 20 no-op trials (method ``noop``, registered
   below and nowhere else: its stages do nothing, the runner still evaluates 2 tiny images):

   * submit -> 1st stage: from the moment the backend got the trial (task created / Ray
     task submitted / job array submitted) to the start of its first stage. Reported for the
     first trial (a cold start: worker processes, imports, scheduler) and as median / p90
     over all 20 (these include queueing behind the other trials);
   * amortised per trial: (makespan x parallel slots - time spent in stages) / trials, and
     the same "warm" (from the first stage start to the last trial done: no cold start);
   * result -> MLflow: from the end of the last stage to the MLflow run marked finished
     (metrics, artifacts, status through the tracking server), median;
   * MLflow -> driver: from that to the driver seeing the outcome, median.

   Start-up costs paid once per sweep (tracking server, Ray cluster) are reported apart.

2. Speed-up of 4 CPU-bound trials (method ``burn``: a fixed amount of single-threaded
   matrix products in train_cam) on 2 parallel workers against the same 4 run serially in
   one process, each trial on one thread. Target >= 1.8x on 2 cores: it only holds when
   nothing else uses the cores; the load average is printed with the numbers, and so is
   the machine's own limit: the same kernel in 2 bare processes side by side (no harness).

    python benchmarks/perf_backends.py                       # local, local pool, ray (+ slurm if installed)
    python benchmarks/perf_backends.py --backends local,ray --trials 20 --json perf.json
    python benchmarks/perf_backends.py --slurm-conf /etc/slurm/slurm.conf   # an existing cluster

Without ``--slurm-conf`` the SLURM rows use a throwaway single-node cluster (the test
fixture in tests/slurm_cluster.py, needs root and the Debian packages); skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from methods.base import DatasetInfo, Method, MethodConfig, register  # noqa: E402

HERE = str(Path(__file__).resolve())


# -- the benchmark's own methods (workers import this file as a plugin: WSSS_PLUGINS) ----------

@dataclass
class NoopConfig(MethodConfig):
    work: int = 0  # matrix products of 256 x 256 in train_cam (0: a no-op trial)


@register
class Noop(Method):
    """Does nothing in every stage: what remains of a trial is the harness's own cost."""

    name = "noop"
    Config = NoopConfig

    def __init__(self, config: NoopConfig, dataset: DatasetInfo, device: torch.device) -> None:
        super().__init__(config, dataset, device)

    def train_cam(self, train, ctx) -> None:
        if self.config.work:
            gen = torch.Generator().manual_seed(ctx.seed)
            a = torch.rand(256, 256, generator=gen)
            b = torch.rand(256, 256, generator=gen)
            for i in range(self.config.work):
                a = torch.tanh(a @ b)
                if i % 50 == 0:
                    ctx.progress(i, self.config.work)

    def cams(self, images, labels):
        B, _, H, W = images.shape
        return torch.zeros(B, self.dataset.num_classes, H, W)

    def pseudo_masks(self, images, cams, labels):
        B, _, H, W = images.shape
        return torch.zeros(B, H, W, dtype=torch.int64)

    def train_seg(self, train, ctx) -> None:
        pass

    def segment(self, images, multiscale=False):
        B, _, H, W = images.shape
        return torch.zeros(B, self.dataset.num_classes + 1, H, W)

    def networks(self):
        return {}


@register
class Burn(Noop):
    """CPU-bound: ``work`` single-threaded matrix products, nothing else."""

    name = "burn"


TINY = ["dataset.num_train=2", "dataset.num_val=2", "dataset.image_size=48", "eval.multiscale=false", "eval.crf=false",
        "eval.threshold_step=0.1", "eval.gallery_size=0"]


# -- measuring -----------------------------------------------------------------------------------

def plan(method: str, seeds: list[int], results: Path, extra: list[str]):
    from harness.config import load_suite, parse_overrides
    from harness.sweep import plan_trials

    return plan_trials(load_suite("synthetic"), [method], seeds, parse_overrides(TINY + extra), None, results / "cache")


def options(backend: str, parallel: int, **kw):
    from harness.backends import BackendOptions

    opts = BackendOptions(backend=backend, max_parallel=parallel if backend == "local" else 1, cpus_per_trial=1, gpus_per_trial=0,
                          plugins=(HERE,), **kw)
    if backend == "slurm":
        from harness.backends.slurm import SlurmOptions

        opts.slurm = SlurmOptions(cpus_per_trial=1, time="30")
        opts.wait = True
    return opts


def run(specs, results: Path, opts) -> dict:
    """Run a sweep through the harness API; per-trial timings from the worker files + MLflow."""
    from mlflow.tracking import MlflowClient

    from harness.backends import run_sweep
    from harness.sweep import sweep_key
    from harness.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri(results)
    tracker = Tracker(uri, specs[0].suite)
    parent = tracker.sweep_run(sweep_key(specs), "perf_backends")
    seen: dict[str, float] = {}
    start = time.time()
    swept = run_sweep(specs, results, uri, opts, "cpu", False, parent, None,
                      on_outcome=lambda o: seen.__setitem__(o.spec.trial_id, time.time()), log=lambda text: None)
    makespan = max(seen.values(), default=time.time()) - start  # to the last outcome, not the teardown
    failed = [o for o in swept.outcomes if o.state != "finished"]
    if failed:
        raise SystemExit(f"{len(failed)} trial(s) did not finish: {failed[0].state} {failed[0].error}")
    client = MlflowClient(uri)
    rows = []
    for spec in specs:
        root = results / "trials" / spec.trial_id
        outcome = json.loads((root / "outcome.json").read_text())
        state = json.loads((root / "state.json").read_text())["stages"]
        timing = outcome["timing"]
        run_info = client.get_run(outcome["run_id"]).info
        in_stages = sum(s["wall_s"] for s in state.values())
        last_end = timing["last_stage_at"] + state["segment"]["wall_s"]
        rows.append({
            "submit_to_first_stage_s": timing["first_stage_at"] - timing["submitted_at"],
            "result_to_mlflow_s": run_info.end_time / 1000 - last_end,
            "mlflow_to_driver_s": seen[spec.trial_id] - run_info.end_time / 1000,
            "in_stages_s": in_stages,
            "submitted_at": timing["submitted_at"],
            "first_stage_at": timing["first_stage_at"],
            "done_at": timing["done_at"],
        })
    # once workers run: from the first stage anywhere to the last trial done (no cold start)
    warm = max(r["done_at"] for r in rows) - min(r["first_stage_at"] for r in rows)
    return {"makespan_s": makespan, "warm_s": warm, "rows": rows}


def summarise(name: str, result: dict, slots: int) -> dict:
    rows = sorted(result["rows"], key=lambda r: r["submitted_at"])
    first = min(rows, key=lambda r: r["submitted_at"] + r["submit_to_first_stage_s"])
    lat = sorted(r["submit_to_first_stage_s"] for r in rows)
    work = sum(r["in_stages_s"] for r in rows)
    return {
        "backend": name,
        "trials": len(rows),
        "slots": slots,
        "makespan_s": round(result["makespan_s"], 2),
        "cold_submit_to_first_stage_s": round(first["submit_to_first_stage_s"], 2),
        "median_submit_to_first_stage_s": round(statistics.median(lat), 2),
        "p90_submit_to_first_stage_s": round(lat[int(0.9 * (len(lat) - 1))], 2),
        "amortised_overhead_per_trial_s": round((result["makespan_s"] * slots - work) / len(rows), 3),
        "warm_overhead_per_trial_s": round((result["warm_s"] * slots - work) / len(rows), 3),
        "median_result_to_mlflow_s": round(statistics.median(r["result_to_mlflow_s"] for r in rows), 3),
        "median_mlflow_to_driver_s": round(statistics.median(r["mlflow_to_driver_s"] for r in rows), 3),
        "mean_in_stages_s": round(work / len(rows), 3),
    }


_KERNEL = ("import sys, time, torch\ntorch.set_num_threads(1)\ng = torch.Generator().manual_seed(0)\n"
           "a, b = torch.rand(256, 256, generator=g), torch.rand(256, 256, generator=g)\nt = time.time()\n"
           "for _ in range(int(sys.argv[1])):\n    a = torch.tanh(a @ b)\nprint(time.time() - t)\n")


def raw_scaling(work: int) -> dict:
    """The machine's own limit: the burn kernel in 1 bare process, then in 2 at once (no
    harness). On a shared machine this is what 2 workers can get at best."""
    import subprocess

    def bare(n: int) -> float:
        start = time.time()
        procs = [subprocess.Popen([sys.executable, "-c", _KERNEL, str(work)], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        kernel = max(float(p.communicate()[0]) for p in procs)
        return kernel

    one = bare(1)
    two = bare(2)
    return {"one_process_s": round(one, 2), "two_processes_s": round(two, 2), "speedup": round(2 * one / two, 2)}


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# -- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="local,pool,ray,slurm", help="comma-separated: local, pool (local --max-parallel 2), ray, slurm")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--burn-work", type=int, default=12000, help="matrix products per CPU-bound trial")
    parser.add_argument("--speedup-backends", default="pool,ray", help="backends whose 2-worker speed-up is measured")
    parser.add_argument("--slurm-conf", help="an existing cluster's slurm.conf (default: a throwaway local cluster)")
    parser.add_argument("--results", help="results directory (default: a temp dir)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    os.environ["WSSS_PLUGINS"] = HERE
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    base = Path(args.results or tempfile.mkdtemp(prefix="perf-backends-")).resolve()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    speed = [b.strip() for b in args.speedup_backends.split(",") if b.strip()]
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                "load_before": loadavg()}, "overhead": [], "speedup": [], "startup": {}}
    print(f"# perf_backends on {platform.node()} ({os.cpu_count()} CPUs), load average {loadavg()}; results in {base}", flush=True)

    cluster = None
    try:
        if "slurm" in wanted or "slurm" in speed:
            cluster = _slurm(args.slurm_conf, report)
            if cluster is False:
                wanted = [b for b in wanted if b != "slurm"]
                speed = [b for b in speed if b != "slurm"]
        if "ray" in wanted or "ray" in speed:
            from harness.backends.ray_backend import connect

            if "RAY_AUTH_TOKEN_PATH" not in os.environ:  # Ray's token authentication, with a token of our own
                import secrets

                token = base / "ray_auth_token"
                token.parent.mkdir(parents=True, exist_ok=True)
                token.write_text(secrets.token_hex(32))
                os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
            t = time.time()
            connect(None, 2, 0)  # the cluster the ray backend would start, started once here
            report["startup"]["ray_local_cluster_s"] = round(time.time() - t, 2)
        for name in wanted:
            results = base / f"overhead-{name}"
            specs = plan("noop", list(range(args.trials)), results, [])
            backend, parallel = ("local", 2) if name == "pool" else (name, 1)
            slots = 2 if name in ("pool", "ray", "slurm") else 1
            _server(results, backend, parallel, report, name)
            result = run(specs, results, options(backend, parallel))
            row = summarise(name, result, slots)
            report["overhead"].append(row)
            print(json.dumps(row), flush=True)
        if speed:
            report["raw_scaling"] = raw_scaling(args.burn_work)
            print(json.dumps({"raw_scaling": report["raw_scaling"]}), flush=True)
            results = base / "speedup-serial"
            specs = plan("burn", [0, 1, 2, 3], results, [f"burn.work={args.burn_work}"])
            load = loadavg()
            serial = run(specs, results, options("local", 1))
            for name in speed:
                results = base / f"speedup-{name}"
                specs = plan("burn", [0, 1, 2, 3], results, [f"burn.work={args.burn_work}"])
                backend, parallel = ("local", 2) if name == "pool" else (name, 1)
                _server(results, backend, parallel, report, f"speedup-{name}")
                par = run(specs, results, options(backend, parallel))
                row = {"backend": name, "serial_s": round(serial["makespan_s"], 2), "two_workers_s": round(par["makespan_s"], 2),
                       "speedup": round(serial["makespan_s"] / par["makespan_s"], 2),
                       "serial_warm_s": round(serial["warm_s"], 2), "two_workers_warm_s": round(par["warm_s"], 2),
                       "speedup_warm": round(serial["warm_s"] / par["warm_s"], 2),
                       "load_at_start": load, "load_at_end": loadavg()}
                report["speedup"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        if "ray_local_cluster_s" in report["startup"]:
            import ray

            ray.shutdown()
        for server in _SERVERS:
            server.stop()
        if cluster:
            cluster.stop()
    report["machine"]["load_after"] = loadavg()
    _print_tables(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


_SERVERS: list = []


def _server(results: Path, backend: str, parallel: int, report: dict, name: str) -> None:
    """Start the sweep's tracking server up front (detached, so run_sweep reuses it) and
    record its start-up time apart from the per-trial numbers."""
    if backend == "local" and parallel == 1:
        return
    from harness.mlflow_server import start_server
    from harness.tracking import Tracker, default_tracking_uri

    results.mkdir(parents=True, exist_ok=True)
    uri = default_tracking_uri(results)
    Tracker(uri, "synthetic")
    t = time.time()
    _SERVERS.append(start_server(results, uri, detach=True))
    report["startup"].setdefault("mlflow_server_s", []).append(round(time.time() - t, 2))


def _slurm(conf: str | None, report: dict):
    if conf:
        os.environ["SLURM_CONF"] = conf
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from slurm_cluster import SlurmCluster, missing_binaries
    except ImportError:
        print("# slurm: tests/slurm_cluster.py not found; skipped")
        return False
    missing = missing_binaries()
    if missing or os.geteuid() != 0:
        print(f"# slurm: skipped ({'missing ' + ', '.join(missing) if missing else 'the throwaway cluster needs root'})")
        return False
    t = time.time()
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="wsss-slurm-"))).start()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    report["startup"]["slurm_test_cluster_s"] = round(time.time() - t, 2)
    return cluster


def _print_tables(report: dict) -> None:
    print("\n## Scheduling overhead, no-op trials (seconds)\n")
    cols = ["backend", "trials", "slots", "makespan_s", "cold_submit_to_first_stage_s", "median_submit_to_first_stage_s",
            "p90_submit_to_first_stage_s", "amortised_overhead_per_trial_s", "warm_overhead_per_trial_s", "median_result_to_mlflow_s",
            "median_mlflow_to_driver_s", "mean_in_stages_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in report["overhead"]:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    print(f"\nOnce per sweep: {json.dumps(report['startup'])}")
    if report["speedup"]:
        print("\n## 4 CPU-bound trials: 2 parallel workers vs serial (one thread per trial)\n")
        print("End to end = the whole sweep call, worker start-up included; warm = first stage to last trial done.\n")
        print("| backend | serial (s) | 2 workers (s) | speed-up end to end | serial warm (s) | 2 workers warm (s) | speed-up warm | load avg at start | at end |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in report["speedup"]:
            print(f"| {row['backend']} | {row['serial_s']} | {row['two_workers_s']} | {row['speedup']}x | {row['serial_warm_s']} | "
                  f"{row['two_workers_warm_s']} | {row['speedup_warm']}x | {row['load_at_start']} | {row['load_at_end']} |")
    if "raw_scaling" in report:
        raw = report["raw_scaling"]
        print(f"\nThe machine's own 2-process scaling of the same kernel without the harness: {raw['speedup']}x "
              f"({raw['one_process_s']} s alone, {raw['two_processes_s']} s each side by side).")
    print(f"\nMachine: {report['machine']}")


if __name__ == "__main__":
    sys.exit(main())
