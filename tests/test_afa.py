"""AFA / PAR (``afa``): the pieces on hand-computable inputs, MiT strict loading, and all
stages on a tiny synthetic split (shapes, ranges, determinism)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.afa import AFA, AFAConfig
from methods.afa.labels import (
    affinity_label,
    cam_label,
    combine_high_low,
    radius_mask,
    random_walk,
    refined_cam_label,
    transition_matrix,
    valid_box,
)
from methods.afa.losses import affinity_loss, balanced_seg_loss, dense_energy_loss
from methods.afa.method import build_optimizer, schedule_phase, warmup_poly_factor
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
    label = refined_cam_label(par, images, cams, labels, valid, 0.55, 0.35)
    assert valid_box(valid[0]) == (0, 12, 0, 16)
    assert (label[0, 12:] == 255).all()
    assert (label[0, :12, 10:] == 1).all() and (label[0, :12, :6] == 0).all()


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


def test_dense_energy_loss():
    images = torch.zeros(1, 3, 8, 8)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    one_class = torch.zeros(1, 2, 8, 8)
    one_class[:, 0] = 1.0
    assert dense_energy_loss(images, one_class, valid).item() == pytest.approx(0.0, abs=1e-6)
    # uniform probabilities over 2 classes: P(disagree) = 1 - sum_k 0.25 = 0.5
    assert dense_energy_loss(images, torch.full((1, 2, 8, 8), 0.5), valid).item() == pytest.approx(0.5)
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    dense_energy_loss(images, logits.softmax(1), valid).backward()
    assert logits.grad.abs().sum() > 0


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
    assert any(p is net.classifier.weight for p in groups["heads"]["params"])
    n_all = sum(p.numel() for p in net.parameters())
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_all


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
        assert getattr(defaults, key) == (tuple(value) if isinstance(value, list) else value), key
    assert set(load_suite("voc").reference["afa"]) <= {"source", "mask_miou_ignore255", "val_miou_ms", "val_miou_ms_crf"}
