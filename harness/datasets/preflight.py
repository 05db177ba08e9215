"""Pre-flight data check: run before any trial starts (and by ``run --dry-run``).

A broken dataset otherwise surfaces late and N times over: every seed's trial starts, fails
on the same file and is recorded as a failed MLflow run. Here, once per distinct dataset of
a sweep and before anything is recorded, the planned trial specs are settled and checked:

1. the data root becomes the root the dataset resolved to (:meth:`Dataset.canonical_root`),
   so two spellings of ``--data-root`` for the same files give the same trial ids;
2. a pinned split whose files are absent takes its documented fallback
   (:meth:`Dataset.split_fallback`, e.g. VOC ``train_aug`` -> ``train`` without SBD), with a
   notice; the spec then names the split that really runs, so the trial id does too;
3. every split a trial will read is checked (:meth:`Dataset.check_split`): lists exist and
   parse, listed files exist and their headers read. Cheap checks only (about 0.2 ms per
   image); pixel data and mask values are checked when a trial reads them.

A problem raises :class:`~harness.errors.DataError` (one paragraph naming the file; the CLI
exits 2 with nothing run or recorded).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

from harness.config import TrialSpec
from harness.datasets.base import ROLES, Dataset, create_dataset
from harness.errors import DataError


def preflight(specs: Sequence[TrialSpec], cache_dir: Path, notice: Callable[[str], None] = print) -> list[TrialSpec]:
    """The specs with their data root canonical and split fallbacks applied, after checking
    every split they read. ``notice`` receives one line per fallback taken.

    Raises DataError naming the file at fault (ConfigError for a bad dataset name/option).
    """
    settled: dict[str, tuple[str | None, dict[str, str]]] = {}
    out = []
    for spec in specs:
        key = json.dumps([spec.dataset, spec.data_root, spec.dataset_options, spec.splits], sort_keys=True, default=str)
        if key not in settled:
            settled[key] = _settle(spec, cache_dir, notice)
        root, splits = settled[key]
        out.append(dataclasses.replace(spec, data_root=root, splits=splits))
    return out


def _settle(spec: TrialSpec, cache_dir: Path, notice: Callable[[str], None]) -> tuple[str | None, dict[str, str]]:
    """(canonical root, pinned splits after fallbacks) of one dataset setting, checked."""
    dataset = create_dataset(spec.dataset, Path(spec.data_root) if spec.data_root else None, cache_dir, spec.dataset_options)
    splits = dict(spec.splits)
    for role, name in spec.splits.items():
        fallback = dataset.split_fallback(name)
        if fallback is not None:
            notice(f"{spec.suite}: split {name!r} of dataset {spec.dataset} has no files under {dataset.canonical_root()}; "
                   f"the {role} role uses {fallback!r} instead (documented fallback).")
            splits[role] = fallback
    defaults = dataset.default_splits()
    for name in dict.fromkeys(splits.get(role) or defaults[role] for role in ROLES):
        _check(dataset, name)
    return dataset.canonical_root(), splits


def _check(dataset: Dataset, name: str) -> None:
    try:
        dataset.check_split(name)
    except DataError as err:
        raise DataError(f"{err} Nothing was run or recorded; fix the data (or --data-root) and run the command again.") from None
