"""Test-only methods, loaded as a plugin (``WSSS_PLUGINS=tests/plugin_methods.py``) by the
driver and by every worker (local pool, Ray task, SLURM job); never registered in methods/.

* ``cam_b``      the cam baseline with another background threshold: a second "method" for
                 the 2-method x 2-seed backend sweeps (cam is the only method sure to exist)
* ``cam_pause``  cam that pauses before train_seg (``pause_s``): a window to requeue / kill
                 a trial mid-run; its numbers equal cam's
* ``broken``     raises in train_cam: a deterministic error in method code
* ``crash_once`` the worker process dies (os._exit) in train_cam on its first attempt only:
                 a system failure that Ray must retry
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from methods.base import register
from methods.cam.method import CamBaseline, CamConfig

PLUGIN = str(Path(__file__).resolve())


@dataclass
class CamBConfig(CamConfig):
    bg_threshold: float = 0.25


@register
class CamB(CamBaseline):
    name = "cam_b"
    Config = CamBConfig


@dataclass
class CamPauseConfig(CamConfig):
    pause_s: float = 0.0


@register
class CamPause(CamBaseline):
    name = "cam_pause"
    Config = CamPauseConfig

    def train_seg(self, train, ctx) -> None:
        deadline = time.monotonic() + self.config.pause_s
        while time.monotonic() < deadline:  # short sleeps: signals are handled promptly
            time.sleep(0.2)
        super().train_seg(train, ctx)


@register
class Broken(CamBaseline):
    name = "broken"

    def train_cam(self, train, ctx) -> None:
        raise ValueError("broken on purpose: a deterministic error in method code")


@register
class CrashOnce(CamBaseline):
    name = "crash_once"

    def train_cam(self, train, ctx) -> None:
        marker = ctx.workdir / "crashed-once"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(17)  # the worker process dies: no exception, no cleanup
        super().train_cam(train, ctx)
