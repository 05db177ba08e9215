"""Test-only plugin (``WSSS_PLUGINS``): ``cam_crf`` is the cam baseline whose dense-CRF
iterations ``WSSS_TEST_CRF_ITERATIONS`` can raise in one process (its config, and so its trial
id, stays the same): the driver then spends minutes in the CRF pool, a window to kill it in."""

from __future__ import annotations

import dataclasses
import os

from methods.base import CRFParams, register
from methods.cam.method import CamBaseline


@register
class CamCrf(CamBaseline):
    name = "cam_crf"

    def crf_params(self) -> CRFParams:
        params = super().crf_params()
        iterations = os.environ.get("WSSS_TEST_CRF_ITERATIONS")
        return dataclasses.replace(params, iterations=int(iterations)) if iterations else params
