"""WeakTr: each algorithm piece on hand-computable inputs, checkpoint loading, and all five
stages end to end on a tiny synthetic split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from methods.base import DatasetInfo, Sample, StageContext
from methods.weaktr import WeakTr, WeakTrConfig
from methods.weaktr.aaf import (
    AdaptiveAttentionFusion, fuse_weighted, mean_sum_fusion, pooled_head_features, split_heads_interleaved,
)
from methods.weaktr.augment import SegAugment
from methods.weaktr.cam import fine_cam, multiscale_cams, scaled_size, split_attention, weaktr_loss
from methods.weaktr.gradient_clipping import clip_loss_map, clip_thresholds, gradient_clipping_loss
from methods.weaktr.method import refine_seed_crf
from methods.weaktr.model import WeakTrCAMNet
from methods.weaktr.segmenter import segment_probs, sliding_window_logits, view_size, window_anchors

# -- adaptive attention fusion -------------------------------------------------------------------


def test_split_heads_is_interleaved():
    branch = torch.arange(6.0).view(1, 1, 6)  # one token, D = 6, H = 3
    heads = split_heads_interleaved(branch, 3)
    assert heads.shape == (1, 3, 1, 2)
    assert heads[0, :, 0].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]  # head j: channels j, j+3


def test_pooled_head_features_index_is_head_times_layers_plus_layer():
    K, H, B, T, D = 2, 3, 1, 4, 6
    # layer k, channel c: value 10 * k + c on token 0, smaller elsewhere -> max over tokens is token 0
    branches = [torch.zeros(B, T, D) for _ in range(K)]
    for k in range(K):
        branches[k][0, 0] = 10.0 * k + torch.arange(D)
    feats = pooled_head_features(branches, H)
    assert feats.shape == (B, H * K, D // H)
    for h in range(H):
        for k in range(K):
            assert feats[0, h * K + k].tolist() == [10.0 * k + h, 10.0 * k + h + H]


def test_fuse_weighted_multiplies_every_head_map_by_its_weight():
    K, H, B, T = 2, 3, 2, 7
    maps = H * K
    attentions = [torch.zeros(B, H, T, T) for _ in range(K)]
    for h in range(H):
        for k in range(K):
            attentions[k][:, h, 0, h * K + k] = 1.0  # map i marks entry (0, i) only
    weights = torch.rand(B, maps)
    fused = fuse_weighted(attentions, weights)
    assert fused.shape == (B, T, T)
    torch.testing.assert_close(fused[:, 0, :maps], weights / maps)  # (1/KH) * w_i for every head i
    assert fused[:, 1:].abs().sum() == 0


def test_aaf_module_shapes_and_its_weights_scale_each_head():
    K, H, B, T, D = 3, 2, 2, 8, 8
    aaf = AdaptiveAttentionFusion(num_layers=K, num_heads=H, head_dim=D // H)
    attentions = [torch.zeros(B, H, T, T) for _ in range(K)]
    for h in range(H):
        for k in range(K):
            attentions[k][:, h, 1, h * K + k] = 1.0
    branches = [torch.randn(B, T, D) for _ in range(K)]
    fused, weights = aaf(attentions, branches)
    assert fused.shape == (B, T, T) and weights.shape == (B, H * K)
    assert ((weights > 0) & (weights < 1)).all()  # sigmoid output
    torch.testing.assert_close(fused[:, 1, : H * K], weights / (H * K))
    # weights depend on the branch features (the code's prior), not on the attention maps
    _, other = aaf(attentions, [b * 2 + 1 for b in branches])
    assert not torch.allclose(weights, other)


@pytest.mark.parametrize("prior", ["attention_avg", "attention_max", "random_fixed"])
def test_aaf_paper_priors_run(prior):
    aaf = AdaptiveAttentionFusion(num_layers=2, num_heads=2, head_dim=4, hidden=18, prior=prior)
    attn = [torch.softmax(torch.randn(1, 2, 5, 5), -1) for _ in range(2)]
    fused, w = aaf(attn, [torch.randn(1, 5, 8) for _ in range(2)])
    assert fused.shape == (1, 5, 5) and w.shape == (1, 4)


def test_mean_sum_fusion_averages_heads_and_sums_layers():
    a0 = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)  # layer 0: heads 1, 3 -> mean 2
    a1 = torch.tensor([0.0, 4.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)  # layer 1: heads 0, 4 -> mean 2
    assert torch.equal(mean_sum_fusion([a0, a1]), torch.full((1, 2, 2), 4.0))


# -- CAMs ------------------------------------------------------------------------------------


def test_split_attention_slices_class_rows_and_patch_block():
    C, grid = 2, (1, 3)
    T = C + 3
    fused = torch.arange(float(T * T)).view(1, T, T)
    cross, patch = split_attention(fused, C, grid)
    assert cross.shape == (1, C, 1, 3) and patch.shape == (1, 3, 3)
    assert cross[0, 1, 0].tolist() == [7.0, 8.0, 9.0]  # row 1, columns 2..4
    assert patch[0, 0].tolist() == [12.0, 13.0, 14.0]  # row 2, columns 2..4


def test_fine_cam_is_patch_attention_times_cross_attention_times_relu_coarse():
    coarse = torch.tensor([[[[-1.0, 2.0]]]], requires_grad=True)  # C = 1, grid 1 x 2
    cross = torch.tensor([[[[0.5, 0.25]]]])
    patch = torch.tensor([[[0.2, 0.8], [0.6, 0.4]]], requires_grad=True)
    fine = fine_cam(coarse, cross, patch)
    # cams = CA * ReLU(coarse) = [0, 0.5]; fine_i = sum_j PA[i, j] cams_j = [0.8 * 0.5, 0.4 * 0.5]
    torch.testing.assert_close(fine, torch.tensor([[[[0.4, 0.2]]]]))
    fine.sum().backward()
    assert coarse.grad is None  # coarse CAM is detached: the fine loss trains only the fusion
    assert patch.grad is not None


def test_weaktr_loss_sums_three_multilabel_soft_margin_losses():
    labels = torch.tensor([[1.0, 0.0]])
    zero = torch.zeros(1, 2)
    loss, parts = weaktr_loss(zero, zero, zero, labels)
    # MLSM at logit 0 is log 2 per class; three losses
    torch.testing.assert_close(loss, torch.tensor(3 * np.log(2.0), dtype=torch.float32))
    assert set(parts) == {"cls", "coarse", "fine"}


def test_fine_loss_trains_only_the_fusion_module():
    torch.manual_seed(0)
    net = WeakTrCAMNet(num_classes=3, img_size=32)
    out = net(torch.randn(4, 3, 32, 32))
    assert out.coarse_cam.shape == (4, 3, 4, 4) and out.fine_cam.shape == (4, 3, 4, 4)
    assert out.head_weights.shape == (4, net.num_layers * net.num_heads)
    F.multilabel_soft_margin_loss(out.fine_logits, torch.ones(4, 3)).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is None for p in net.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.aaf.parameters())


def test_mean_sum_ablation_network_has_no_fusion_parameters():
    net = WeakTrCAMNet(num_classes=3, img_size=32, aaf=False)
    out = net(torch.randn(1, 3, 32, 32))
    assert net.aaf is None and out.head_weights is None
    assert (out.fine_cam >= 0).all()


def test_multiscale_cams_flip_back_and_minmax():
    # A fake CAM function: class 0 = patch-averaged red channel, class 1 = constant.
    def cam_fn(x: torch.Tensor) -> torch.Tensor:
        red = F.avg_pool2d(x[:, :1], 4)
        return torch.cat([red, torch.ones_like(red)], dim=1)

    image = torch.zeros(1, 3, 16, 16)
    image[..., :8] = 1.0  # left half red
    cams = multiscale_cams(cam_fn, image, torch.tensor([[1.0, 0.0]]), scales=(1.0,), flip=True, patch_size=4)
    assert cams.shape == (1, 2, 16, 16)
    assert cams[0, 1].abs().sum() == 0  # absent class is exactly zero
    # the flipped view is flipped back, so left stays high, right low
    assert cams[0, 0, :, :4].min() > 0.99 and cams[0, 0, :, 12:].max() < 1e-6
    assert cams.min() >= 0 and cams.max() <= 1


def test_scaled_size_rounds_to_patch_multiple():
    assert scaled_size((96, 96), 1.2, 8) == (112, 112)  # 115.2 -> 14.4 patches -> 14 * 8
    assert scaled_size((10, 100), 0.1, 8) == (8, 8)


# -- gradient clipping -------------------------------------------------------------------------

LOSS_MAP = torch.tensor(
    [[0.0, 0.0, 1.0, 3.0], [0.0, 4.0, 1.0, 3.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
)[None]
# S = 2 patch means: TL 1, TR 2, BL 1, BR 0; global mean 1 -> thresholds TL 1, TR 2, BL 1, BR 1.
THRESHOLDS = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])


def test_clip_thresholds_are_max_of_patch_mean_and_global_mean():
    torch.testing.assert_close(clip_thresholds(LOSS_MAP, 2), THRESHOLDS)
    # the local means are taken over the batch average: a zero map halves them (and g)
    torch.testing.assert_close(clip_thresholds(torch.cat([LOSS_MAP, torch.zeros_like(LOSS_MAP)]), 2), THRESHOLDS / 2)


def test_gradient_is_zero_exactly_where_loss_exceeds_threshold():
    loss_map = LOSS_MAP.clone().requires_grad_(True)
    result = clip_loss_map(loss_map, tau=1.5, patch_size=2)  # g = 1 <= tau: clipping active
    assert result.clipped and result.global_mean == 1.0
    torch.testing.assert_close(result.loss, torch.tensor(11.0 / 16))  # mean(min(L, threshold))
    result.loss.backward()
    above = LOSS_MAP[0] > THRESHOLDS
    assert above.sum() == 3  # the 4 in TL and the two 3s in TR; ties (BL ones) keep their gradient
    assert (loss_map.grad[0][above] == 0).all()
    assert (loss_map.grad[0][~above] == 1.0 / 16).all()
    assert result.clipped_fraction == 3 / 16


def test_nothing_clipped_when_global_mean_exceeds_tau():
    loss_map = LOSS_MAP.clone().requires_grad_(True)
    result = clip_loss_map(loss_map, tau=0.5, patch_size=2)  # g = 1 > tau
    assert not result.clipped
    result.loss.backward()
    assert (loss_map.grad == 1.0 / 16).all()
    torch.testing.assert_close(result.loss, torch.tensor(1.0))


def test_gradient_clipping_loss_on_logits_zeroes_high_loss_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, 0] = 255  # ignored pixel: loss 0, counted in the means like the code
    ce = F.cross_entropy(logits.detach(), target, ignore_index=255, reduction="none")
    result = gradient_clipping_loss(logits, target, tau=10.0, patch_size=2)
    result.loss.backward()
    above = ce > clip_thresholds(ce, 2)
    assert above.any() and (~above).any()
    grad_norm = logits.grad.abs().sum(dim=1)
    assert (grad_norm[above] == 0).all()
    valid = (~above) & (target != 255)
    assert (grad_norm[valid] > 0).all()


def test_crop_not_multiple_of_clip_patch_raises_clear_error():
    with pytest.raises(ValueError, match="multiple of the clipping patch size S=48"):
        gradient_clipping_loss(torch.zeros(1, 2, 100, 96), torch.zeros(1, 100, 96, dtype=torch.long), 1.2, 48)
    with pytest.raises(ValueError, match="multiple of the clipping patch size"):
        WeakTr(WeakTrConfig(seg_crop=96, clip_patch=40), _info(), torch.device("cpu"))


# -- segmentation inference ----------------------------------------------------------------------


def test_window_anchors_follow_stride_and_end_flush():
    assert window_anchors(168, 96, 64) == [0, 64, 72]
    assert window_anchors(96, 96, 64) == [0]
    assert window_anchors(480, 480, 320) == [0]


def test_sliding_window_average_reconstructs_identity_model():
    def identity(crop, all_blocks=False):
        return [crop, crop] if all_blocks else crop

    image = torch.rand(1, 2, 10, 13)
    (out,) = sliding_window_logits(identity, image, window=4, stride=3, two_block=False)
    torch.testing.assert_close(out, image)
    small = torch.rand(1, 2, 3, 3)  # smaller than the window: padded and cropped back
    (out,) = sliding_window_logits(identity, small, window=4, stride=3, two_block=False)
    torch.testing.assert_close(out, small)


def test_two_block_combination_is_weighted_sum_of_probabilities():
    l1 = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    l2 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)

    def model(crop, all_blocks=False):
        return [l1[..., : crop.shape[-2], : crop.shape[-1]], l2[..., : crop.shape[-2], : crop.shape[-1]]]

    probs = segment_probs(model, torch.zeros(1, 3, 4, 4), (1.0,), False, window=4, stride=4, two_block=True)
    expected = (0.8 * l1.softmax(1) + l2.softmax(1)) / 1.8
    torch.testing.assert_close(probs, expected)


def test_test_size_upscales_to_window_and_uses_base_size():
    assert view_size((96, 96), 0, 0.5, 96) == (96, 96)
    assert view_size((96, 96), 0, 1.25, 96) == (120, 120)
    assert view_size((375, 500), 520, 1.0, 480) == (520, 693)


# -- pseudo labels, augmentation -----------------------------------------------------------------


def test_pseudo_label_crf_keeps_only_background_and_present_classes():
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    image[:, 12:] = 255
    seed = np.zeros((24, 24), dtype=np.int64)
    seed[:, 12:] = 3  # class index 2 -> label 3
    seed[:2, :2] = 3
    labels = np.array([0.0, 0.0, 1.0, 0.0])
    out = refine_seed_crf(image, seed, labels)
    assert set(np.unique(out)) <= {0, 3}
    assert (out[:, 14:] == 3).all() and (out[4:, :10] == 0).all()
    assert (refine_seed_crf(image, np.zeros_like(seed), np.zeros(4)) == 0).all()


def test_seg_augment_is_seeded():
    image, mask = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8), torch.randint(0, 3, (40, 50), dtype=torch.uint8)
    aug = SegAugment(crop=32)
    a = aug(image, mask, torch.Generator().manual_seed(3))
    b = aug(image, mask, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (3, 32, 32) and a[1].shape == (32, 32)


# -- pretrained checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("rule, mode, antialias", [
    ("offset_bicubic", "bicubic", False),  # WeakTr's default: the authors' main.py resize (no antialias)
    ("timm", "bicubic", True),  # timm's resize, as before
    ("bilinear", "bilinear", False),  # the authors' Segmenter resize
])
def test_single_cls_token_checkpoint_expands_cls_and_position_embeddings(tmp_path: Path, rule, mode, antialias):
    # A DeiT-style checkpoint with the official parameter names, for vit_synth at a 4x4 grid.
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=8, embed_dim=96, depth=4,
        num_heads=3,
    )
    state = source.state_dict()
    torch.manual_seed(1)
    state["cls_token"] = torch.randn(1, 1, 96)
    state["pos_embed"] = torch.randn(1, 1 + 16, 96)
    path = tmp_path / "deit_like.pth"
    torch.save({"model": state}, path)

    net = WeakTrCAMNet(num_classes=5, img_size=48, pretrained=str(path), pos_resample=rule)  # 6x6 grid, 5 class tokens
    bb = net.backbone
    assert bb.cls_token.shape == (1, 5, 96) and bb.pos_embed.shape == (1, 5 + 36, 96)
    assert torch.equal(bb.cls_token, state["cls_token"].expand(1, 5, 96))
    assert torch.equal(bb.pos_embed[:, :5], state["pos_embed"][:, :1].expand(1, 5, 96))
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, 96).permute(0, 3, 1, 2)
    # resized to the 6x6 size by the rule's load-time kernel (timm: antialias=True, which is
    # PIL's a = -0.5 bicubic kernel even when upsampling; the authors' code: a = -0.75, no antialias)
    expected = F.interpolate(grid, size=(6, 6), mode=mode, align_corners=False, antialias=antialias)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 36, 96)
    torch.testing.assert_close(bb.pos_embed[:, 5:], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(bb.blocks[2].attn.qkv.weight, state["blocks.2.attn.qkv.weight"])

    state["blocks.0.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not match"):
        WeakTrCAMNet(num_classes=5, img_size=48, pretrained=str(path))


def test_random_init_draws_distinct_class_tokens():
    bb = WeakTrCAMNet(num_classes=4, img_size=32).backbone
    assert bb.cls_token.shape == (1, 4, 96)
    assert not torch.allclose(bb.cls_token[:, 0], bb.cls_token[:, 1])
    assert not torch.allclose(bb.pos_embed[:, 0], bb.pos_embed[:, 1])


# -- all five stages -----------------------------------------------------------------------------

CLASSES = ("square", "stripe", "dot")


def _info() -> DatasetInfo:
    return DatasetInfo("tiny", CLASSES, input_size=48)


class TinySource:
    """Six 48x48 images: coloured shapes of three classes on a grey background."""

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.samples = []
        colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]], dtype=np.uint8)
        for i in range(n):
            image = np.full((48, 48, 3), 120, dtype=np.uint8)
            mask = np.zeros((48, 48), dtype=np.uint8)
            labels = np.zeros(3, dtype=np.float32)
            for c in rng.choice(3, size=1 + i % 2, replace=False):
                top, left = rng.integers(0, 28, size=2)
                image[top : top + 18, left : left + 18] = colours[c]
                mask[top : top + 18, left : left + 18] = c + 1
            for c in np.unique(mask)[1:]:
                labels[c - 1] = 1.0
            self.samples.append(Sample(id=str(i), image=image, labels=labels, mask=mask))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def _config(**overrides) -> WeakTrConfig:
    base = dict(
        cam_crop=48, cam_batch_size=3, cam_max_steps=2, cam_scales=(1.0, 1.2), seg_crop=48, clip_patch=24, window=48,
        stride=32, seg_batch_size=3, seg_max_steps=2, test_scales=(1.0, 1.25),
    )
    base.update(overrides)
    return WeakTrConfig(**base)


def _batch(source: TinySource) -> tuple[torch.Tensor, torch.Tensor]:
    from methods.base import stack_samples

    return stack_samples([source[i] for i in range(len(source))])


def test_all_five_stages_run_with_correct_shapes_and_ranges(tmp_path: Path):
    source = TinySource()
    method = WeakTr(_config(), _info(), torch.device("cpu"))
    ctx = StageContext(device=torch.device("cpu"), seed=0, workdir=tmp_path)
    method.train_cam(source, ctx)
    images, labels = _batch(source)
    cams = method.cams(images, labels)
    assert cams.shape == (6, 3, 48, 48) and cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert (cams[labels == 0] == 0).all()
    masks = method.pseudo_masks(images, cams, labels)
    assert masks.shape == (6, 48, 48) and masks.dtype == torch.int64
    for b in range(6):
        allowed = {0} | {c + 1 for c in np.flatnonzero(labels[b].numpy())}
        assert set(masks[b].unique().tolist()) <= allowed
    for b, sample in enumerate(source.samples):
        sample.mask = masks[b].numpy().astype(np.uint8)
    method.train_seg(source, ctx)
    for multiscale in (False, True):
        logits = method.segment(images[:2], multiscale=multiscale)
        assert logits.shape == (2, 4, 48, 48) and torch.isfinite(logits).all()
        torch.testing.assert_close(logits.softmax(1).sum(1), torch.ones(2, 48, 48))
    # state round trip
    fresh = WeakTr(_config(), _info(), torch.device("cpu"))
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.segment(images[:2]), method.segment(images[:2]))
    assert fresh.crf_params().bilateral_sxy == 83.0
    assert set(fresh.macs_inputs()) == {"cam_net", "segmenter"}


def test_same_seed_gives_identical_cams_and_another_seed_differs(tmp_path: Path):
    source = TinySource()
    images, labels = _batch(source)

    def run(seed: int) -> torch.Tensor:
        method = WeakTr(_config(cam_scales=(1.0,), cam_flip=False), _info(), torch.device("cpu"))
        method.train_cam(source, StageContext(device=torch.device("cpu"), seed=seed, workdir=tmp_path))
        return method.cams(images, labels)

    first, second, other = run(0), run(0), run(1)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


# -- issue 12: position-embedding rule, COCO pseudo-label CRF, oracle CAM epoch, "+CRF" input ----


@pytest.fixture(scope="module")
def zeroed_vit():
    """deit_tiny at img 32, patch 16: native grid 2x2 whose patch positions hold [[0, 1], [2, 3]]
    in every channel, class position 0, patch embedding zeroed, so a token is its position."""
    from methods.common.vit import create_vit

    vit = create_vit("deit_tiny", 32).eval()
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.bias.zero_()
        vit.pos_embed.zero_()
        vit.pos_embed[:, 1:] = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 4, 1)
    return vit


def _patch_positions(vit, rule: str, height: int, width: int) -> list[float]:
    from methods.common.vit import embed

    vit.pos_resample = rule  # what create_vit(pos_resample=rule) stores
    with torch.no_grad():
        tokens = embed(vit, torch.zeros(1, 3, height, width))
    assert torch.equal(tokens[0, 1:], tokens[0, 1:, :1].expand_as(tokens[0, 1:]))  # every channel alike
    return tokens[0, 1:, 0].tolist()


def test_offset_bicubic_position_rule_matches_the_authors_minimal_case(zeroed_vit):
    # Input 16x32 -> grid 1x2. scale = ((1 + 0.1) / 2, (2 + 0.1) / 2) = (0.55, 1.05); source
    # coordinate (i + 0.5) / scale - 0.5: row 0.40909, columns -0.02381 and 0.92857. Bicubic
    # (A = -0.75, borders replicated) on the separable value 2 * row + col:
    #   row 0.40909 (t = 0.40909, taps 0,0,1,1): 1 - w(-1) - w(0) = 1 + 0.10713 - 0.70903 = 0.39810
    #   col -0.02381 (t = 0.97619, taps 0,0,0,1): w(2) = 1 + 0.00041 - 0.01870 - 0.99874 = -0.01703
    #   col 0.92857 (t = 0.92857, taps 0,0,1,1): 1 + 0.00355 - 0.06077 = 0.94278
    # -> (2 * 0.39810 - 0.01703, 2 * 0.39810 + 0.94278) = (0.77918, 1.73899).
    assert _patch_positions(zeroed_vit, "offset_bicubic", 16, 32) == pytest.approx([0.77918, 1.73899], abs=1e-4)
    # timm: resized to 1x2 with antialiasing: the two rows averaged -> 2 * 0.5 + (0, 1) = (1, 2).
    assert _patch_positions(zeroed_vit, "timm", 16, 32) == pytest.approx([1.0, 2.0], abs=1e-6)
    # bilinear to 1x3 (16x48): row source 0.5 -> 1.0; columns (j + 0.5) * 2 / 3 - 0.5 =
    # -0.1667 (clamped to 0), 0.5, 1.1667 (clamped to 1) -> 0, 0.5, 1 -> (1.0, 1.5, 2.0).
    assert _patch_positions(zeroed_vit, "bilinear", 16, 48) == pytest.approx([1.0, 1.5, 2.0], abs=1e-6)
    # the native grid is used as is by every rule (the code's early exit)
    for rule in ("offset_bicubic", "timm", "bilinear"):
        assert _patch_positions(zeroed_vit, rule, 32, 32) == pytest.approx([0.0, 1.0, 2.0, 3.0], abs=1e-6)


def test_weaktr_uses_the_authors_position_rules_and_others_keep_timms():
    from methods.common.vit import create_vit

    method = WeakTr(_config(), _info(), torch.device("cpu"))
    assert method.cam_net.backbone.pos_resample == "offset_bicubic"  # authors' models.py
    assert method.segmenter.encoder.pos_resample == "bilinear"  # authors' segm/model/utils.py
    method = WeakTr(_config(pos_resample="timm", seg_pos_resample="timm"), _info(), torch.device("cpu"))
    assert method.cam_net.backbone.pos_resample == method.segmenter.encoder.pos_resample == "timm"
    assert create_vit("vit_synth", 32).pos_resample == "timm"  # cam, afa, adcam, common_seg
    with pytest.raises(ValueError, match="pos_resample must be one of"):
        WeakTr(_config(pos_resample="nearest"), _info(), torch.device("cpu"))


def test_pseudo_label_crf_kernels_are_config_fields(monkeypatch):
    from methods.base import CRFParams
    import methods.weaktr.method as weaktr_method

    voc = WeakTr(_config(), _info(), torch.device("cpu")).pseudo_crf_params()
    assert voc == CRFParams(4.0, 3.0, 83.0, 5.0, 3.0, 10)  # the code's VOC kernels
    coco_values = dict(
        pseudo_crf_gaussian_sxy=3.0, pseudo_crf_gaussian_compat=3.0, pseudo_crf_bilateral_sxy=50.0,
        pseudo_crf_bilateral_srgb=5.0, pseudo_crf_bilateral_compat=10.0,
    )
    method = WeakTr(_config(**coco_values), _info(), torch.device("cpu"))
    assert method.pseudo_crf_params() == CRFParams(3.0, 3.0, 50.0, 5.0, 10.0, 10)
    seen = []
    real = weaktr_method.dense_crf_labels
    monkeypatch.setattr(weaktr_method, "dense_crf_labels", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    images, labels = torch.rand(1, 3, 8, 8), torch.tensor([[1.0, 0.0, 0.0]])
    method.pseudo_masks(images, torch.rand(1, 3, 8, 8) * labels[:, :, None, None], labels)
    assert seen == [CRFParams(3.0, 3.0, 50.0, 5.0, 10.0, 10)]
    # With both kernels' compat 0 there is no pairwise term: mean field keeps softmax(-unary),
    # whose argmax is each pixel's seed label (gt_prob 0.7 > 0.3), so even an isolated 2x2
    # seed survives (the default kernels smooth it away).
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    seed = np.zeros((24, 24), dtype=np.int64)
    seed[:2, :2] = 3
    plain = CRFParams(4.0, 0.0, 83.0, 5.0, 0.0, 10)
    assert np.array_equal(refine_seed_crf(image, seed, np.array([0.0, 0.0, 1.0]), 0.7, plain), seed)


def test_coco_suite_sets_the_authors_coco_pseudo_label_crf():
    import tomllib

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    coco = tomllib.loads((root / "coco.toml").read_text())["methods"]["weaktr"]
    assert {k: coco[k] for k in coco if k.startswith("pseudo_crf_") and k != "pseudo_crf_gt_prob"} == {
        "pseudo_crf_gaussian_sxy": 3.0, "pseudo_crf_gaussian_compat": 3.0, "pseudo_crf_bilateral_sxy": 50.0,
        "pseudo_crf_bilateral_srgb": 5.0, "pseudo_crf_bilateral_compat": 10.0,
    }
    WeakTrConfig(**coco)  # every key is a config field
    paper = tomllib.loads((root / "paper.toml").read_text())["methods"]["weaktr"]
    assert paper["cam_epoch_selection"] == "oracle"  # the paper recipe; the fair suites keep "last"
    for fair in ("voc", "coco", "voc-mini", "synthetic", "same-backbone"):
        table = tomllib.loads((root / f"{fair}.toml").read_text()).get("methods", {}).get("weaktr", {})
        assert table.get("cam_epoch_selection", "last") == "last", fair


class _ScriptedScores:
    """A StageContext.score_cams stand-in: returns the scripted scores in turn and keeps a copy
    of the CAM network's state at each call."""

    def __init__(self, method: WeakTr, scores: list[float]) -> None:
        self.method, self.scores, self.states = method, list(scores), []

    def __call__(self) -> float:
        assert not self.method.cam_net.training  # scored in eval mode
        self.states.append({k: v.clone() for k, v in self.method.cam_net.state_dict().items()})
        return self.scores[len(self.states) - 1]


@pytest.mark.parametrize("scores, expected_epoch", [([10.0, 30.0, 30.0], 2), ([5.0, 1.0, 7.0], 3)])
def test_oracle_cam_epoch_selection_keeps_the_best_scoring_epoch(tmp_path: Path, scores, expected_epoch):
    # 6 images, batch 3 -> 2 steps per epoch, 3 epochs: scored after steps 2, 4, 6; the first
    # strict maximum wins (a tie keeps the earlier epoch, as the code's `>`).
    source = TinySource()
    method = WeakTr(_config(cam_epochs=3, cam_max_steps=0, cam_epoch_selection="oracle"), _info(), torch.device("cpu"))
    logged = []
    ctx = StageContext(device=torch.device("cpu"), seed=0, workdir=tmp_path, log_metric=lambda n, v, s: logged.append((n, v, s)))
    # train_cam rebuilds the network, so the scorer reads method.cam_net at call time
    ctx.score_cams = scorer = _ScriptedScores(method, scores)
    method.train_cam(source, ctx)
    assert len(scorer.states) == 3
    final = method.cam_net.state_dict()
    assert all(torch.equal(final[k], scorer.states[expected_epoch - 1][k]) for k in final)
    assert [(n, v, s) for n, v, s in logged if n == "cam/epoch_miou"] == [("cam/epoch_miou", v, e + 1) for e, v in enumerate(scores)]
    assert ("cam_selected_epoch", float(expected_epoch), 6) in logged
    assert ("cam_selected_miou", max(scores), 6) in logged
    assert not method.cam_net.training


def test_last_epoch_selection_never_scores_and_oracle_needs_the_callback(tmp_path: Path):
    def forbidden() -> float:
        raise AssertionError("the default must not look at pixel labels")

    method = WeakTr(_config(), _info(), torch.device("cpu"))
    assert method.config.cam_epoch_selection == "last"
    method.train_cam(TinySource(), StageContext(device=torch.device("cpu"), seed=0, workdir=tmp_path, score_cams=forbidden))
    oracle = WeakTr(_config(cam_epoch_selection="oracle"), _info(), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="StageContext.score_cams"):
        oracle.train_cam(TinySource(), StageContext(device=torch.device("cpu"), seed=0, workdir=tmp_path))


def test_runner_score_cams_scores_the_current_cams_on_cam_eval(tmp_path: Path):
    from harness.config import load_suite, parse_overrides
    from harness.runner import TrialRunner
    from harness.sweep import plan_trials

    tiny = ["dataset.num_train=8", "dataset.num_val=4", "dataset.image_size=48"]
    spec = plan_trials(load_suite("synthetic"), ["weaktr"], [0], parse_overrides(tiny), None, tmp_path / "cache")[0]
    runner = TrialRunner(spec, tmp_path / "results")

    class ZeroCams:  # every pixel background at every threshold (a CAM must exceed t strictly)
        def cams(self, images, labels):
            return torch.zeros(images.shape[0], labels.shape[1], *images.shape[-2:])

    runner._method = ZeroCams()
    assert runner._context("train_cam").score_cams is not None
    # Prediction all background: IoU(bg) = #GT bg pixels / #labelled pixels, IoU = 0 for every
    # foreground class in GT (the "present" convention averages over classes in GT or prediction).
    split = runner.split("cam_eval")
    gt = np.concatenate([split[i].mask.ravel() for i in range(len(split))])
    gt = gt[gt != 255]
    expected = 100.0 * (gt == 0).mean() / len(np.unique(gt))
    assert runner._score_cams() == pytest.approx(expected, abs=1e-6)


def test_code_crf_input_is_the_unnormalised_prediction_over_its_classes():
    from methods.weaktr.method import code_crf_inputs

    # two pixels, three classes (normalised, as segment() returns them): argmax 0 and 2
    probs = np.array([[0.5, 0.0], [0.3, 0.3], [0.2, 0.7]], dtype=np.float32).reshape(3, 1, 2)
    unary, classes = code_crf_inputs(probs, 1.8)
    assert classes.tolist() == [0, 2]
    # 1.8 x rows 0 and 2: (0.9, 0) and (0.36, 1.26); the 0 clipped up to 1e-5 (unary_from_softmax)
    np.testing.assert_allclose(unary.reshape(2, 2), [[0.9, 1e-5], [0.36, 1.26]], rtol=1e-6)
    method = WeakTr(_config(), _info(), torch.device("cpu"))  # two_block with weight 0.8 -> 1.8
    np.testing.assert_allclose(method.crf_inputs(probs)[0], unary)
    one_block = WeakTr(_config(two_block=False), _info(), torch.device("cpu"))  # plain softmax: x 1
    np.testing.assert_allclose(one_block.crf_inputs(probs)[0].reshape(2, 2), [[0.5, 1e-5], [0.2, 0.7]], rtol=1e-6)
    harness_default = WeakTr(_config(crf_protocol="softmax"), _info(), torch.device("cpu"))
    same, every = harness_default.crf_inputs(probs)
    assert same is probs and every.tolist() == [0, 1, 2]


def test_runner_crf_flush_maps_crf_labels_back_to_classes():
    from types import SimpleNamespace

    from harness.evaluation import SegmentationMetric
    from harness.runner import TrialRunner
    from methods.base import CRFParams
    from methods.weaktr.method import code_crf_inputs

    # No pairwise term (compat 0): the CRF keeps argmax(unary). Pixel 0 predicts class 0, pixel 1
    # class 2; the CRF sees labels (0, 2) as indices (0, 1), so index 1 must map back to class 2.
    probs = np.array([[0.5, 0.1], [0.3, 0.2], [0.2, 0.7]], dtype=np.float32).reshape(3, 1, 2)
    image, target = np.zeros((1, 2, 3), dtype=np.uint8), np.array([[0, 2]], dtype=np.uint8)
    flat = CRFParams(gaussian_compat=0.0, bilateral_compat=0.0)
    for hook in ({"crf_inputs": lambda p: code_crf_inputs(p, 1.8)}, {}):  # WeakTr's, the default
        segmenter = SimpleNamespace(crf_params=lambda: flat, **hook)
        runner = SimpleNamespace(_segmenter=lambda: segmenter, eval={"crf_workers": 1})
        metric = SegmentationMetric(num_classes=2)
        images, all_probs, targets = [image], [probs], [target]
        TrialRunner._crf_flush(runner, metric, images, all_probs, targets)
        assert not images and not all_probs and not targets  # the buffers are emptied
        confusion = metric.compute().confusion
        assert confusion[0, 0] == 1 and confusion[2, 2] == 1 and confusion.sum() == 2
