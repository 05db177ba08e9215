"""IRN (methods/common/irn) on hand-computable inputs, and eval.refine=irn end to end."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from methods.common.irn.affinity import affinity, boundary_loss, line_points, offsets_within
from methods.common.irn.displacement import displacement_losses
from methods.common.irn.labels import confident_labels, pair_sets
from methods.common.irn.model import IRNet
from methods.common.irn.random_walk import propagate, transition_matrix, walk_to_mask

ROOT = Path(__file__).resolve().parents[1]


def test_confident_labels_thresholds():
    # max over classes per pixel: 0.5 (class 0) >= 0.30 -> 1; 0.35 (class 1) -> 2;
    # 0.01 < 0.05 -> background 0; 0.2 in between -> 255.
    cams = torch.tensor([[[0.5, 0.1, 0.0, 0.2]], [[0.4, 0.35, 0.01, 0.0]]])
    assert confident_labels(cams, 0.30, 0.05).tolist() == [[1, 2, 0, 255]]


def test_offsets_and_line_points():
    # radius 2 (distance < 2: |o|^2 in {1, 2}), one of each +o / -o, row-major order
    assert offsets_within(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert len(offsets_within(2, half=False, include_self=True)) == 9
    # (2, 1): 3 samples at t = 0, 1/2, 1 -> (0, 0), (floor(1.5), floor(1.0)) = (1, 1), (2, 1)
    assert line_points(2, 1) == [(0, 0), (1, 1), (2, 1)]
    assert line_points(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_affinity_on_a_1d_strip():
    # B = [0, 0, 0.8, 0, 0.2] on a 1 x 5 strip; a_ij = 1 - max of B on the segment i..j.
    boundary = torch.tensor([[0.0, 0.0, 0.8, 0.0, 0.2]])
    aff, inside = affinity(boundary, [(0, 1), (0, 2), (0, 4)])
    # offset 1: pairs (0,1) max 0 -> 1; (1,2) 0.8 -> 0.2; (2,3) 0.8 -> 0.2; (3,4) 0.2 -> 0.8; pixel 4 has no j
    assert torch.allclose(aff[0, 0], torch.tensor([1.0, 0.2, 0.2, 0.8, 0.0]))
    # offset 2: (0,2) 0.8 -> 0.2; (1,3) 0.8 -> 0.2; (2,4) 0.8 -> 0.2
    assert torch.allclose(aff[1, 0], torch.tensor([0.2, 0.2, 0.2, 0.0, 0.0]))
    # offset 4: (0,4) crosses the 0.8 -> 0.2
    assert torch.allclose(aff[2, 0], torch.tensor([0.2, 0.0, 0.0, 0.0, 0.0]))
    assert inside[0, 0].tolist() == [True, True, True, True, False]


def test_boundary_loss_value():
    # a = 0.5 everywhere, one pair in each set: 0.5 ln 2 + 0.5 ln 2 + ln 2 = 2 ln 2
    aff = torch.full((1, 3, 1, 1), 0.5)
    sets = [torch.zeros(1, 3, 1, 1, dtype=torch.bool) for _ in range(3)]
    for k, s in enumerate(sets):
        s[0, k] = True
    assert math.isclose(boundary_loss(aff, *sets).item(), 2 * math.log(2), rel_tol=1e-5)


def test_pair_sets_ignore_and_classes():
    labels = torch.tensor([[[1, 1, 0, 255, 2]]])
    fg, bg, neg = pair_sets(labels, [(0, 1)])
    # pairs (0,1): 1-1 fg; (1,2): 1-0 neg; (2,3): touches 255 -> none; (3,4): none; 4: off grid
    assert fg[0, 0, 0].tolist() == [True, False, False, False, False]
    assert neg[0, 0, 0].tolist() == [False, True, False, False, False]
    assert not bg.any()


def test_displacement_loss_on_known_fields():
    offsets = [(0, 1), (0, 2)]
    fg_labels = torch.ones(1, 1, 3, dtype=torch.long)
    pos_fg, pos_bg, _ = pair_sets(fg_labels, offsets)  # pairs (0,1), (1,2), (0,2)
    # D(x) = c - x with centroid c = (0, 1): dy = 0, dx = [1, 0, -1] -> every pair agrees: 0
    centroid = torch.tensor([[[[0.0, 0.0, 0.0]], [[1.0, 0.0, -1.0]]]])
    fg, _ = displacement_losses(centroid, offsets, pos_fg, pos_bg)
    assert fg.item() == 0.0
    # D = 0: error = |x_i - x_j|_1 = 1, 1, 2 -> mean 4/3
    fg, _ = displacement_losses(torch.zeros(1, 2, 1, 3), offsets, pos_fg, pos_bg)
    assert math.isclose(fg.item(), 4 / 3, rel_tol=1e-6)
    # background pairs want equal displacements: dx = [0, 1, 3] -> |1-0|, |3-1|, |3-0| -> mean 2
    pos_fg, pos_bg, _ = pair_sets(torch.zeros(1, 1, 3, dtype=torch.long), offsets)
    field = torch.tensor([[[[0.0, 0.0, 0.0]], [[0.0, 1.0, 3.0]]]])
    _, bg = displacement_losses(field, offsets, pos_fg, pos_bg)
    assert math.isclose(bg.item(), 2.0, rel_tol=1e-6)


def test_transition_matrix_is_row_normalised_affinity_power():
    # 1 x 3 strip, B = [0, 0.5, 0], radius 2 (neighbours at distance 1 and the pixel itself).
    # a_00 = a_22 = 1, a_11 = a_01 = a_12 = 0.5, a_02 = 0 (outside the radius).
    boundary = torch.tensor([[0.0, 0.5, 0.0]])
    T1 = transition_matrix(boundary, radius=2, beta=1).to_dense()
    third = 1 / 3
    assert torch.allclose(T1, torch.tensor([[2 * third, third, 0], [third, third, third], [0, third, 2 * third]]))
    # beta = 2: row 0 = [1, 0.25, 0] / 1.25 = [0.8, 0.2, 0]; row 1 = [0.25] * 3 / 0.75
    T2 = transition_matrix(boundary, radius=2, beta=2).to_dense()
    assert torch.allclose(T2, torch.tensor([[0.8, 0.2, 0], [third, third, third], [0, 0.2, 0.8]]))
    assert torch.allclose(T2.sum(1), torch.ones(3))
    # one step from a seed on pixel 0: T v = first column = [0.8, 1/3, 0]
    v = propagate(transition_matrix(boundary, radius=2, beta=2), torch.tensor([[1.0], [0.0], [0.0]]), steps=1)
    assert torch.allclose(v[:, 0], torch.tensor([0.8, third, 0.0]))


def test_walk_to_mask_background_threshold():
    # class 3's walked scores [2, 0.4] / max 2 = [1, 0.2] against background 0.25 -> [4, 0]
    mask = walk_to_mask(torch.tensor([[[2.0, 0.4]]]), torch.tensor([3]), (1, 2), bg_threshold=0.25)
    assert mask.tolist() == [[4, 0]]


def test_irnet_shapes():
    boundary, disp = IRNet("tiny")(torch.rand(2, 3, 66, 64))
    # stride-4 grid: ceil(66 / 4) = 17, 64 / 4 = 16
    assert boundary.shape == (2, 1, 17, 16) and disp.shape == (2, 2, 17, 16)
    assert 0 <= boundary.min() and boundary.max() <= 1


# -- eval.refine = irn end to end (tiny synthetic, CAM baseline) ---------------------------------
TINY = ["dataset.num_train=12", "dataset.num_val=6", "dataset.image_size=64", "epochs=1", "seg_epochs=1", "crop=64",
        "seg_crop=64", "batch_size=6", "seg_batch_size=6", "eval.gallery_size=0", "eval.crf=false",
        "eval.refine=irn", "eval.irn=crop=64,batch_size=6,epochs=2,steps=16,edge_dim=8,disp_dim=8"]
IRN_STEPS = 4  # 12 images / batch 6 = 2 steps per epoch, 2 epochs


def _irn_spec(cache):
    from harness.config import load_suite, parse_overrides
    from harness.sweep import plan_trials

    return plan_trials(load_suite("synthetic"), ["cam"], [0], parse_overrides(TINY), None, cache)[0]


def _run(spec, results, progress=None):
    """The trial's stages up to pseudo_masks, without MLflow (the runner alone: faster)."""
    from harness.runner import TrialRunner

    return TrialRunner(spec, results, progress=progress, stop_after="pseudo_masks").run()


def _pseudo_masks(results, spec):
    from harness.visualize import load_label_png

    files = sorted((results / "trials" / spec.trial_id / "pseudo").glob("*.png"))
    return {f.name: load_label_png(f) for f in files}


def test_refine_irn_gives_valid_masks_and_resumes_after_training(tmp_path):
    spec = _irn_spec(tmp_path / "cache")
    results = tmp_path / "run"

    def kill_in_mask_loop(stage, done, total):
        if stage == "pseudo_masks" and total == 12 and done:  # IRN trained; writing the masks
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(spec, results, kill_in_mask_loop)
    trial = results / "trials" / spec.trial_id
    assert (trial / "checkpoints" / "irn.pt").exists()
    seen = []
    _run(spec, results, lambda stage, done, total: seen.append((stage, done, total)))
    assert not [s for s in seen if s[0] == "pseudo_masks" and s[2] == IRN_STEPS and s[1]]  # IRN not retrained
    masks = _pseudo_masks(results, spec)
    assert len(masks) == 12
    values = set().union(*(set(m.flatten().tolist()) for m in masks.values()))
    assert values <= set(range(6))  # {0..C}, C = 5 synthetic classes; the walk leaves no 255
    import json

    metrics = json.loads((trial / "state.json").read_text())["stages"]["pseudo_masks"]["metrics"]
    assert metrics["time_irn_s"] > 0 and metrics["params_irn"] > 0 and "mask_miou" in metrics


@pytest.mark.slow
def test_refine_irn_killed_inside_training_resumes_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CHECKPOINT_STEPS", "1")
    spec = _irn_spec(tmp_path / "cache")
    _run(spec, tmp_path / "ref")
    reference = _pseudo_masks(tmp_path / "ref", spec)

    def kill_at_irn_step_3(stage, done, total):
        if stage == "pseudo_masks" and total == IRN_STEPS and done == 3:  # steps 1-2 checkpointed
            raise KeyboardInterrupt

    results = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(spec, results, kill_at_irn_step_3)
    assert (results / "trials" / spec.trial_id / "work" / "irn" / "irn.pt").exists()
    steps = []
    _run(spec, results, lambda stage, done, total: steps.append(done) if stage == "pseudo_masks" and total == IRN_STEPS else None)
    assert [d for d in steps if d] == [3, 4]
    resumed = _pseudo_masks(results, spec)
    assert resumed.keys() == reference.keys()
    assert all((resumed[k] == reference[k]).all() for k in reference)


def test_refine_settings_are_checked():
    from harness.errors import ConfigError
    from harness.refine import check_refine, irn_config

    assert irn_config({"irn": "epochs=5, crop=128"}).crop == 128
    with pytest.raises(ConfigError, match="refine"):
        check_refine({"refine": "irm"})
    with pytest.raises(ConfigError, match="unknown key `epoch`"):
        check_refine({"refine": "irn", "irn": {"epoch": 3}})
    with pytest.raises(ConfigError, match="arch"):
        check_refine({"refine": "irn", "irn": "arch=resnet51"})
    with pytest.raises(ConfigError, match="does not exist"):
        check_refine({"refine": "irn", "irn": {"pretrained": "/nonexistent/r50.pth"}})


def test_voc_suites_use_the_irn_paper_recipe_for_adcam():
    """The voc / paper suites' AD-CAM pseudo masks are IRN with the paper's settings (so the
    report compares 71.7 / 69.0 like for like), and an override changes one key only."""
    import tomllib

    from harness.config import load_suite, parse_overrides
    from harness.sweep import _eval_config, _method_eval
    from methods.common.irn.config import PAPER

    for name in ("voc", "paper"):
        table = tomllib.loads((ROOT / "benchmarks" / f"{name}.toml").read_text())["methods"]["adcam"]
        assert table["refine"] == "irn" and table["irn"] == PAPER, name
    suite = load_suite("voc")
    overrides = parse_overrides(["adcam.irn=epochs=1"])
    values = _method_eval("adcam", suite, overrides, dataclasses.asdict(_eval_config(suite, overrides)))
    assert values["refine"] == "irn" and values["irn"] == {**PAPER, "epochs": "1"}


def test_irn_crf_labels_are_the_same_with_parallel_crf_workers(tmp_path):
    """label_crf=true: the confident-region labels made by 2 CRF worker processes are the
    files one process makes, byte for byte (the CRF is deterministic; order is kept)."""
    from harness.config import load_suite, parse_overrides
    from harness.sweep import plan_trials

    labels = {}
    for workers in (1, 2):
        items = [t for t in TINY if not t.startswith("eval.irn=")] + [
            "eval.irn=crop=64,batch_size=6,epochs=1,steps=4,edge_dim=8,disp_dim=8,label_crf=true", f"eval.crf_workers={workers}"]
        spec = plan_trials(load_suite("synthetic"), ["cam"], [0], parse_overrides(items), None, tmp_path / "cache")[0]
        _run(spec, tmp_path / f"w{workers}")
        folder = tmp_path / f"w{workers}" / "trials" / spec.trial_id / "work" / "irn" / "labels"
        labels[workers] = {f.name: f.read_bytes() for f in sorted(folder.glob("*.png"))}
    assert len(labels[1]) == 12 and labels[1] == labels[2]
