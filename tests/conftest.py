"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The synthetic suite's pretrained="synthetic" backbones: a 2-step smoke build in tests
# (harness/pretrain.py), so a fresh results directory costs seconds, not minutes.
os.environ.setdefault("WSSS_PRETRAIN", "tiny")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder ``../shared/data`` next to the repository (voc-mini, coco-tiny).

    It may be absent (a bare clone): tests that need it must ``pytest.skip`` with the reason.
    It is read-only: never write into it; copy what a test damages into ``tmp_path``.
    """
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"
