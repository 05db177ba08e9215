"""AFA / PAR (``afa``): the pieces on hand-computable inputs, MiT strict loading, and all
stages on a tiny synthetic split (shapes, ranges, determinism)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.afa import AFA, AFAConfig
from methods.afa.labels import (
    affinity_label,
    cam_label,
    combine_high_low,
    par_refine_argmax,
    radius_mask,
    random_walk,
    refine_guide,
    refined_cam_label,
    transition_matrix,
    valid_box,
)
from methods.afa.losses import affinity_loss, balanced_seg_loss, dense_energy_loss, lreg_grid
from methods.afa.method import build_optimizer, long_side_size, schedule_phase, warmup_poly_factor
from methods.afa.model import AFANet, SegFormerHead
from methods.afa.par import PAR
from methods.base import METHODS, DatasetInfo, Sample, StageContext
from methods.common.mit import MIT_ARCHS, create_mit, official_mit_keys

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads oversubscribe the cores
    and small ops get an order of magnitude slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- MiT ----------------------------------------------------------------------------------------

# The official SegFormer mit_b1 ImageNet checkpoint's names, written out for block 1.0 / 4.1
# (what the architecture description gives; the full list is ``official_mit_keys``).
OFFICIAL_B1_SAMPLES = [
    "patch_embed1.proj.weight", "patch_embed1.norm.bias", "patch_embed4.proj.bias",
    "block1.0.norm1.weight", "block1.0.attn.q.weight", "block1.0.attn.kv.weight", "block1.0.attn.sr.weight",
    "block1.0.attn.norm.weight", "block1.0.attn.proj.bias", "block1.0.norm2.bias", "block1.0.mlp.fc1.weight",
    "block1.0.mlp.dwconv.dwconv.weight", "block1.0.mlp.fc2.bias", "block4.1.attn.q.bias", "block4.1.mlp.dwconv.dwconv.bias",
    "norm1.weight", "norm4.bias", "head.weight", "head.bias",
]


def test_official_key_list_of_mit_b1():
    keys = official_mit_keys("mit_b1")
    assert set(OFFICIAL_B1_SAMPLES) <= set(keys)
    # stage 4 has sr_ratio 1: no spatial reduction parameters
    assert not any(k.startswith("block4.") and (".attn.sr." in k or ".attn.norm." in k) for k in keys)
    # 4 x 4 patch-embed + 8 blocks (stages 1-3 with sr: 20 tensors, stage 4: 16) + 8 norm + 2 head
    assert len(keys) == 16 + 2 * 3 * 20 + 2 * 16 + 8 + 2


def test_mit_b1_strict_loads_an_official_format_checkpoint(tmp_path: Path):
    source = create_mit("mit_b1")
    state = source.state_dict()
    assert sorted(state) == sorted(official_mit_keys("mit_b1", with_head=False))
    assert tuple(state["block4.0.attn.q.weight"].shape) == (512, 512)
    assert tuple(state["patch_embed1.proj.weight"].shape) == (64, 3, 7, 7)
    state = dict(state, **{"head.weight": torch.zeros(1000, 512), "head.bias": torch.zeros(1000)})
    path = tmp_path / "mit_b1.pth"
    torch.save(state, path)
    loaded = create_mit("mit_b1", pretrained=path)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    # a renamed key is an error, not a silent partial load
    state["block1.0.attn.query.weight"] = state.pop("block1.0.attn.q.weight")
    torch.save(state, path)
    with pytest.raises(RuntimeError):
        create_mit("mit_b1", pretrained=path)


def test_mit_shapes_and_raw_scores():
    torch.manual_seed(0)
    mit = create_mit("mit_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    out = mit(x, capture=[(4, 0), (4, -1)])
    assert [tuple(f.shape) for f in out.features] == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 160, 4, 4), (1, 256, 4, 4)]
    assert set(out.scores) == {(4, 0), (4, 1)} and out.scores[(4, 1)].shape == (1, 8, 16, 16)
    # the captured scores are q k^T before the 1/sqrt(d) scaling
    block = mit.block4[0]
    with torch.no_grad():
        feats = mit(x, capture=[]).features
        tokens = mit.patch_embed4(feats[2])[0]
        q = block.attn.q(block.norm1(tokens)).view(1, 16, 8, 32).transpose(1, 2)
        k = block.attn.kv(block.norm1(tokens)).view(1, 16, 2, 8, 32)[:, :, 0].transpose(1, 2)
    torch.testing.assert_close(out.scores[(4, 0)], q @ k.transpose(-2, -1))
    # capturing does not change the features (explicit softmax == fused attention)
    torch.testing.assert_close(out.features[-1], feats[-1], rtol=1e-4, atol=1e-5)


def test_vit_run_blocks_scores_extension():
    from methods.common.vit import create_vit, run_blocks

    vit = create_vit("vit_synth", img_size=32).eval()
    out = run_blocks(vit, torch.randn(1, 3, 32, 32), capture=[-1], capture_scores=True)
    attn = vit.blocks[-1].attn
    torch.testing.assert_close((out.scores[3] * attn.scale).softmax(-1), out.attentions[3])


# -- labels -------------------------------------------------------------------------------------


def test_cam_label_two_thresholds():
    cams = torch.tensor([0.9, 0.5, 0.2, 0.6]).view(1, 1, 1, 4).repeat(1, 2, 1, 1)
    cams[0, 1, 0, 0] = 0.95  # class 1 wins at the first pixel
    labels = torch.tensor([[1.0, 1.0]])
    assert cam_label(cams, labels, 0.55, 0.35).tolist() == [[[2, 255, 0, 1]]]
    # an absent class is ignored even when its CAM is high
    assert cam_label(cams, torch.tensor([[1.0, 0.0]]), 0.55, 0.35).tolist() == [[[1, 255, 0, 1]]]


def test_combine_high_low():
    high = torch.tensor([[3, 0, 0, 2]])
    low = torch.tensor([[3, 1, 0, 0]])
    assert combine_high_low(high, low).tolist() == [[3, 255, 0, 2]]


def test_radius_mask_is_chebyshev():
    mask = radius_mask(3, 4, 1)
    assert mask.shape == (12, 12)
    assert mask[0, 5] and not mask[0, 2] and not mask[0, 8]  # (0,0)-(1,1) in; (0,2), (2,0) out
    assert mask.equal(mask.t()) and mask.diagonal().all()


def test_affinity_label_marks_window_and_ignore():
    # 1 x 3 grid, radius 1: tokens 0 and 2 are 2 apart (outside the window)
    label = torch.tensor([[[1, 1, 255]]])
    aff = affinity_label(label, (1, 3), radius=1)[0]
    assert aff.tolist() == [[1, 1, 255], [1, 1, 255], [255, 255, 255]]
    # background pairs are positive, different classes negative
    label = torch.tensor([[[0, 2, 0]]])
    assert affinity_label(label, (1, 3), radius=5)[0].tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_affinity_label_downsamples_nearest():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[:, :4] = 3
    aff = affinity_label(label, (2, 2), radius=8)[0]
    assert aff.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]


def test_affinity_loss_on_a_known_matrix():
    a = torch.tensor([[[0.9, 0.2], [0.2, 0.6]]])
    target = torch.tensor([[[1, 0], [255, 1]]])
    # pos: (0.1 + 0.4) / (2 + 1); neg: 0.2 / (1 + 1)
    expected = 0.5 * 0.5 / 3 + 0.5 * 0.2 / 2
    assert affinity_loss(a, target).item() == pytest.approx(expected)


def test_transition_matrix_normalises_columns():
    a = torch.tensor([[[1.0, 0.5, 0.9], [0.5, 1.0, 0.3], [0.9, 0.3, 1.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])
    t = transition_matrix(a, mask, alpha=2.0, eps=0.1)[0]
    powered = torch.tensor([[1.0, 0.25, 0.0], [0.25, 1.0, 0.09], [0.0, 0.09, 1.0]])
    torch.testing.assert_close(t, powered / (powered.sum(0, keepdim=True) + 0.1))
    torch.testing.assert_close(t.sum(0), torch.tensor([1.25 / 1.35, 1.34 / 1.44, 1.09 / 1.19]))


def test_random_walk_with_identity_affinity():
    cams = torch.tensor([0.8, 0.1]).view(1, 1, 1, 2).repeat(1, 2, 1, 1)  # (1, C=2, 1, 2)
    labels = torch.tensor([[1.0, 0.0]])
    out = random_walk(cams, torch.eye(2)[None], labels, 0.5, torch.ones(2, 2, dtype=torch.bool), alpha=2.0, eps=0.1)
    probs = torch.stack([torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.1])]).softmax(0)  # [bg, class 0]
    assert out.shape == (1, 3, 1, 2)
    torch.testing.assert_close(out[0, :2, 0], probs / 1.1)
    assert out[0, 2].abs().sum() == 0  # absent class stays zero


def test_refined_cam_label_respects_box_and_thresholds():
    images = torch.zeros(1, 3, 16, 16)
    images[:, :, :, 8:] = 1.0  # two flat halves
    cams = torch.zeros(1, 2, 16, 16)
    cams[0, 0, :, 8:] = 1.0  # class 0 on the right half
    labels = torch.tensor([[1.0, 0.0]])
    valid = torch.ones(1, 16, 16, dtype=torch.bool)
    valid[:, 12:] = False
    par = PAR(num_iter=3)
    for region in ("crop", "box"):
        label = refined_cam_label(par, images, cams, labels, valid, 0.55, 0.35, region=region)
        assert valid_box(valid[0]) == (0, 12, 0, 16)
        assert (label[0, 12:] == 255).all()
        assert (label[0, :12, 10:] == 1).all() and (label[0, :12, :6] == 0).all()


def issue_box_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The issue's item-2 case: image zeros 1x3x8x8; one present class, CAM 0 in columns 0-3
    and 3.0 in columns 4-7; valid box rows 0-8, columns 0-4."""
    images = torch.zeros(1, 3, 8, 8)
    cams = torch.zeros(1, 1, 8, 8)
    cams[..., 4:] = 3.0
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[:, :, :4] = True
    return images, cams, torch.ones(1, 1), valid


def test_cam_label_par_runs_on_the_whole_padded_crop():
    """Authors (``refine_cams_with_bkg_v2``): PAR on the whole crop at half size, then 255
    outside the box. By hand, default PAR (48 neighbours, 10 iterations, w2 = 0.01):

    * half size 4x4 (bilinear, exact 2x2 means): [bg 0.55, CAM] is [0.55, 0] in columns 0-1
      and [0.55, 3] in 2-3 -> softmax (bg, class) = (0.6341, 0.3659) and (0.0794, 0.9206).
    * zero image -> the same kernel at every pixel; every row is equal, so PAR acts on the 4
      columns as a Markov chain (offsets clamped by the replicate padding) times (1 + w2)
      per iteration. The chain is symmetric under x -> 3 - x, so its stationary weights put
      1/2 on columns {0, 1} and 1/2 on {2, 3}; 10 iterations with 48 neighbours of which 32
      reach the borders mix it completely: every pixel -> mean over columns * 1.01^10
      (1.10462): bg (0.6341 + 0.0794) / 2 * 1.10462 = 0.3941, class 0.6432 * 1.10462 =
      0.7105 -> the class wins in the box (columns 0-3) although its CAM is 0 there. With
      bg 0.35: class (0.4134 + 0.9324) / 2 > bg -> class too, so the label is 1.
    * ``region="box"`` (this implementation's old behaviour): the box holds only CAM 0 ->
      bg 0.6341 > class 0.3659 (0.5866 > 0.4134 for bg 0.35) everywhere, a constant PAR keeps
      it -> 0."""
    images, cams, labels, valid = issue_box_case()
    par = PAR()
    small_bg_high = torch.tensor([0.6341, 0.6341, 0.0794, 0.0794]).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    refined = par(torch.zeros(1, 3, 4, 4), torch.cat([small_bg_high, 1 - small_bg_high], 1))
    torch.testing.assert_close(refined[0, :, 0, 0], torch.tensor([0.3941, 0.7105]), atol=2e-4, rtol=0)
    crop = refined_cam_label(par, images, cams, labels, valid, 0.55, 0.35)  # default region: crop
    assert (crop[0, :, :4] == 1).all() and (crop[0, :, 4:] == 255).all()
    box = refined_cam_label(par, images, cams, labels, valid, 0.55, 0.35, region="box")
    assert (box[0, :, :4] == 0).all() and (box[0, :, 4:] == 255).all()


def test_random_walk_branch_lets_par_resize_with_aligned_corners():
    """The random-walk branch (authors' ``refine_cams_with_cls_label``) hands the box-sized
    maps to PAR, which resizes them to its half-size kernel with align_corners=True. With 0
    PAR iterations: a 4x4 [bg 0.5, class = columns (0, 0, 0, 1)] -> 2x2 picks the corner
    columns: class (0, 1); back to 4x4 (align_corners=False: source x = (x + 0.5) / 2 - 0.5
    = -0.25, 0.25, 0.75, 1.25 -> clamped) class (0, 0.25, 0.75, 1) -> columns 2-3 class.
    Resizing first with align_corners=False (2x2 means) would give class (0, 0.5) -> (0,
    0.125, 0.375, 0.5): never above bg (0.5 ties go to bg) -> all background."""
    images = torch.zeros(1, 3, 4, 4)
    walked = torch.zeros(1, 2, 4, 4)
    walked[:, 0] = 0.5
    walked[:, 1, :, 3] = 1.0
    keys = torch.ones(1, 2, dtype=torch.bool)
    par = PAR(num_iter=0)
    guide = refine_guide(par, images, None, downscale=2)
    (label,) = par_refine_argmax(par, guide.region("box"), [walked], keys, softmax=False, resize_first=False)
    assert label[0].tolist() == [[0, 0, 1, 1]] * 4
    (first,) = par_refine_argmax(par, guide.region("box"), [walked], keys, softmax=False, resize_first=True)
    assert (first == 0).all()


# -- losses -------------------------------------------------------------------------------------


def test_balanced_seg_loss():
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, 0] = 2.0
    target = torch.tensor([[[0, 1, 2, 255]]])
    ce = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[0, 0]
    expected = 0.5 * (ce[0] + (ce[1] + ce[2]) / 2)
    assert balanced_seg_loss(logits, target).item() == pytest.approx(expected.item())
    # no foreground pixel: the foreground half is 0, not NaN
    only_bg = torch.tensor([[[0, 0, 255, 255]]])
    expected_bg = F.cross_entropy(logits, only_bg, ignore_index=255)  # mean over the 2 bg pixels
    assert balanced_seg_loss(logits, only_bg).item() == pytest.approx(0.5 * expected_bg.item())


def test_dense_energy_loss_on_the_authors_scale():
    """L_reg = 1e-7 / B * sum_b -r^2 sum_k sum_ij G_i S_ki W_ij S_kj on the half-size grid.

    4x4 crop of a constant image -> 2x2 grid (r = 1), cells 2 crop pixels apart: W_ii = 1,
    axis pairs exp(-2^2 / (2 * 100^2)) = exp(-0.0002) = 0.99980, diagonal pairs exp(-8 /
    20000) = 0.99960. Sum over the 16 ordered pairs: 4 + 8 * 0.99980 + 4 * 0.99960 =
    15.99680. S = 0.5 for both classes, target all 255 -> G = 1:
    L = -1e-7 * 2 classes * 0.25 * 15.99680 = -7.9984e-7.
    Gradient (authors' backward) on a grid pixel: -2e-7 * G * (W S_k)_i = -2e-7 * 0.5 *
    (1 + 2 * 0.99980 + 0.99960) = -3.9992e-7; each crop pixel gets 1/4 of it (area mean)."""
    images = torch.zeros(1, 3, 4, 4)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    unlabelled = torch.full((1, 4, 4), 255)
    assert lreg_grid((4, 4), 64) == (2, 2)
    probs = torch.full((1, 2, 4, 4), 0.5, requires_grad=True)
    loss = dense_energy_loss(images, probs, valid, unlabelled)
    assert loss.item() == pytest.approx(-7.9984e-7, rel=1e-5)
    loss.backward()
    torch.testing.assert_close(probs.grad, torch.full_like(probs, -3.9992e-7 / 4), rtol=1e-5, atol=0)
    # gate: a labelled pixel drops out in proportion to its confidence (G = 1 - max S = 0.5)
    assert dense_energy_loss(images, probs, valid, torch.zeros(1, 4, 4, dtype=torch.long)).item() == pytest.approx(
        0.5 * -7.9984e-7, rel=1e-5
    )
    # one-hot and labelled: G = 0 -> 0; outside the box nothing counts
    one_hot = torch.zeros(1, 2, 4, 4)
    one_hot[:, 0] = 1.0
    assert dense_energy_loss(images, one_hot, valid, torch.zeros(1, 4, 4, dtype=torch.long)).item() == 0.0
    assert dense_energy_loss(images, probs, torch.zeros_like(valid), unlabelled).item() == 0.0


def test_dense_energy_loss_coarse_grid_stays_on_the_half_size_scale():
    """16x16 constant image: half size is 8x8; max_side 4 -> a 4x4 grid whose cells are 2x2
    half-size pixels (r = 4), so the sum over 16 x 16 instead of 64 x 64 pairs is scaled by
    r^2 = 16. sigma_xy = 100 >> 16 px: W ~ 1, both sums ~ -(64^2) * 2 * 0.25 * 1e-7 =
    -2.048e-4, and they agree within the kernel's curvature (< 0.1 %)."""
    images = torch.zeros(1, 3, 16, 16)
    valid = torch.ones(1, 16, 16, dtype=torch.bool)
    target = torch.full((1, 16, 16), 255)
    probs = torch.full((1, 2, 16, 16), 0.5)
    assert lreg_grid((16, 16), 64) == (8, 8) and lreg_grid((16, 16), 4) == (4, 4)
    fine = dense_energy_loss(images, probs, valid, target, max_side=64).item()
    coarse = dense_energy_loss(images, probs, valid, target, max_side=4).item()
    assert fine == pytest.approx(-2.048e-4, rel=5e-3)
    assert coarse == pytest.approx(fine, rel=1e-3)


# -- schedule and optimiser ---------------------------------------------------------------------


def test_schedule_switches_at_the_configured_iterations():
    phases = [schedule_phase(step, 3, 6) for step in range(8)]
    assert phases == ["cls"] * 3 + ["cam"] * 3 + ["rw"] * 2


def test_warmup_poly_factor():
    assert warmup_poly_factor(0, 100, 10, warmup_ratio=0.0) == 0.0
    assert warmup_poly_factor(5, 100, 10, warmup_ratio=0.0) == pytest.approx(0.5)
    assert warmup_poly_factor(10, 100, 10) == pytest.approx(0.9)  # poly(1) from step 0
    assert warmup_poly_factor(100, 100, 10) == 0.0


def test_optimizer_groups():
    cfg = AFAConfig(lr=1e-3, head_lr_mult=10.0, weight_decay=0.01)
    net = AFANet("mit_synth", num_classes=3, img_size=32, decoder_dim=8)
    groups = {g["name"]: g for g in build_optimizer(net, cfg).param_groups}
    assert groups["backbone_norm"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.01
    assert groups["heads"]["lr"] == pytest.approx(1e-2) and groups["decoder"]["lr"] == pytest.approx(1e-2)
    # authors: backbone norms at lr 0 (frozen) by default; trained at the backbone lr as an option
    assert groups["backbone_norm"]["lr"] == 0.0 and groups["backbone_norm"]["lr_scale"] == 0.0
    trained = {g["name"]: g for g in build_optimizer(net, AFAConfig(lr=1e-3, freeze_backbone_norms=False)).param_groups}
    assert trained["backbone_norm"]["lr"] == pytest.approx(1e-3)
    assert any(p is net.classifier.weight for p in groups["heads"]["params"])
    n_all = sum(p.numel() for p in net.parameters())
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_all


def test_backbone_norms_stay_frozen_for_the_whole_run():
    """lr_scale 0: set_lr keeps the group at lr 0 through warm-up and poly (as the authors'
    scheduler scales each group's initial lr 0); AdamW with lr 0 and weight decay 0 leaves
    the norms exactly as they were while the other backbone weights move."""
    from methods.common.training import set_lr

    torch.manual_seed(0)
    net = AFANet("mit_synth", num_classes=3, img_size=32, decoder_dim=8)
    optimizer = build_optimizer(net, AFAConfig(lr=1e-2))
    groups = net.param_groups()
    norms_before = [p.detach().clone() for p in groups["backbone_norm"]]
    other_before = [p.detach().clone() for p in groups["backbone"]]
    for step in range(3):
        set_lr(optimizer, 1e-2 * warmup_poly_factor(step, 10, 2))
        out = net(torch.randn(2, 3, 32, 32), affinity=False)
        (out.logits.sum() + out.seg.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, p) for a, p in zip(norms_before, groups["backbone_norm"]))
    assert any(not torch.equal(a, p) for a, p in zip(other_before, groups["backbone"]))


# -- model --------------------------------------------------------------------------------------


def test_segformer_head_stride_and_classes():
    head = SegFormerHead([4, 8, 16], embed_dim=8, num_classes=5).eval()
    out = head([torch.randn(2, 4, 12, 12), torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)])
    assert out.shape == (2, 5, 12, 12)


@pytest.mark.parametrize("backbone, maps", [("mit_synth", 8), ("vit_synth", 6)])
def test_affinity_is_symmetric_in_unit_interval(backbone, maps):
    net = AFANet(backbone, num_classes=3, img_size=48, decoder_dim=8).eval()
    assert net.affinity_proj.in_channels == maps
    out = net(torch.randn(2, 3, 48, 48))
    n = out.grid[0] * out.grid[1]
    assert out.logits.shape == (2, 3) and out.cam.shape == (2, 3, *out.grid)
    assert out.affinity.shape == (2, n, n)
    assert ((out.affinity > 0) & (out.affinity < 1)).all()
    torch.testing.assert_close(out.affinity, out.affinity.transpose(1, 2))


# -- all stages on a tiny synthetic split -------------------------------------------------------


class TinySplit:
    """Squares of two colour-coded classes on a noisy background (labels from the masks)."""

    def __init__(self, n: int, size: int = 48, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.samples = []
        for i in range(n):
            image = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            for c, colour in ((0, (220, 40, 40)), (1, (40, 40, 220))):
                if rng.random() < 0.6 or (c == 1 and not mask.any()):
                    y, x = rng.integers(0, size - 16, 2)
                    image[y : y + 16, x : x + 16] = colour
                    mask[y : y + 16, x : x + 16] = c + 1
            labels = np.array([(mask == c + 1).any() for c in range(2)], np.float32)
            self.samples.append(Sample(id=str(i), image=image, labels=labels, mask=mask))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


TINY = dict(
    crop=48, batch_size=2, iterations=6, cls_warmup_iters=2, rw_switch_iter=4, warmup_iters=2, decoder_dim=8,
    par_iters=3, aff_radius=3, test_scales=(1.0, 0.75), log_every=2,
)


def run_tiny(tmp_path: Path, seed: int = 0, **overrides):
    info = DatasetInfo("tiny", ("red", "blue"), input_size=48)
    method = AFA(AFAConfig(**{**TINY, **overrides}), info, torch.device("cpu"))
    metrics: list[tuple[str, float, int]] = []
    ctx = StageContext(torch.device("cpu"), seed, tmp_path, log_metric=lambda n, v, s: metrics.append((n, v, s)))
    split = TinySplit(6)
    method.train_cam(split, ctx)
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in split.samples[:2]])
    labels = torch.stack([torch.from_numpy(s.labels) for s in split.samples[:2]])
    cams = method.cams(images, labels)
    masks = method.pseudo_masks(images, cams, labels)
    seg = method.segment(images, multiscale=False)
    seg_ms = method.segment(images, multiscale=True)
    return method, metrics, labels, cams, masks, seg, seg_ms


def test_registered_and_fused():
    assert METHODS["afa"] is AFA and AFA.fused_segmentation


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("afa"), seed=1)


def test_all_stages_on_a_tiny_split(tiny_run):
    method, metrics, labels, cams, masks, seg, seg_ms = tiny_run
    assert cams.shape == (2, 2, 48, 48) and cams.min() >= 0 and cams.max() <= 1
    assert (cams[labels == 0] == 0).all()
    assert masks.shape == (2, 48, 48) and masks.dtype == torch.long
    allowed = torch.tensor([0, 1, 2, 255])
    assert torch.isin(masks, allowed).all()
    for b in range(2):  # no absent class in a pseudo mask
        for c in range(2):
            if labels[b, c] == 0:
                assert not (masks[b] == c + 1).any()
    assert seg.shape == seg_ms.shape == (2, 3, 48, 48) and torch.isfinite(seg_ms).all()
    names = {n for n, _, _ in metrics}
    assert {"train_cls", "train_seg", "train_aff", "train_loss"} <= names  # all phases ran
    # state round trip
    clone = AFA(method.config, method.dataset, torch.device("cpu"))
    clone.load_state_dict(method.state_dict())
    x = torch.rand(1, 3, 40, 44)
    assert torch.equal(clone.segment(x), method.segment(x))


def test_same_seed_same_outputs(tiny_run, tmp_path: Path):
    first = tiny_run
    torch.manual_seed(123)  # the global RNG state must not matter
    second = run_tiny(tmp_path, seed=1)
    for a, b in zip(first[3:], second[3:]):
        assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(first[0].net.state_dict().values(), second[0].net.state_dict().values()))


def test_pseudo_mask_modes_and_lreg(tmp_path: Path):
    method, *_ = run_tiny(tmp_path, iterations=5, use_lreg=True, lreg_max_side=24)
    images, labels = torch.rand(1, 3, 40, 36), torch.tensor([[1.0, 0.0]])
    cams = method.cams(images, labels)
    for mode in ("rw", "par", "cam"):
        method.config.pseudo_mask_mode = mode
        masks = method.pseudo_masks(images, cams, labels)
        assert masks.shape == (1, 40, 36) and torch.isin(masks, torch.tensor([0, 1, 255])).all()


def test_deit_backbone_runs(tmp_path: Path):
    method, _, _, cams, masks, seg, _ = run_tiny(tmp_path, backbone="vit_synth", iterations=5)
    assert method.net.affinity_proj.in_channels == 2 * 3
    assert cams.shape == (2, 2, 48, 48) and masks.shape == (2, 48, 48) and seg.shape == (2, 3, 48, 48)


def test_mit_archs_known():
    assert {"mit_b0", "mit_b1", "mit_synth"} <= set(MIT_ARCHS)
    with pytest.raises(ValueError):
        AFA(AFAConfig(backbone="resnet"), DatasetInfo("x", ("a",)), torch.device("cpu"))


def test_suite_recipes_use_config_fields_and_synthetic_is_the_default():
    from harness.config import load_suite

    fields = set(AFAConfig.__dataclass_fields__)
    for suite in ("synthetic", "voc-mini", "voc", "coco"):
        assert set(load_suite(suite).method_params["afa"]) <= fields, suite
    defaults = AFAConfig()
    for key, value in load_suite("synthetic").method_params["afa"].items():
        if key == "pretrained":  # the suite picks the checkpoint ("synthetic"); the config default is none
            continue
        assert getattr(defaults, key) == (tuple(value) if isinstance(value, list) else value), key
    assert set(load_suite("voc").reference["afa"]) <= {"source", "mask_miou_ignore255", "val_miou_ms", "val_miou_ms_crf"}


# -- test resolution (authors' test_msc_flip.py --resize_long 512) ------------------------------


def test_long_side_size():
    # ratio = 512 / 500 = 1.024: 375 * 1.024 = 384, 500 -> 512; 333 * 1.024 = 340.99 -> int 340
    assert long_side_size((375, 500), 512) == (384, 512)
    assert long_side_size((500, 333), 512) == (512, 340)
    assert long_side_size((96, 64), 0) == (96, 64)  # 0 = off
    assert long_side_size((100, 100), 512) == (512, 512)  # small images are enlarged too


class RecordingNet(nn.Module):
    """Stands in for AFANet in ``segment``: records input sizes; its stride-4 logits are a
    constant per class: class 0 = the input width / 100, class 1 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, x, seg=True, affinity=True):
        from types import SimpleNamespace

        self.sizes.append(tuple(x.shape))
        B, _, h, w = x.shape
        logits = torch.zeros(B, 2, h // 4, w // 4)
        logits[:, 0] = w / 100
        return SimpleNamespace(seg=logits)


@pytest.mark.parametrize("long_side", [0, 64])
def test_segment_resizes_the_long_side_first(long_side):
    """48 x 36 images, test_long_side 64: ratio 64 / 48 -> 64 x 48 into the network (0: as is).
    Multi-scale (1.0, 0.5) x flip: 64 x 48 and int(0.5 * side) = 32 x 24, each as a batch of
    image + flip; max over scales at the scale-1 grid -> class 0 = 48 / 100 = 0.48 (0.5x gives
    0.24); logits back at 48 x 36."""
    info = DatasetInfo("tiny", ("a",), input_size=48)
    method = AFA(AFAConfig(decoder_dim=8, test_scales=(1.0, 0.5), test_long_side=long_side), info, torch.device("cpu"))
    method.net = RecordingNet()
    images = torch.rand(1, 3, 48, 36)
    single = method.segment(images)
    multi = method.segment(images, multiscale=True)
    h, w = (64, 48) if long_side else (48, 36)
    assert method.net.sizes == [(1, 3, h, w), (2, 3, h, w), (2, 3, h // 2, w // 2)]
    assert single.shape == multi.shape == (1, 2, 48, 36)
    torch.testing.assert_close(multi[:, 0], torch.full((1, 48, 36), w / 100))


def test_affinity_label_source_switch(monkeypatch):
    """After the switch the affinity label comes from the CAM label (authors' VOC script) by
    default, from the random-walk label with ``aff_from_rw_label`` (their COCO script); before
    the switch always from the CAM label. The two labels are stubbed as constants 1 and 2."""
    import methods.afa.method as afa_method

    seen: list[int] = []
    real_affinity_label = afa_method.affinity_label
    monkeypatch.setattr(afa_method, "refined_cam_label", lambda *a, **k: torch.ones(2, 48, 48, dtype=torch.long))
    monkeypatch.setattr(afa_method, "random_walk_label", lambda *a, **k: torch.full((2, 48, 48), 2, dtype=torch.long))

    def recording(label, grid, radius):
        seen.append(int(label.unique().item()))
        return real_affinity_label(label, grid, radius)

    monkeypatch.setattr(afa_method, "affinity_label", recording)
    info = DatasetInfo("tiny", ("red", "blue"), input_size=48)
    images, labels, valid = torch.rand(2, 3, 48, 48), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.ones(2, 48, 48, dtype=torch.bool)
    for from_rw, expected in ((False, [1, 1]), (True, [1, 2])):
        seen.clear()
        method = AFA(AFAConfig(**{**TINY, "aff_from_rw_label": from_rw}), info, torch.device("cpu"))
        method.training_step(images, labels, valid, step=2)  # "cam" phase
        method.training_step(images, labels, valid, step=4)  # "rw" phase
        assert seen == expected, from_rw
