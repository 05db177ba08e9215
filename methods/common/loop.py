"""Mid-stage checkpoints: a training loop that resumes at the step where it was stopped.

A stage that trains for hours must not restart from zero after a SLURM requeue, a
preemption or a ``kill -9``. :class:`ResumableLoop` wraps a loop's batches
(:func:`methods.common.data.training_batches`) and, every ``every_steps`` steps or
``every_s`` seconds (whichever comes first), atomically writes to the stage's ``workdir``:

* the state dicts of the loop's modules, optimizers and (optional) grad scaler;
* the RNG state that the training step draws from (torch CPU and CUDA: dropout, drop path;
  Python's ``random``);
* the number of finished steps, which is also the loader's position (batches derive from
  (seed, epoch, index), see ``methods/common/data.py``).

On the next run the loop loads that file, restores everything and continues with the next
step, so the finished stage is bit-identical (on CPU) to an uninterrupted one. Learning-rate
schedules in this project are functions of the step, so they need no state of their own.
The file is removed when the loop completes (the harness then saves the stage's checkpoint).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from methods.base import SampleSource, StageContext
from methods.common.data import Augment, Batch, training_batches

DEFAULT_EVERY_S = 600.0  # ten minutes: well inside SLURM's default USR2 warning window x 5


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` needs tuples; a checkpoint round trip may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class ResumableLoop:
    """One training loop of a stage, checkpointed inside the stage.

    Args:
        ctx: the stage context (its ``workdir`` holds the file ``<name>.pt``).
        name: the loop's name within the stage (a stage may run several loops).
        modules / optimizers: what the loop trains, by name (their state is saved); a
            "module" may be any object with ``state_dict`` / ``load_state_dict``.
        total_steps: steps of the whole loop.
        scaler: a ``torch.amp.GradScaler`` when mixed precision uses one.
        every_steps: save after this many steps (0: by time only).
        every_s: save when this many seconds passed since the last save (0: by steps only).
    """

    def __init__(
        self,
        ctx: StageContext,
        name: str,
        modules: dict[str, nn.Module | Any],
        optimizers: dict[str, torch.optim.Optimizer],
        total_steps: int,
        scaler: Any | None = None,
        every_steps: int | None = None,
        every_s: float | None = None,
    ) -> None:
        self.ctx, self.name = ctx, name
        self.modules, self.optimizers, self.scaler = modules, optimizers, scaler
        self.total_steps = total_steps
        self.every_steps = ctx.checkpoint_every_steps if every_steps is None else every_steps
        self.every_s = ctx.checkpoint_every_s if every_s is None else every_s
        self.path = Path(ctx.workdir) / f"{name}.pt"
        self._last_save = time.monotonic()
        self.start_step = self._restore()

    # -- checkpoint file ------------------------------------------------------------------
    def _restore(self) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        for key, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][key])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.ctx.device)
        return int(state["step"])

    def save(self, step: int) -> None:
        """Write the state after ``step`` finished steps (atomic: a kill leaves the old file)."""
        state = {
            "step": step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": _rng_state(self.ctx.device),
        }
        tmp = self.path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self._last_save = time.monotonic()

    def _due(self, step: int) -> bool:
        if step >= self.total_steps:
            return False
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_s > 0 and time.monotonic() - self._last_save >= self.every_s
        return by_steps or by_time

    # -- the loop ---------------------------------------------------------------------------
    def batches(
        self,
        source: SampleSource,
        batch_size: int,
        augment: Augment,
        seed: int,
        with_masks: bool = False,
        drop_last: bool = True,
    ) -> Iterator[tuple[int, Batch]]:
        """``(step, batch)`` from the resumed step to the end; between steps (after the
        caller's loop body) it checkpoints when due, and removes the file at the end."""
        pin = self.ctx.device.type == "cuda"
        for step, batch in training_batches(
            source, batch_size, augment, seed, self.total_steps, self.start_step, with_masks, drop_last,
            num_workers=self.ctx.num_workers, pin_memory=pin,
        ):
            yield step, batch
            if self._due(step + 1):
                self.save(step + 1)
        self.path.unlink(missing_ok=True)
