"""The leaderboard model: runs frame (harness/report/store.py) -> rows over seeds, paired
statistics, ranks and published references. No I/O and no formatting: the renderers
(markdown, html, plots, gallery, csv, terminal) read :class:`Leaderboard`.

Rules (tested in tests/test_report.py): only ``finished`` runs are averaged; code versions
and library environments are never averaged together; every statistic carries its n;
ranks share a number where the paired comparison cannot tell rows apart. The columns of
each frame are documented in harness/report/__init__.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from harness import stats
from harness.config import Suite
from harness.references import ORACLE_EPOCH_METRIC, REFERENCE_ALIASES, REFERENCE_METRICS, canonical_metric, comparability, parse_number
from harness.trial import STAGES


QUALITY_METRICS: tuple[str, ...] = (
    "cam_miou",
    "cam_miou_fixed",
    "cam_best_threshold",
    "cam_fixed_threshold",
    "mask_miou",
    "mask_miou_ignore255",
    "val_miou_ss",
    "val_miou_ms",
    "val_miou_ms_crf",
)

RANK_METRICS: tuple[str, ...] = ("cam_miou", "cam_miou_fixed", "mask_miou", "val_miou_ss", "val_miou_ms", "val_miou_ms_crf")

THRESHOLD_METRICS: tuple[str, ...] = ("cam_best_threshold", "cam_fixed_threshold")  # shown with 2 decimals

COST_STAGES: tuple[str, ...] = STAGES + ("total",)

TRAIN_STAGES: tuple[str, ...] = ("train_cam", "pseudo_masks", "train_seg")

PER_CLASS_WHATS: tuple[str, ...] = ("cam", "mask", "val_ss", "val_ms", "val_ms_crf")

RUN_METRICS: tuple[str, ...] = QUALITY_METRICS + ("cam_threshold_stop", "mask_ignored_pct", "mask_eval_images") + tuple(f"time_{s}_s" for s in COST_STAGES) + (
    "params_total", "gmacs_total")

REPORT_METRICS: tuple[str, ...] = QUALITY_METRICS + tuple(f"time_{s}_s" for s in COST_STAGES)

COST_METRICS: tuple[str, ...] = ("params_total", "gmacs_total")

METRIC_TITLES = {
    "cam_miou": "CAM mIoU (best t, oracle)",
    "cam_miou_fixed": "CAM mIoU (fixed t)",
    "cam_best_threshold": "oracle t",
    "cam_fixed_threshold": "fixed t",
    "mask_miou": "pseudo-mask mIoU (cam-eval)",
    "mask_miou_ignore255": "pseudo-mask mIoU (255 ignored)",
    "val_miou_ss": "val mIoU (SS)",
    "val_miou_ms": "val mIoU (MS+flip)",
    "val_miou_ms_crf": "val mIoU (MS+flip+CRF)",
}

SHORT_TITLES = {
    "cam_miou": "CAM* (oracle t)",
    "cam_miou_fixed": "CAM@t",
    "cam_best_threshold": "t*",
    "cam_fixed_threshold": "t",
    "mask_miou": "mask",
    "mask_miou_ignore255": "mask (255 ign.)",
    "val_miou_ss": "val SS",
    "val_miou_ms": "val MS",
    "val_miou_ms_crf": "val MS+CRF",
}

PER_CLASS_TITLES = {"cam": "CAM (oracle t)", "mask": "pseudo masks (train)", "val_ss": "val SS", "val_ms": "val MS+flip",
                    "val_ms_crf": "val MS+flip+CRF"}

PRIMARY_ORDER: tuple[str, ...] = ("val_miou_ms_crf", "val_miou_ms", "val_miou_ss", "mask_miou", "cam_miou")

@dataclass
class Leaderboard:
    table: pd.DataFrame  # one row per (suite, dataset, method, variant, code version)
    failed: pd.DataFrame  # failed / unfinished trials, shown separately, never averaged
    pairwise: pd.DataFrame = field(default_factory=pd.DataFrame)
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # every run, with its row label
    warnings: list[str] = field(default_factory=list)
    protocols: dict[tuple[str, str], str] = field(default_factory=dict)  # (suite, dataset) -> settings
    meta: dict[str, str] = field(default_factory=dict)
    # trivial baselines on the same splits (harness/report/baselines.py): one row per
    # (suite, dataset, baseline) with <m>_mean columns; empty when the data was not at hand
    baselines: pd.DataFrame = field(default_factory=pd.DataFrame)
    legends: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)  # (suite, dataset) -> [(tag, settings)]
    # (suite, dataset) -> [(method, settings)]: what all of a method's runs share that is not the suite's recipe
    departures: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.table.empty and self.failed.empty


def metric_bounds(metric: str) -> tuple[float, float]:
    """The range a quality metric cannot leave (its confidence interval is clipped to it):
    thresholds 0..1, mIoU / IoU 0..100 (%)."""
    return (0.0, 1.0) if metric in THRESHOLD_METRICS else (0.0, 100.0)


def _variant_labels(frame: pd.DataFrame) -> pd.Series:
    """A short label per distinct config of a method within a suite: '' when the method has
    one config there, else the params that differ between its configs."""
    labels = pd.Series("", index=frame.index, dtype=object)
    for _, group in frame.groupby(["suite", "dataset", "method"]):
        configs = group["config"].unique()
        if len(configs) < 2:
            continue
        parsed = {c: json.loads(c) for c in configs}
        keys = sorted({k for p in parsed.values() for k in p})
        differing = [k for k in keys if len({p.get(k) for p in parsed.values()}) > 1]
        for config, params in parsed.items():
            text = ",".join(f"{k.split('.', 1)[1]}={params.get(k, '-')}" for k in differing)
            labels[group.index[group["config"] == config]] = text
    return labels


def _code_flag(versions: set[str], version: str) -> str:
    if len(versions) > 1:
        return "mixed"
    if version == "unknown":
        return "unknown"
    if version.endswith("-dirty"):
        return "dirty"
    return ""


def _label(method: str, variant: str, version: str, mixed: bool) -> str:
    text = method
    if variant:
        text += f" [{variant}]"
    if mixed:
        # keep "-dirty": a clean and a dirty run of one code tree are different rows and need
        # different labels (plots and tables are keyed by label)
        base, dirty, _ = version.partition("-dirty")
        text += f" @{base[:12]}{dirty}"
    return text


def _pipeline_suffix(refine: str) -> str:
    """`` +IRN`` for a run whose pseudo masks came from the shared IRN stage (the runs
    frame's ``refine`` column), as the literature writes "+IRN": a reader must see it even
    where the method has no other configuration (no variant tag); '' otherwise."""
    return " +IRN" if refine == "irn" else ""


def _device_kind(hardware: str) -> str:
    return "cpu" if not hardware or hardware.startswith("cpu") else "gpu"


def _protocol_text(config: dict[str, str]) -> str:
    def get(key, default="?"):
        return config.get(key, default)

    parts = [
        f"averaging={get('eval.convention', 'present')}",
        f"CAM threshold sweep {get('eval.threshold_start')}..{get('eval.threshold_stop')} step {get('eval.threshold_step')}"
        " (widened by 0.1, up to 1.0, while the best threshold is at its end)",
        f"fixed t=the method's own, else {get('eval.fixed_threshold')}",
    ]
    splits = {k.split('.', 1)[1]: v for k, v in config.items() if k.startswith("splits.")}
    if splits:
        parts.append("splits " + ", ".join(f"{k}={v}" for k, v in sorted(splits.items())))
    else:
        parts.append("the dataset's default train / cam-eval / val splits")
    for key, what in (("eval.max_cam_eval", "cam-eval images"), ("eval.max_val", "val images")):
        if get(key, "0") not in ("0", "?"):
            parts.append(f"first {config[key]} {what} only")
    return "; ".join(parts)


def build_leaderboard(
    runs: pd.DataFrame,
    references: dict[str, dict[str, dict[str, Any]]] | None = None,
    expected_seeds: dict[str, Iterable[int]] | None = None,
    baselines: pd.DataFrame | None = None,
    recipes: dict[tuple[str, str], dict[str, str]] | None = None,
) -> Leaderboard:
    """Aggregate runs over seeds. ``references``: suite -> method -> metric -> published
    value (string entries such as ``source`` are notes); ``expected_seeds``: suite -> the
    seeds every method should have (the suite file's), besides those seen in the store;
    ``baselines``: the trivial-baseline frame of harness/report/baselines.py (kept as is);
    ``recipes``: (suite, method) -> the ``method.*`` / ``eval.*`` params of the suite's own
    recipe: the variant whose runs have them is marked "the suite's recipe" in the legend."""
    meta = {"tracking_uri": _display_uri(runs.attrs.get("tracking_uri", "")), "selection": runs.attrs.get("selection", "")}
    if runs.empty:
        return Leaderboard(pd.DataFrame(), pd.DataFrame(), meta=meta)
    runs = runs.copy().reset_index(drop=True)
    for column, default in (("config", "{}"), ("segmentation", "own"), ("code_version", "unknown"), ("hardware", ""),
                            ("error", ""), ("end_time", 0), ("start_time", 0), ("run_id", ""), ("experiment", ""),
                            ("env", ""), ("versions", ""), ("refine", "none")):
        if column not in runs:
            runs[column] = default
    runs["variant"] = _variant_labels(runs)
    warnings: list[str] = []

    # Code versions per (suite, dataset, method, variant): several -> separate, flagged rows.
    family = ["suite", "dataset", "method", "variant"]
    versions = runs.groupby(family)["code_version"].agg(lambda s: set(s))
    runs["code_flag"] = [_code_flag(versions[tuple(r[k] for k in family)], r["code_version"]) for _, r in runs.iterrows()]
    runs["label"] = [_label(r["method"], r["variant"], r["code_version"], r["code_flag"] == "mixed") + _pipeline_suffix(r["refine"])
                     for _, r in runs.iterrows()]
    for key, vs in versions.items():
        if len(vs) > 1:
            name = _label(key[2], key[3], "", False)
            warnings.append(f"{key[0]}/{key[1]}: **{name}** has runs from {len(vs)} code versions ({', '.join(sorted(vs))}); "
                            "they are shown as separate rows, never averaged together.")
    # Library environments per (family, code version): several -> separate rows, never averaged.
    runs[["env", "versions"]] = runs[["env", "versions"]].fillna("")  # NaN would drop out of the groupby below
    envs = runs.groupby(family + ["code_version"])["env"].agg(lambda s: set(s))
    several = [len(envs[tuple(r[k] for k in family + ["code_version"])]) > 1 for _, r in runs.iterrows()]
    runs["label"] = [label + (f" env:{env[:8] or 'unrecorded'}" if split else "")
                     for label, env, split in zip(runs["label"], runs["env"], several)]
    for key, es in envs.items():
        if len(es) > 1:
            warnings.append(f"{key[0]}/{key[1]}: **{_label(key[2], key[3], '', False)}** has runs on {len(es)} sets of library "
                            "versions; they are shown as separate rows (`env:<hash>`), never averaged together.")
    dirty = runs[runs["code_flag"] == "dirty"]
    if not dirty.empty:
        warnings.append("Runs from working trees with uncommitted changes (`-dirty`): " + ", ".join(sorted(set(dirty["label"]))) +
                        ". Their code cannot be recovered from the commit alone.")

    finished_mask = runs["status"] == "finished"
    # One finished run per (row, seed): duplicates (e.g. the same trial run against two data
    # roots, or two stores merged) keep the newest and are reported.
    finished = runs[finished_mask].sort_values("end_time")
    group_cols = family + ["code_version", "env"]
    dup = finished.duplicated(group_cols + ["seed"], keep="last")
    if dup.any():
        for _, r in finished[dup].iterrows():
            warnings.append(f"{r['suite']}/{r['dataset']}: {r['label']} seed {r['seed']} has more than one finished run; "
                            f"only the newest is averaged (ignored run {r['run_id']}).")
        finished = finished[~dup]
    not_finished = runs[~finished_mask]

    # Expected seeds per (suite, dataset): every seed any run there has, plus the suite's.
    expected: dict[tuple[str, str], set[int]] = {}
    for (suite, dataset), group in runs.groupby(["suite", "dataset"]):
        expected[(suite, dataset)] = set(int(s) for s in group["seed"]) | set(int(s) for s in (expected_seeds or {}).get(suite, []))

    rows: list[dict[str, Any]] = []
    per_seed: dict[str, dict[str, dict[int, float]]] = {}  # label key -> metric -> seed -> value
    per_class_rows: list[dict[str, Any]] = []
    row_keys: list[tuple] = []
    for key, group in runs.groupby(group_cols, sort=True):
        suite, dataset, method, variant, version, env = key
        done = finished[(finished[group_cols] == pd.Series(key, index=group_cols)).all(axis=1)].sort_values("seed")
        failed_here = not_finished[(not_finished[group_cols] == pd.Series(key, index=group_cols)).all(axis=1)]
        label = group["label"].iloc[0]
        seeds = [int(s) for s in done["seed"]]
        missing = sorted(expected[(suite, dataset)] - set(seeds))
        row: dict[str, Any] = {
            "suite": suite, "dataset": dataset, "method": method, "variant": variant,
            "segmentation": " ".join(sorted(set(group["segmentation"]))),
            "code_version": version, "code_flag": group["code_flag"].iloc[0], "label": label,
            "random_init": bool(group["random_init"].any()) if "random_init" in group else False,
            "n_seeds": len(seeds), "seeds": " ".join(map(str, seeds)),
            "missing_seeds": " ".join(map(str, missing)), "n_failed": len(failed_here),
            "env": env, "versions": "; ".join(sorted(set(group["versions"]) - {""})),
        }
        store: dict[str, dict[int, float]] = {}
        for metric in QUALITY_METRICS:
            values = {int(s): float(v) for s, v in zip(done["seed"], done[metric] if metric in done else [math.nan] * len(done))
                      if not pd.isna(v)}
            store[metric] = values
            summary = stats.summarize(values.values(), bounds=metric_bounds(metric))
            row[f"{metric}_n"] = summary.n
            row[f"{metric}_mean"] = summary.mean
            row[f"{metric}_std"] = summary.std
            row[f"{metric}_ci_low"] = summary.ci_low
            row[f"{metric}_ci_high"] = summary.ci_high
        per_seed[_row_key(row)] = store
        for metric in RANK_METRICS:
            row[f"rank_{metric}"] = math.nan  # filled below
        published = _references_for(references, suite, method)
        row_config = json.loads((done if len(done) else group)["config"].iloc[0])
        oracle_epoch = ORACLE_EPOCH_METRIC in done and bool(done[ORACLE_EPOCH_METRIC].notna().any())
        row.update(_reference_columns(published, method, row, row_config, oracle_epoch))
        row.update(_cost(done))
        row["hardware"] = "; ".join(sorted(h for h in set(done["hardware"]) if h))
        row["run_ids"] = " ".join(done["run_id"])
        rows.append(row)
        row_keys.append(key)
        per_class_rows += _per_class(done, row)
        at_edge = _oracle_threshold_at_sweep_end(done)
        best = {int(seed): float(t) for seed, t in zip(done["seed"], done["cam_best_threshold"]) if not pd.isna(t)} \
            if "cam_best_threshold" in done else {}
        all_background = [seed for seed in at_edge if best[seed] >= 1.0 - 1e-9]  # nothing left to widen
        past = [seed for seed in at_edge if seed not in all_background]
        if past:
            warnings.append(f"{suite}/{dataset}: **{label}**: the oracle CAM threshold is the sweep's upper end for seed(s) "
                            f"{' '.join(map(str, past))}; its CAM* may lie past the range (the sweep widens itself up to 1.00 since "
                            "the cam_threshold_stop metric exists; older runs: raise eval.threshold_stop).")
        if all_background:
            warnings.append(f"{suite}/{dataset}: **{label}**: the oracle CAM threshold is 1.00 for seed(s) "
                            f"{' '.join(map(str, all_background))}: every pixel background scores best, so its CAMs do no better "
                            "than the all-background baseline at any threshold.")
        every_pixel = sorted(seed for seed, t in best.items() if t <= 1e-9)  # every pixel its strongest present class
        if every_pixel:
            warnings.append(f"{suite}/{dataset}: **{label}**: the oracle CAM threshold is 0.00 for seed(s) "
                            f"{' '.join(map(str, every_pixel))}: labelling every pixel with a present class scores best, so its CAM* "
                            "measures the image labels, not localisation (compare the *image label everywhere* baseline).")
        if missing and seeds:
            failed_seeds = sorted(int(s) for s in failed_here["seed"])
            note = f" (failed or unfinished: {' '.join(map(str, failed_seeds))})" if failed_seeds else ""
            warnings.append(f"{suite}/{dataset}: **{label}** has n={len(seeds)} finished seed(s); missing seed(s) "
                            f"{' '.join(map(str, missing))}{note}. Its statistics use only the seeds it has.")
        elif not seeds:
            warnings.append(f"{suite}/{dataset}: **{label}** has no finished trial ({len(failed_here)} failed or unfinished); "
                            "it is listed with n=0.")

    table = pd.DataFrame(rows)
    pairwise = _pairwise(table, per_seed)
    _fill_ranks(table, pairwise)
    table = table.reindex(columns=leaderboard_columns())
    failed_cols = ["suite", "dataset", "method", "variant", "label", "code_version", "seed", "trial_id", "run_id", "status", "error"]
    failed = not_finished.reindex(columns=failed_cols).sort_values(["suite", "dataset", "label", "seed"]).reset_index(drop=True)
    if not failed.empty:
        warnings.append(f"{len(failed)} failed or unfinished trial(s) are listed in their own table and are not averaged.")
    protocols = {}
    for (suite, dataset), group in runs.groupby(["suite", "dataset"]):
        texts = sorted({_protocol_text(json.loads(c)) for c in group["config"]})
        protocols[(suite, dataset)] = " | ".join(texts)
        if len(texts) > 1:
            warnings.append(f"{suite}/{dataset}: runs use different evaluation settings ({len(texts)} protocols); compare rows with care.")
    for suite in sorted(set(table["suite"])):
        for method, values in (references or {}).get(suite, {}).items():
            bad = [k for k in values if k != "source" and canonical_metric(k) not in REFERENCE_METRICS]
            if bad:
                warnings.append(f"suite {suite}: reference numbers for {method} use unknown metric name(s) {', '.join(bad)}; "
                                f"known: {', '.join(REFERENCE_METRICS + tuple(REFERENCE_ALIASES))}.")
    runs_out = runs.copy()
    meta["generated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["n_runs"] = str(len(runs))
    table["tag"], legends = _short_tags(table, _recipe_variants(runs, recipes or {}))
    table = table.reindex(columns=leaderboard_columns())
    return Leaderboard(table, failed, pairwise, pd.DataFrame(per_class_rows), runs_out, warnings, protocols, meta,
                       baselines if baselines is not None else pd.DataFrame(), legends, _shared_departures(runs, recipes or {}))


def _shared_departures(runs: pd.DataFrame, recipes: dict[tuple[str, str], dict[str, str]]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """Per (suite, dataset): (method, "key=value, ...") for the settings every run of the
    method shares and the suite's recipe does not (e.g. ``pretrained=synthetic`` on every row
    of a report rendered with ``--filter``), which the variant legend, listing only what differs
    between a method's rows, would leave unsaid. ``method.`` is dropped from the keys."""
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for (suite, dataset, method), group in runs.groupby(["suite", "dataset", "method"], sort=True):
        recipe = recipes.get((suite, method))
        if not recipe:
            continue
        configs = [json.loads(c) for c in group["config"]]
        shared = sorted(k for k, v in recipe.items()
                        if all(k in c for c in configs) and len({c[k] for c in configs}) == 1 and configs[0][k] != v)
        if shared:
            text = ", ".join(f"{k.removeprefix('method.')}={configs[0][k]}" for k in shared)
            out.setdefault((suite, dataset), []).append((method, text))
    return out


def _recipe_variants(runs: pd.DataFrame, recipes: dict[tuple[str, str], dict[str, str]]) -> set[tuple[str, str, str, str]]:
    """(suite, dataset, method, variant) of the variants whose runs were made with the suite's
    own recipe: every ``method.*`` / ``eval.*`` param the run and the recipe both have is equal
    (a field added to a config later is left out of the comparison)."""
    out = set()
    for _, r in runs[runs["variant"] != ""].iterrows():
        recipe = recipes.get((r["suite"], r["method"]))
        if not recipe:
            continue
        config = json.loads(r["config"])
        if all(config[k] == v for k, v in recipe.items() if k in config):
            out.add((r["suite"], r["dataset"], r["method"], r["variant"]))
    return out


def _short_tags(table: pd.DataFrame, recipe_variants: set[tuple[str, str, str, str]] = frozenset()
                ) -> tuple[list[str], dict[tuple[str, str], list[tuple[str, str]]]]:
    """A short display name per row and, per (suite, dataset), the legend of its variants.

    A row whose method has one configuration in the suite keeps its label (``afa``, ``delta
    @aaa``); otherwise the ``[settings]`` part becomes ``·v<k>`` (k = 1, 2, ... in the order of
    the variants' text), e.g. ``weaktr·v2``, and the legend lists for ``weaktr·v2`` only the
    settings that differ between the method's configurations (what is common to them is the
    suite's recipe, stated once in the protocol), followed by "(the suite's recipe)" for the
    variant in ``recipe_variants``. leaderboard.csv keeps the full ``label`` and ``variant``.
    """
    tags: list[str] = []
    legends: dict[tuple[str, str], list[tuple[str, str]]] = {}
    numbers: dict[tuple[str, str, str], dict[str, int]] = {}
    for (suite, dataset, method), group in table.groupby(["suite", "dataset", "method"], sort=True):
        variants = sorted(v for v in set(group["variant"]) if v)
        numbers[(suite, dataset, method)] = {v: k for k, v in enumerate(variants, 1)}
        for k, v in enumerate(variants, 1):
            mark = " (the suite's recipe)" if (suite, dataset, method, v) in recipe_variants else ""
            legends.setdefault((suite, dataset), []).append((f"{method}·v{k}", v.replace(",", ", ") + mark))
    for _, r in table.iterrows():
        variant = r["variant"]
        if not variant:
            tags.append(r["label"])
            continue
        k = numbers[(r["suite"], r["dataset"], r["method"])][variant]
        tags.append(r["label"].replace(f"{r['method']} [{variant}]", f"{r['method']}·v{k}", 1))
    return tags, legends


def _oracle_threshold_at_sweep_end(done: pd.DataFrame) -> list[int]:
    """Seeds whose best CAM threshold is the last one swept: the optimum may lie beyond. The
    range used is the metric ``cam_threshold_stop`` (the sweep widens itself, to 1.0 at most);
    older runs have only the configured ``eval.threshold_stop``."""
    if "cam_best_threshold" not in done:
        return []
    seeds = []
    for _, run in done.iterrows():
        used = run["cam_threshold_stop"] if "cam_threshold_stop" in run and not pd.isna(run["cam_threshold_stop"]) else None
        best, stop = run["cam_best_threshold"], used if used is not None else json.loads(run["config"]).get("eval.threshold_stop")
        if stop is not None and not pd.isna(best) and abs(float(best) - float(stop)) < 1e-9:
            seeds.append(int(run["seed"]))
    return sorted(seeds)


def _display_uri(uri: str) -> str:
    """A SQLite store under the working directory is shown relative to it (committed reports
    should not carry one machine's absolute paths)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        try:
            return "sqlite:///" + path.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return uri
    return uri


def _row_key(row: dict[str, Any] | pd.Series) -> str:
    return f"{row['suite']}\x1f{row['dataset']}\x1f{row['label']}"


def _references_for(references, suite: str, method: str) -> dict[str, Any]:
    """{"source": str, metric: parsed number} of one method; bare numbers (callers passing
    raw tables) become {"value": x}; unknown metric names are skipped (warned about)."""
    raw = (references or {}).get(suite, {}).get(method, {})
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = canonical_metric(key)
        if key == "source":
            out["source"] = str(value)
        elif name in REFERENCE_METRICS:
            out[name] = parse_number(name, value, f"references of {suite}/{method} `{key}`")
    return out


def _reference_columns(published: dict[str, Any], method: str, row: dict[str, Any], config: dict[str, str],
                       oracle_epoch: bool) -> dict[str, Any]:
    """reference_<m>, delta_<m> (NaN unless the protocols match), reference_note_<m> and
    reference_source (the table's citation, then each number's own source)."""
    out: dict[str, Any] = {}
    sources = [published["source"]] if published.get("source") else []
    for metric in REFERENCE_METRICS:
        number = published.get(metric)
        note = comparability(number, metric, method, config, oracle_epoch) if number else ""
        ref = number["value"] if number else math.nan
        out[f"reference_{metric}"] = ref
        out[f"delta_{metric}"] = row[f"{metric}_mean"] - ref if number and not note else math.nan
        out[f"reference_note_{metric}"] = note
        if number and number.get("source"):
            sources.append(f"{SHORT_TITLES[metric]} {number['source']}")
    out["reference_source"] = "; ".join(sources)
    return out


def _cost(done: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = len(done)

    def col(name):
        return done[name].to_numpy(dtype=float) if name in done and n else np.full(n, math.nan)

    for stage in COST_STAGES:
        summary = stats.summarize(col(f"time_{stage}_s"))
        out[f"time_{stage}_s_mean"] = summary.mean
        out[f"time_{stage}_s_std"] = summary.std
    kinds = {_device_kind(h) for h in done["hardware"]} if n else set()
    device_total = np.zeros(n)
    for stage in STAGES:
        wall, cpu = col(f"time_{stage}_s"), col(f"cpu_{stage}_s")
        per_run = np.array([(w if _device_kind(h) == "gpu" else c) / 3600.0 for w, c, h in zip(wall, cpu, done["hardware"])]) if n else np.array([])
        out[f"device_h_{stage}"] = stats.mean(per_run)
        device_total = device_total + np.nan_to_num(per_run)
    out["device_h_total"] = stats.mean(device_total) if n else math.nan
    train = np.zeros(n)
    for stage in TRAIN_STAGES:
        train = train + np.nan_to_num(col(f"time_{stage}_s"))
    out["train_wall_h"] = stats.mean(train / 3600.0) if n else math.nan
    out["device_kind"] = "mixed" if len(kinds) > 1 else (kinds.pop() if kinds else "")
    rss = [c for c in done.columns if c.startswith("peak_rss_")]
    gpu = [c for c in done.columns if c.startswith("peak_gpu_")]
    out["peak_rss_mb"] = float(np.nanmax(done[rss].to_numpy(dtype=float))) if rss and n and done[rss].notna().any().any() else math.nan
    out["peak_gpu_mb"] = float(np.nanmax(done[gpu].to_numpy(dtype=float))) if gpu and n and done[gpu].notna().any().any() else math.nan
    for name in COST_METRICS:
        out[name] = stats.mean(col(name))
    nets = sorted(c[len("params_"):] for c in done.columns if c.startswith("params_") and c != "params_total" and done[c].notna().any())
    parts = []
    for net in nets:
        params = stats.mean(col(f"params_{net}"))
        gmacs = stats.mean(col(f"gmacs_{net}"))
        parts.append(f"{net}={params / 1e6:.2f}M/{'-' if math.isnan(gmacs) else f'{gmacs:.2f}'}G")
    out["networks"] = " ".join(parts)
    return out


def _class_sort_key(name: str):
    return (0, "") if name == "background" else (1, name)


def _per_class(done: pd.DataFrame, row: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for what in PER_CLASS_WHATS:
        prefix = f"iou_{what}/"
        classes = sorted((c[len(prefix):] for c in done.columns if c.startswith(prefix) and done[c].notna().any()), key=_class_sort_key)
        for name in classes:
            summary = stats.summarize(done[prefix + name], bounds=metric_bounds(prefix + name))
            out.append({"suite": row["suite"], "dataset": row["dataset"], "label": row["label"], "method": row["method"],
                        "variant": row["variant"], "code_version": row["code_version"], "what": what, "class": name,
                        "n": summary.n, "mean": summary.mean, "std": summary.std, "ci_low": summary.ci_low, "ci_high": summary.ci_high})
    return out


PAIRWISE_COLUMNS = ["suite", "dataset", "metric", "a", "b", "n_matched", "seeds", "mean_diff", "std_diff", "ci_low", "ci_high",
                    "t", "p_value", "distinguishable", "verdict", "p_holm"]

def _pairwise(table: pd.DataFrame, per_seed: dict[str, dict[str, dict[int, float]]]) -> pd.DataFrame:
    out = []
    if table.empty:
        return pd.DataFrame(columns=PAIRWISE_COLUMNS)
    for (suite, dataset), group in table.groupby(["suite", "dataset"], sort=False):
        labels = list(group.sort_values("label")["label"])
        for metric in RANK_METRICS:
            family: list[dict[str, Any]] = []
            for i, a in enumerate(labels):
                for b in labels[i + 1:]:
                    sa = per_seed[f"{suite}\x1f{dataset}\x1f{a}"][metric]
                    sb = per_seed[f"{suite}\x1f{dataset}\x1f{b}"][metric]
                    if not sa or not sb:  # a row without this metric: nothing to compare
                        continue
                    cmp = stats.paired_compare(sa, sb)
                    verdict = cmp.verdict.replace("A better", f"{a} better").replace("B better", f"{b} better")
                    family.append({"suite": suite, "dataset": dataset, "metric": metric, "a": a, "b": b, "n_matched": cmp.n,
                                   "seeds": " ".join(map(str, cmp.seeds)), "mean_diff": cmp.mean_diff, "std_diff": cmp.std_diff,
                                   "ci_low": cmp.ci_low, "ci_high": cmp.ci_high, "t": cmp.t, "p_value": cmp.p_value,
                                   "distinguishable": cmp.distinguishable, "verdict": verdict})
            # Holm over the pairs of this (suite, dataset, metric): one family of tests
            for entry, adjusted in zip(family, stats.holm([e["p_value"] for e in family])):
                entry["p_holm"] = adjusted
            out += family
    return pd.DataFrame(out, columns=PAIRWISE_COLUMNS)


def _fill_ranks(table: pd.DataFrame, pairwise: pd.DataFrame) -> None:
    if table.empty:
        return
    for (suite, dataset), group in table.groupby(["suite", "dataset"], sort=False):
        sub = pairwise[(pairwise["suite"] == suite) & (pairwise["dataset"] == dataset)] if not pairwise.empty else pairwise
        for metric in RANK_METRICS:
            # A rank is a claim about seed-to-seed variation: rows with < 2 seeds get none.
            ranked = group[group[f"{metric}_n"] >= 2]
            scores = dict(zip(ranked["label"], ranked[f"{metric}_mean"]))
            wins: set[tuple[str, str]] = set()
            for _, p in sub[sub["metric"] == metric].iterrows() if not sub.empty else []:
                if _is_true(p["distinguishable"]):
                    wins.add((p["a"], p["b"]) if p["mean_diff"] > 0 else (p["b"], p["a"]))
            ranks = stats.rank_with_ties(scores, lambda x, y: (x, y) in wins)
            for index, label in zip(group.index, group["label"]):
                table.loc[index, f"rank_{metric}"] = ranks.get(label, math.nan)


def _is_true(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and bool(value)


def primary_metric(table: pd.DataFrame) -> str | None:
    """The metric that orders and ranks rows: the first of PRIMARY_ORDER (val MS+CRF, val
    MS, val SS, mask, CAM) that the most rows have a value for."""
    best, coverage = None, 0
    for metric in PRIMARY_ORDER:
        if f"{metric}_n" in table:
            count = int((table[f"{metric}_n"] > 0).sum())
            if count > coverage:
                best, coverage = metric, count
    return best


def per_class_whats(pc: pd.DataFrame) -> list[str]:
    """Per-class tables shown in md/html: CAM, mask and the best val protocol present
    (per_class.csv has them all)."""
    present = set(pc["what"]) if not pc.empty else set()
    val = next((w for w in ("val_ms_crf", "val_ms", "val_ss") if w in present), None)
    return [w for w in ("cam", "mask") if w in present] + ([val] if val else [])


PER_CLASS_COLUMNS = ["suite", "dataset", "label", "method", "variant", "code_version", "what", "class", "n", "mean", "std", "ci_low", "ci_high"]

RUN_COLUMNS = ["experiment", "run_id", "suite", "dataset", "method", "variant", "segmentation", "code_version", "seed", "trial_id",
               "status", "hardware", "env", "versions", "error"]

def leaderboard_columns() -> list[str]:
    """leaderboard.csv's columns, in order (documented in the module docstring)."""
    cols = ["suite", "dataset", "method", "variant", "segmentation", "code_version", "code_flag", "label", "tag", "random_init",
            "n_seeds", "seeds", "missing_seeds", "n_failed"]
    for m in QUALITY_METRICS:
        cols += [f"{m}_n", f"{m}_mean", f"{m}_std", f"{m}_ci_low", f"{m}_ci_high"]
    cols += [f"rank_{m}" for m in RANK_METRICS]
    for m in REFERENCE_METRICS:
        cols += [f"reference_{m}", f"delta_{m}", f"reference_note_{m}"]
    cols += ["reference_source"]
    for s in COST_STAGES:
        cols += [f"time_{s}_s_mean", f"time_{s}_s_std"]
    cols += [f"device_h_{s}" for s in STAGES] + ["device_h_total", "train_wall_h", "device_kind", "peak_rss_mb", "peak_gpu_mb",
                                                 "params_total", "gmacs_total", "networks", "hardware", "env", "versions", "run_ids"]
    return cols


def suite_references(suites: list[Suite]) -> dict[str, dict[str, dict[str, Any]]]:
    return {s.name: s.reference for s in suites}


def suite_seeds(suites: list[Suite]) -> dict[str, list[int]]:
    return {s.name: list(s.seeds) for s in suites}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"
