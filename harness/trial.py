"""A trial's directory: its spec, per-stage records, checkpoints and stage outputs.

Layout of ``<results>/trials/<trial_id>/``::

    spec.json            the resolved TrialSpec (what the id hashes)
    state.json           finished stages with their cost and metrics (atomic writes)
    checkpoints/<stage>.pt   method.state_dict() after each training stage
    work/<stage>/        the method's own scratch space (mid-stage checkpoints)
    cams/<id>.npz        present-class CAMs of the cam-eval split (float16)
    pseudo/<id>.png      pseudo masks of the training split
    gallery/             fixed images: image, ground truth, CAM, pseudo mask, prediction
    error.txt            the traceback of the last failure, if any
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.config import TrialSpec
from harness.errors import ResultsError
from harness.files import atomic_write_text

STAGES: tuple[str, ...] = ("train_cam", "cams", "pseudo_masks", "train_seg", "segment")
TRAINING_STAGES = ("train_cam", "train_seg")


@dataclass
class StageRecord:
    """One finished stage: how it ended (``done`` or ``fused`` into another), its cost, and
    the metrics it produced."""

    stage: str
    status: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # name -> [[x, y], ...]


class TrialDir:
    def __init__(self, results_dir: Path, spec: TrialSpec) -> None:
        self.spec = spec
        self.root = results_dir / "trials" / spec.trial_id
        for sub in ("checkpoints", "cams", "pseudo", "gallery", "work"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        spec_path = self.root / "spec.json"
        if spec_path.exists():
            existing = json.loads(spec_path.read_text())
            if existing != json.loads(json.dumps(spec.to_dict(), default=str)):
                raise ResultsError(f"Trial directory {self.root} holds a different trial spec ({spec_path}); refusing to mix results. Move it away or use another results directory.")
        else:
            atomic_write_text(spec_path, json.dumps(spec.to_dict(), indent=2, sort_keys=True, default=str))

    # -- stage records ---------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def records(self) -> dict[str, StageRecord]:
        if not self.state_path.exists():
            return {}
        raw = json.loads(self.state_path.read_text())
        return {name: StageRecord(**rec) for name, rec in raw.get("stages", {}).items()}

    def mark_done(self, record: StageRecord) -> None:
        records = self.records()
        records[record.stage] = record
        payload = {"trial_id": self.spec.trial_id, "stages": {k: asdict(v) for k, v in records.items()}}
        atomic_write_text(self.state_path, json.dumps(payload, indent=2, sort_keys=True))

    def is_complete(self) -> bool:
        return set(STAGES) <= set(self.records())

    def next_stage(self) -> str | None:
        done = self.records()
        return next((s for s in STAGES if s not in done), None)

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_path(self, stage: str) -> Path:
        return self.root / "checkpoints" / f"{stage}.pt"

    def save_checkpoint(self, stage: str, state: dict[str, Any]) -> None:
        path = self.checkpoint_path(stage)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint of the last finished training stage, if any."""
        done = self.records()
        for stage in reversed(TRAINING_STAGES):
            path = self.checkpoint_path(stage)
            if stage in done and path.exists():
                return path
        return None

    def workdir(self, stage: str) -> Path:
        path = self.root / "work" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_error(self, text: str) -> Path:
        path = self.root / "error.txt"
        atomic_write_text(path, text)
        return path

    def clear(self) -> None:
        """Forget every stage (``--force``): records, checkpoints and outputs."""
        import shutil

        for sub in ("checkpoints", "cams", "pseudo", "gallery", "work"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.state_path.unlink(missing_ok=True)
        (self.root / "error.txt").unlink(missing_ok=True)
