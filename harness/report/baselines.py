"""Trivial baselines on the splits the runs were scored on, so every table shows at once
whether a method beats predicting nothing.

* ``all background``: every pixel background (class 0).
* ``image label everywhere``: every pixel of an image labelled with its present foreground
  class (image-level labels, the only supervision WSSS has; the first in class order when
  several are present, background when none): what image labels give with no localisation.

Where they are computed: at report time, from the dataset itself (harness/datasets), for the
protocol the section's runs recorded: dataset name and options (``dataset.*``), data root
(param ``data_root``), splits (``splits.*``, else the dataset's defaults), image limits
(``eval.max_cam_eval``, ``eval.max_val``: the first N ids in sorted order, as the runner
takes them) and the mIoU convention (``eval.convention``). Scores are the harness's own
(harness/evaluation.py: 255 ignored, background included). The synthetic dataset is always
at hand (generated into the cache); a real dataset only where its data root exists on the
machine writing the report — otherwise the section has no baseline rows and the report
says why. Results are cached as JSON per (dataset, root, options, split, limit,
convention) in ``<cache_dir>/baselines/``: the ground truth does not change between reports.

Output frame (one row per suite, dataset, baseline): ``suite, dataset, baseline,
cam_eval_split, n_cam_eval, cam_eval_miou, val_split, n_val, val_miou`` (mIoU in %).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BASELINES: tuple[str, ...] = ("all background", "image label everywhere")
COLUMNS = ["suite", "dataset", "baseline", "cam_eval_split", "n_cam_eval", "cam_eval_miou", "val_split", "n_val", "val_miou"]


def baseline_prediction(kind: str, labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The (H, W) uint8 prediction of baseline ``kind`` for an image with image-level
    ``labels`` ((C,) multi-hot over the foreground classes; class i is index i + 1)."""
    if kind == "all background":
        return np.zeros(shape, np.uint8)
    if kind == "image label everywhere":
        present = np.flatnonzero(np.asarray(labels) > 0)
        return np.full(shape, int(present[0]) + 1 if present.size else 0, np.uint8)
    raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")


def score_split(split, num_classes: int, limit: int, convention: str) -> tuple[dict[str, float], int]:
    """mIoU (%) of every baseline on the first ``limit`` ids (sorted; 0 = all) of ``split``
    -> ({baseline: mIoU}, images scored). ``num_classes``: foreground classes C; the
    confusion is (C + 1) x (C + 1), GT 255 ignored."""
    from harness.evaluation import scores_from_confusion

    k = num_classes + 1
    indices = sorted(range(len(split)), key=lambda i: split.ids[i])
    indices = indices[:limit] if limit else indices
    confusions = {kind: np.zeros((k, k), np.int64) for kind in BASELINES}
    for i in indices:
        sample = split[i]
        gt = np.asarray(sample.mask)
        valid = gt != 255
        for kind in BASELINES:
            pred = baseline_prediction(kind, sample.labels, gt.shape)
            confusions[kind] += np.bincount(k * gt[valid].astype(np.int64) + pred[valid], minlength=k * k).reshape(k, k)
    return {kind: 100.0 * scores_from_confusion(c).miou(convention) for kind, c in confusions.items()}, len(indices)


def _protocol(config: dict[str, str], data_root: str) -> dict[str, Any]:
    """What decides a section's baseline numbers, from one run's recorded config."""
    return {
        "root": None if data_root in ("", "None", "nan") else data_root,
        "options": {k.split(".", 1)[1]: v for k, v in sorted(config.items()) if k.startswith("dataset.")},
        "splits": {k.split(".", 1)[1]: v for k, v in sorted(config.items()) if k.startswith("splits.")},
        "max_cam_eval": int(float(config.get("eval.max_cam_eval", "0") or 0)),
        "max_val": int(float(config.get("eval.max_val", "0") or 0)),
        "convention": config.get("eval.convention", "present"),
    }


def _cached(cache: Path | None, key: dict[str, Any], compute):
    """``compute()`` once per key: JSON files under ``cache`` (None: no cache)."""
    if cache is None:
        return compute()
    path = cache / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        return json.loads(path.read_text())["value"]
    value = compute()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    tmp.replace(path)
    return value


def compute_baselines(runs: pd.DataFrame, cache_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    """Baseline rows for every (suite, dataset) of ``runs`` (the store's runs frame) whose
    data is at hand -> (frame with :data:`COLUMNS`, notes on sections left without).

    The protocol of a section is its most common one among finished runs (all runs when none
    finished). ``cache_dir``: where the data cache and ``baselines/`` live (the runs'
    results cache, so the synthetic data is not generated twice)."""
    from harness.datasets import create_dataset
    from harness.errors import WsssError

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS), notes
    for (suite, dataset), group in runs.groupby(["suite", "dataset"], sort=True):
        done = group[group["status"] == "finished"] if (group["status"] == "finished").any() else group
        roots = done["data_root"] if "data_root" in done else pd.Series(["None"] * len(done), index=done.index)
        keyed = [json.dumps(_protocol(json.loads(c or "{}"), str(r)), sort_keys=True) for c, r in zip(done["config"], roots)]
        protocol = json.loads(max(set(keyed), key=lambda k: (keyed.count(k), k)))
        if protocol["root"] and not Path(protocol["root"]).exists():
            notes.append(f"{suite}/{dataset}: no baseline rows: the runs' data root {protocol['root']} is not on this machine.")
            continue
        try:
            data = create_dataset(dataset, Path(protocol["root"]) if protocol["root"] else None,
                                  (cache_dir or Path("results") / "cache"), protocol["options"])
            defaults = data.default_splits()
            scores: dict[str, tuple[str, dict[str, float], int]] = {}
            for role, limit in (("cam_eval", protocol["max_cam_eval"]), ("val", protocol["max_val"])):
                name = protocol["splits"].get(role) or defaults[role]
                key = {"dataset": dataset, "root": protocol["root"], "options": protocol["options"], "split": name, "limit": limit,
                       "convention": protocol["convention"]}
                value = _cached(cache_dir / "baselines" if cache_dir else None, key,
                                lambda: score_split(data.split(name), data.info.num_classes, limit, protocol["convention"]))
                scores[role] = (name, value[0], int(value[1]))
        except Exception as exc:  # noqa: BLE001  (a report must not fail on its baselines; the reason is shown)
            reason = str(exc) if isinstance(exc, WsssError) else f"{type(exc).__name__}: {exc}"
            notes.append(f"{suite}/{dataset}: no baseline rows: {reason}")
            continue
        for kind in BASELINES:
            rows.append({"suite": suite, "dataset": dataset, "baseline": kind,
                         "cam_eval_split": scores["cam_eval"][0], "n_cam_eval": scores["cam_eval"][2],
                         "cam_eval_miou": scores["cam_eval"][1][kind],
                         "val_split": scores["val"][0], "n_val": scores["val"][2], "val_miou": scores["val"][1][kind]})
    return pd.DataFrame(rows, columns=COLUMNS), notes
