"""The report as a reader meets it: headline first, short tags with a legend, trivial
baselines computed on the same splits, pairwise comparisons Holm-corrected in a grid, and
the markdown in the HTML's order. Hand-computable inputs; expected numbers in the tests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from harness import stats
from harness.report import build_leaderboard, to_markdown
from harness.report.baselines import baseline_prediction, score_split
from methods.base import Sample


def test_holm_adjusted_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4 * 0.005 = 0.02; 3 * 0.01 = 0.03; 2 * 0.03 = 0.06;
    # 1 * 0.04 = 0.04 -> raised to the running max 0.06; NaN (fewer than 2 seeds) is not a test.
    adjusted = stats.holm([0.01, 0.04, 0.03, math.nan, 0.005])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3]) and adjusted[4] == pytest.approx(0.02)
    assert stats.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([]) == []


class _Split:
    def __init__(self, samples):
        self.ids = [s.id for s in samples]
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_trivial_baselines_on_a_hand_computable_split():
    # One 2x2 image, classes {background, 1, 2}, GT [[0, 1], [1, 255]], image label: class 1.
    sample = Sample("a", np.zeros((2, 2, 3), np.uint8), np.array([1.0, 0.0], np.float32), np.array([[0, 1], [1, 255]], np.uint8))
    assert (baseline_prediction("image label everywhere", sample.labels, (2, 2)) == 1).all()
    assert (baseline_prediction("image label everywhere", np.array([0.0, 1.0, 1.0]), (1, 1)) == 2).all()  # first present
    assert (baseline_prediction("image label everywhere", np.zeros(2), (1, 1)) == 0).all()  # none present
    scores, n = score_split(_Split([sample]), num_classes=2, limit=0, convention="present")
    # all background: confusion gt0->0: 1, gt1->0: 2; IoU bg = 1 / (1 + 3 - 1) = 1/3, class 1 = 0,
    # class 2 absent (not averaged) -> mIoU (1/3 + 0) / 2 = 16.67 %.
    # label everywhere: gt0->1: 1, gt1->1: 2; IoU bg = 0, class 1 = 2 / (2 + 3 - 2) = 2/3 -> 33.33 %.
    assert n == 1
    assert scores["all background"] == pytest.approx(100 / 6)
    assert scores["image label everywhere"] == pytest.approx(100 / 3)


def _runs() -> pd.DataFrame:
    base = {"suite": "s", "dataset": "d", "status": "finished", "hardware": "cpu", "code_version": "c", "error": ""}
    rows = []
    for seed, (a, b, c) in enumerate([(50.0, 40.0, 30.0), (52.0, 41.0, 30.5), (54.0, 43.0, 31.0)]):
        rows.append({**base, "method": "weaktr", "seed": seed, "run_id": f"a{seed}", "val_miou_ss": a,
                     "config": '{"method.epochs": "2", "method.window": "160", "eval.max_val": "0"}'})
        rows.append({**base, "method": "weaktr", "seed": seed, "run_id": f"b{seed}", "val_miou_ss": b,
                     "config": '{"method.epochs": "5", "method.window": "240", "eval.max_val": "0"}'})
        rows.append({**base, "method": "afa", "seed": seed, "run_id": f"c{seed}", "val_miou_ss": c, "config": "{}"})
    return pd.DataFrame(rows)


def test_short_tags_legend_and_the_csv_keeps_the_full_label():
    board = build_leaderboard(_runs())
    tags = dict(zip(board.table["label"], board.table["tag"]))
    assert tags == {"weaktr [epochs=2,window=160]": "weaktr·v1", "weaktr [epochs=5,window=240]": "weaktr·v2", "afa": "afa"}
    assert board.legends[("s", "d")] == [("weaktr·v1", "epochs=2, window=160"), ("weaktr·v2", "epochs=5, window=240")]
    md = to_markdown(board)
    assert "`weaktr·v2` epochs=5, window=240" in md
    assert "[epochs=" not in md  # the long label appears nowhere in the report, only in the CSV


def test_markdown_opens_on_the_headline_and_pairwise_is_a_holm_corrected_grid():
    base = pd.DataFrame([{"suite": "s", "dataset": "d", "baseline": "all background", "cam_eval_split": "train", "n_cam_eval": 4,
                          "cam_eval_miou": 15.04, "val_split": "val", "n_val": 3, "val_miou": 14.96}])
    board = build_leaderboard(_runs(), baselines=base)
    md = to_markdown(board)
    headline = md.index("| 1 | weaktr·v1 | 3/3 | 52.0 ± 2.0 |")
    assert headline < md.index("<details>") < md.index("Pairwise comparisons") < md.index("**Protocol.**")
    assert "|  | baseline: all background | - | 15.0 |" in md  # val SS column shows the val split's 14.96
    # Pairwise on val SS only (the primary metric); 3 pairs, each distinguishable:
    # v1 - v2 = (10, 11, 11) -> mean 10.667; v1 - afa = (20, 21.5, 23) -> 21.5; v2 - afa = (10, 10.5, 12) -> 10.833
    pw = board.pairwise[board.pairwise["metric"] == "val_miou_ss"]
    assert len(pw) == 3 and set(board.pairwise["metric"]) == {"val_miou_ss"}
    p = sorted(pw["p_value"])
    assert list(pw.sort_values("p_value")["p_holm"]) == pytest.approx([3 * p[0], max(3 * p[0], 2 * p[1]), max(3 * p[0], 2 * p[1], p[2])])
    assert "| weaktr·v1 | · | +10.7* | +21.5* |" in md  # row - column, * = p (Holm) < 0.05
    assert "| weaktr·v2 | -10.7* | · | +10.8* |" in md


def test_baselines_are_skipped_with_a_reason_when_the_data_is_not_here(tmp_path):
    from harness.report.baselines import compute_baselines

    runs = pd.DataFrame([{"suite": "voc-mini", "dataset": "voc", "status": "finished", "config": "{}",
                          "data_root": str(tmp_path / "no-such-VOC2012")}])
    frame, notes = compute_baselines(runs, tmp_path / "cache")
    assert frame.empty
    assert notes == [f"voc-mini/voc: no baseline rows: the runs' data root {tmp_path / 'no-such-VOC2012'} is not on this machine."]


def test_a_headline_mean_at_or_below_all_background_is_marked():
    # val SS means: weaktr·v1 52.0, weaktr·v2 41.3, afa 30.5; all-background val mIoU 41.3
    base = pd.DataFrame([{"suite": "s", "dataset": "d", "baseline": "all background", "cam_eval_split": "train", "n_cam_eval": 4,
                          "cam_eval_miou": 15.0, "val_split": "val", "n_val": 3, "val_miou": 41.3}])
    md = to_markdown(build_leaderboard(_runs(), baselines=base))
    assert "| weaktr·v1 | 3/3 | 52.0 ± 2.0 |" in md  # above: unmarked
    assert "| weaktr·v2 | 3/3 | 41.3 ± 1.5 ▾ |" in md and "| afa | 3/3 | 30.5 ± 0.5 ▾ |" in md
    assert "▾ = a mean at or below the all-background baseline." in md
