"""One leaderboard, one truth: `run` and `report` write the same files in the same place with
the same n; a re-run whose trials are all skipped prints their stored numbers; off a
terminal each stage start / end is a log line. One tiny real trial."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main

pytestmark = pytest.mark.slow  # one real (tiny) trial, run twice, plus a report: about 40 s

TINY = ["dataset.num_train=12", "dataset.num_val=6", "dataset.image_size=64", "epochs=1", "seg_epochs=1",
        "crop=64", "seg_crop=64", "batch_size=6", "seg_batch_size=6", "eval.gallery_size=2"]


def _run(results: Path) -> int:
    return main(["run", "--methods", "cam", "--dataset", "synthetic", "--seeds", "0", "--results", str(results), *TINY])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    return results


def test_run_then_report_one_truth(first, capsys):
    assert _run(first) == 0
    out = " ".join(capsys.readouterr().out.split())
    # off a terminal (pytest captures stdout): each stage's start and end is a log line
    for stage in ("train_cam", "cams", "pseudo_masks", "train_seg", "segment"):
        assert re.search(rf"\d\d:\d\d:\d\d cam/synthetic/seed0 · {stage} started", out), stage
    assert re.search(r"cam/synthetic/seed0 · train_cam done \(\d+ s\)", out)
    # a counted stage says when its images are through, and "done" only when it has scored them
    counted = re.search(r"cam/synthetic/seed0 · pseudo_masks: (\d+)/\1 \(\d+ s\), scoring", out)
    scored = re.search(r"cam/synthetic/seed0 · pseudo_masks done \(\d+ s\)", out)
    assert counted and scored and counted.start() < scored.start(), out
    written = first / "report" / "synthetic" / "leaderboard.csv"
    after_run = pd.read_csv(written)
    n_run = re.search(r"│ cam[^│]*│ (\d+/\d+)", out).group(1)

    # a re-run skips the finished trial and prints its stored numbers, not "-" and time 0
    assert _run(first) == 0
    again = " ".join(capsys.readouterr().out.split())
    cam = after_run.loc[0, "cam_miou_mean"]
    assert re.search(rf"skipped cam/synthetic/seed0 \(\w+\): CAM {cam:.1f}, mask", again)
    row = re.search(r"│ [^│]+ │ cam │ 0 │ skipped │ ([^│]+)│ ([^│]+)│ ([^│]+)│ ([^│]+)│ ([^│]+)│", again)
    assert row and row.group(1).strip() == f"{cam:.1f}" and row.group(5).strip() != "0", again

    # `report` (no --out) rewrites the very same folder, with the same n
    assert main(["report", "--results", str(first), "--no-gallery"]) == 0
    report_out = " ".join(capsys.readouterr().out.split())
    assert str(first / "report" / "synthetic") in report_out
    assert not (first / "report" / "leaderboard.csv").exists()  # no second, differently-scoped leaderboard
    after_report = pd.read_csv(written)
    assert re.search(r"│ cam[^│]*│ (\d+/\d+)", report_out).group(1) == n_run
    cols = ["label", "n_seeds", "seeds", "missing_seeds", "cam_miou_mean", "val_miou_ss_mean"]
    pd.testing.assert_frame_equal(after_run[cols], after_report[cols])
    # the headline has the trivial baselines of the same (tiny) val split
    md = (first / "report" / "synthetic" / "leaderboard.md").read_text()
    assert "| baseline: all background |" in md and "| baseline: image label everywhere |" in md
