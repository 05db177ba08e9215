"""AD-CAM: diffusion equations on hand-computable inputs, the Conformer (size, official names,
strides, stop-gradient), the DeepLab-V2 head, and all five stages on a tiny fake split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from methods.adcam import ADCAM, ADCAMConfig
from methods.adcam.diffusion import (
    adcam_refine,
    co_neighbour_similarity,
    diffuse,
    patch_attention,
    refine_attention,
    row_normalize,
    top_k_mask,
)
from methods.adcam.model import ConformerCAM, ViTCAM
from methods.base import DatasetInfo, Sample, StageContext
from methods.common.conformer import Conformer, create_conformer, load_conformer_checkpoint
from methods.common.deeplab import ASPP_RATES, DeepLabV2

# -- Eq. 6: co-neighbour similarity ----------------------------------------------------------


def uniform_rows(sets: list[set[int]], n_tokens: int) -> torch.Tensor:
    """Row i attends with equal weight 1/|P_i| to the tokens of P_i."""
    a = torch.zeros(1, len(sets), n_tokens, dtype=torch.float64)
    for i, members in enumerate(sets):
        a[0, i, sorted(members)] = 1.0 / len(members)
    return a


@pytest.mark.parametrize("overlap", [0, 1, 2, 3, 4])
def test_similarity_of_uniform_rows_is_theorem_4_1(overlap: int) -> None:
    """Theorem 4.1: i, j attend uniformly (1/n) to n neighbours each -> S_ij = 2J / (1 + J),
    J = |P & Q| / |P | Q| (here also = |P & Q| / n)."""
    n = 4
    p = set(range(n))
    q = set(range(n - overlap, 2 * n - overlap))
    s = co_neighbour_similarity(uniform_rows([p, q], 2 * n))
    jaccard = len(p & q) / len(p | q)
    expected = 2 * jaccard / (1 + jaccard)
    assert s[0, 0, 1].item() == pytest.approx(expected, abs=1e-12)
    assert s[0, 0, 1].item() == pytest.approx(overlap / n, abs=1e-12)
    assert s[0, 0, 0].item() == pytest.approx(1.0) and s[0, 1, 1].item() == pytest.approx(1.0)


def test_similarity_matches_the_sum_definition() -> None:
    """Eq. 6 written as the explicit sum S_ij = sum_k sqrt(A_ik A_jk)."""
    a = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64).softmax(-1)
    s = co_neighbour_similarity(a)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                assert s[b, i, j].item() == pytest.approx(sum(math.sqrt(a[b, i, k] * a[b, j, k]) for k in range(5)))
    assert torch.all(s <= 1 + 1e-12)  # Cauchy-Schwarz for row-stochastic A


# -- Eq. 7: TOP-k and refinement ---------------------------------------------------------------


def test_top_k_keeps_exactly_k_largest_per_row() -> None:
    s = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(1))
    mask = top_k_mask(s, 3)
    assert torch.equal(mask.sum(-1), torch.full((3, 7), 3.0))
    kept_min = s.masked_fill(mask == 0, float("inf")).amin(-1)
    dropped_max = s.masked_fill(mask == 1, float("-inf")).amax(-1)
    assert torch.all(kept_min > dropped_max)
    assert torch.equal(top_k_mask(s, 50).sum(-1), torch.full((3, 7), 7.0))  # k capped at N


def test_refinement_cuts_attention_between_different_neighbourhoods() -> None:
    """Two groups {0, 1}, {2, 3}; token 0 also attends 0.1 to token 2. S_01 = 2 sqrt(.45 * .5)
    = 0.949 > S_02 = S_03 = sqrt(.1 * .5) = 0.224, so with k = 2 row 0 keeps {0, 1}:
    A~_0 = [.45, .45, 0, 0] / 0.9 = [.5, .5, 0, 0]."""
    a = torch.tensor(
        [[[0.45, 0.45, 0.1, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]]],
        dtype=torch.float64,
    )
    s = co_neighbour_similarity(a)
    assert s[0, 0, 1].item() == pytest.approx(2 * math.sqrt(0.45 * 0.5))
    assert s[0, 0, 2].item() == pytest.approx(math.sqrt(0.1 * 0.5))
    refined = refine_attention(a, k=2)
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(refined[0], expected)


def test_refined_rows_sum_to_one_with_at_most_k_entries() -> None:
    a = torch.randn(2, 30, 30, generator=torch.Generator().manual_seed(2)).mul(3).softmax(-1)
    refined = refine_attention(a, k=5)
    assert torch.allclose(refined.sum(-1), torch.ones(2, 30), atol=1e-6)
    assert torch.all((refined > 0).sum(-1) <= 5)
    assert torch.all(refined >= 0)


def test_patch_attention_drops_prefix_and_renormalises() -> None:
    """cls row/col dropped; 'renorm': [.2, .6] / .8 = [.25, .75], [.25, .25] / .5 = [.5, .5];
    'raw' keeps the patch block as is."""
    full = torch.tensor([[[0.4, 0.3, 0.3], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]])
    assert torch.allclose(patch_attention(full, 1, "renorm")[0], torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    assert torch.allclose(patch_attention(full, 1, "raw")[0], torch.tensor([[0.2, 0.6], [0.25, 0.25]]))


# -- Eq. 8: diffusion ------------------------------------------------------------------------------


def test_diffusion_directions_by_hand() -> None:
    """A~ = [[.5, .5], [0, 1]], M = [1, 0]. push (A~^T M): [.5, .5], then [.25, .75] (mass 1
    kept); pull (A~ M): [.5, 0]."""
    a = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    m = torch.tensor([[[1.0, 0.0]]])
    assert torch.allclose(diffuse(m, a, 1, "push"), torch.tensor([[[0.5, 0.5]]]))
    assert torch.allclose(diffuse(m, a, 2, "push"), torch.tensor([[[0.25, 0.75]]]))
    assert torch.allclose(diffuse(m, a, 1, "pull"), torch.tensor([[[0.5, 0.0]]]))
    assert torch.equal(diffuse(m, a, 0, "push"), m)


def test_diffusion_spreads_a_part_over_its_object() -> None:
    """4x4 grid; the object is columns 0-1 (8 tokens). Every token attends uniformly to the
    tokens of its own region, plus 0.2 of spurious attention from object token 1 to
    background token 2. The CAM fires on token (0, 0) only. With k = 8 the refinement drops the
    spurious entry (token 2's neighbourhood is the background), and one push step gives every
    object token 1/8 and the background 0; diffusion with A itself (T = 2) leaks
    1/8 (token 0 -> 1) * 0.2 (1 -> 2) onto token 2."""
    region = torch.tensor([[1, 1, 0, 0]] * 4).flatten()
    same = (region[:, None] == region[None, :]).float()
    a = same / same.sum(-1, keepdim=True)
    a[1] = 0.8 * a[1]
    a[1, 2] += 0.2
    cams = torch.zeros(1, 1, 16)
    cams[0, 0, 0] = 1.0
    out = adcam_refine(cams, a[None], "adcam", top_k=8, steps=1)[0, 0]
    assert torch.allclose(out, region.float() / 8)
    leaked = adcam_refine(cams, a[None], "diffusion_only", steps=2)[0, 0]
    assert leaked[2] > 0  # 1/8 (0 -> 1) * 0.2 (1 -> 2)
    assert leaked[2].item() == pytest.approx(0.2 / 8)


@pytest.mark.parametrize("direction", ["push", "pull"])
@pytest.mark.parametrize("mode", ["adcam", "diffusion_only", "plain_cam"])
def test_identity_attention_leaves_cam_unchanged(mode: str, direction: str) -> None:
    cams = torch.rand(2, 3, 9, generator=torch.Generator().manual_seed(3))
    eye = torch.eye(9).expand(2, 9, 9)
    out = adcam_refine(cams, eye, mode=mode, top_k=4, steps=2, direction=direction)  # type: ignore[arg-type]
    assert torch.allclose(out, cams)


def test_refine_modes_differ_as_specified() -> None:
    """diffusion_only = M A A (T = 2, push); adcam = M A~ A~; plain_cam = M."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(1, 12, 12, generator=gen).mul(2).softmax(-1)
    cams = torch.rand(1, 2, 12, generator=gen)
    assert torch.allclose(adcam_refine(cams, a, "diffusion_only", steps=2), cams @ a @ a)
    refined = row_normalize(top_k_mask(co_neighbour_similarity(a), 3) * a)
    assert torch.allclose(adcam_refine(cams, a, "adcam", top_k=3, steps=2), cams @ refined @ refined)
    assert torch.equal(adcam_refine(cams, a, "plain_cam"), cams)


# -- Conformer ---------------------------------------------------------------------------------------


def test_conformer_s_has_37_7m_parameters_and_official_names() -> None:
    model = create_conformer("conformer_s")  # 1000-class heads
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(37.7e6, abs=0.1e6)
    keys = set(model.state_dict())
    for key in (
        "conv1.weight", "bn1.running_var", "conv_1.residual_conv.weight", "trans_patch_conv.weight",
        "trans_1.attn.qkv.weight", "conv_trans_2.cnn_block.conv2.weight", "conv_trans_5.cnn_block.residual_bn.bias",
        "conv_trans_9.squeeze_block.conv_project.weight", "conv_trans_9.squeeze_block.ln.weight",
        "conv_trans_9.expand_block.conv_project.bias", "conv_trans_9.expand_block.bn.running_mean",
        "conv_trans_12.fusion_block.conv3.weight", "conv_trans_12.fusion_block.residual_conv.weight",
        "conv_trans_12.trans_block.mlp.fc2.weight", "trans_norm.weight", "trans_cls_head.weight",
        "conv_cls_head.weight", "cls_token",
    ):  # fmt: skip
        assert key in keys, key
    assert not any(k.startswith("conv_trans_13") for k in keys)
    # A state dict from a second instance (a stand-in for the official file) loads strictly.
    other = create_conformer("conformer_s", last_stage="stride1")
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(other.conv_trans_12.fusion_block.conv3.weight, model.conv_trans_12.fusion_block.conv3.weight)


def test_checkpoint_file_loads_strictly_and_replaces_heads(tmp_path: Path) -> None:
    source = create_conformer("conformer_tiny")  # 1000-class heads, like ImageNet weights
    path = tmp_path / "conformer.pth"
    torch.save({"model": source.state_dict()}, path)
    target = create_conformer("conformer_tiny", num_classes=5, pretrained=path)
    assert torch.equal(target.conv_trans_6.trans_block.attn.qkv.weight, source.conv_trans_6.trans_block.attn.qkv.weight)
    assert target.conv_cls_head.weight.shape == (5, 128)
    broken = dict(source.state_dict(), **{"conv_trans_7.extra.weight": torch.zeros(1)})
    torch.save(broken, path)
    with pytest.raises(ValueError, match="unexpected"):
        load_conformer_checkpoint(create_conformer("conformer_tiny"), path)


@pytest.mark.parametrize("last_stage, cnn_side, blocks", [("stride2", 3, 6), ("stride1", 6, 6), ("drop", 6, 5)])
def test_last_stage_options(last_stage: str, cnn_side: int, blocks: int) -> None:
    """Tiny Conformer (token stride 8) on 48 px: 6x6 tokens; the CNN map is 3x3 with the
    original stride-2 last block, on the token grid otherwise; 'drop' skips conv_trans_6."""
    model = create_conformer("conformer_tiny", num_classes=5, last_stage=last_stage).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 48, 48), capture=[0, -1], attention_mean=True)
    assert feats.grid == (6, 6) and feats.cnn.shape == (2, 128, cnn_side, cnn_side)
    assert model.num_transformer_blocks == blocks and sorted(feats.attentions) == [0, blocks - 1]
    assert feats.attentions[0].shape == (2, 2, 37, 37)  # 2 heads, cls + 36 tokens
    assert torch.allclose(feats.attention_mean.sum(-1), torch.ones(2, 37), atol=1e-5)
    with torch.no_grad():
        every = model.forward_features(torch.randn(1, 3, 48, 48), capture=range(blocks), attention_mean=True)
    expected_mean = torch.stack([a.mean(1) for a in every.attentions.values()]).mean(0)
    assert torch.allclose(every.attention_mean, expected_mean, atol=1e-6)


def _branch_grads(model: Conformer, head: int) -> dict[str, bool]:
    """Which branches receive a non-zero gradient from one head's loss."""
    model.zero_grad(set_to_none=True)
    logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    logits[head].square().sum().backward()
    reached = {"cnn": False, "transformer": False}
    for name, p in model.named_parameters():
        if p.grad is not None and bool(p.grad.abs().sum() > 0):
            reached[model.branch_of(name)] = True
    return reached


def test_stop_gradient_blocks_cross_branch_gradients() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_conformer("conformer_tiny", num_classes=3, last_stage="stride1", stop_gradient=True)
    assert _branch_grads(model, 0) == {"cnn": True, "transformer": False}  # CNN head
    assert _branch_grads(model, 1) == {"cnn": False, "transformer": True}  # transformer head
    model.stop_gradient = False
    assert _branch_grads(model, 0) == {"cnn": True, "transformer": True}
    assert _branch_grads(model, 1) == {"cnn": True, "transformer": True}


def test_branch_assignment() -> None:
    assert Conformer.branch_of("conv_trans_3.squeeze_block.ln.weight") == "transformer"
    assert Conformer.branch_of("conv_trans_3.expand_block.bn.weight") == "cnn"
    assert Conformer.branch_of("conv_trans_3.trans_block.attn.qkv.weight") == "transformer"
    assert Conformer.branch_of("conv_trans_3.fusion_block.conv2.weight") == "cnn"
    assert Conformer.branch_of("trans_patch_conv.weight") == "transformer"
    assert Conformer.branch_of("conv1.weight") == "cnn"


def test_cam_is_classifier_applied_per_position() -> None:
    """GAP commutes with the linear head: mean over positions of the CAM + bias = CNN logits."""
    net = ConformerCAM(num_classes=4, last_stage="drop", base_channel=16, channel_ratio=2, embed_dim=96, depth=6,
                       num_heads=3, patch_size=8, stage_strides=(2, 1)).eval()  # fmt: skip
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        out = net.extract(x)
        cnn_logits, _ = net(x)
    assert out.cam.shape == (1, 4, 5, 6) and out.attention.shape == (1, 31, 31)
    assert torch.allclose(out.cam.mean((-2, -1)) + net.conv_cls_head.bias, cnn_logits, atol=1e-5)


# -- DeepLab-V2 --------------------------------------------------------------------------------------------


def test_deeplab_v2_aspp_and_output_stride() -> None:
    net = DeepLabV2(6, "small").eval()
    assert [c.dilation[0] for c in net.classifier.convs] == list(ASPP_RATES) == [6, 12, 18, 24]
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        feats = net.backbone.forward_features(x)
        assert net.forward_logits(x).shape == (1, 6, 8, 10)  # output stride 8
        assert torch.allclose(net.classifier(feats), sum(conv(feats) for conv in net.classifier.convs))
        assert net(x).shape == (1, 6, 64, 80)


def test_deeplab_v2_r101_builds_dilated() -> None:
    net = DeepLabV2(21, "deeplab_v2_r101")
    assert net.backbone.layer3[0].conv2.stride == (1, 1) and net.backbone.layer4[1].conv2.dilation == (4, 4)
    assert sum(p.numel() for p in net.backbone.parameters()) == pytest.approx(42.5e6, rel=0.01)


# -- the method on a tiny fake split -----------------------------------------------------------------------


class FakeSplit:
    """Squares of class colours on grey noise; 2 classes present per image at most."""

    def __init__(self, n: int, size: int, num_classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        colours = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [230, 220, 40]])[:num_classes]
        self.samples = []
        for i in range(n):
            image = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            labels = np.zeros(num_classes, np.float32)
            for c in rng.choice(num_classes, size=rng.integers(1, 3), replace=False):
                side = int(rng.integers(size // 4, size // 2))
                top, left = rng.integers(0, size - side, 2)
                image[top : top + side, left : left + side] = colours[c]
                mask[top : top + side, left : left + side] = c + 1
            for c in np.unique(mask[mask > 0]):
                labels[c - 1] = 1.0
            self.samples.append(Sample(f"s{i}", image, labels, mask))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


INFO = DatasetInfo("fake", ("red", "green", "blue"), input_size=32)
FAST = dict(crop=32, epochs=1, batch_size=4, top_k=4, seg_iterations=2, seg_batch_size=4, seg_crop=32,
            test_scales=(0.75, 1.0))  # fmt: skip


def run_stages(tmp_path: Path, seed: int = 0, **overrides) -> tuple[ADCAM, torch.Tensor, torch.Tensor, torch.Tensor]:
    split = FakeSplit(8, 32, 3)
    method = ADCAM(ADCAMConfig(**{**FAST, **overrides}), INFO, torch.device("cpu"))
    ctx = StageContext(device=torch.device("cpu"), seed=seed, workdir=tmp_path)
    method.train_cam(split, ctx)
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in split.samples[:3]])
    labels = torch.stack([torch.from_numpy(s.labels) for s in split.samples[:3]])
    cams = method.cams(images, labels)
    masks = method.pseudo_masks(images, cams, labels)
    pseudo = [Sample(s.id, s.image, s.labels, m.numpy().astype(np.uint8)) for s, m in zip(split.samples, masks)]
    method.train_seg(pseudo * 2, ctx)
    return method, images, cams, masks


def check_outputs(method: ADCAM, images: torch.Tensor, cams: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> None:
    B, C = labels.shape
    assert cams.shape == (B, C, 32, 32) and cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert torch.all(cams[labels == 0] == 0)
    present_max = cams.flatten(2).amax(-1)[labels > 0]
    # each present map is divided by its max (or is all zero when ReLU left nothing)
    assert torch.all(((present_max - 1).abs() < 1e-3) | (present_max == 0))
    assert masks.shape == (B, 32, 32) and masks.dtype == torch.int64
    allowed = {0, 255} | {c + 1 for b in range(B) for c in range(C) if labels[b, c] > 0}
    assert set(masks.unique().tolist()) <= allowed
    for multiscale in (False, True):
        logits = method.segment(images, multiscale)
        assert logits.shape == (B, C + 1, 32, 32) and torch.isfinite(logits).all()


@pytest.mark.parametrize("backbone", ["conformer_tiny", "vit_synth"])
def test_all_stages_run_with_correct_shapes(tmp_path: Path, backbone: str) -> None:
    method, images, cams, masks = run_stages(tmp_path, backbone=backbone)
    labels = torch.stack([torch.from_numpy(s.labels) for s in FakeSplit(8, 32, 3).samples[:3]])
    check_outputs(method, images, cams, masks, labels)


def test_same_seed_gives_identical_outputs(tmp_path: Path) -> None:
    a = run_stages(tmp_path / "a", seed=3)
    b = run_stages(tmp_path / "b", seed=3)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    for net in ("cam_net", "segmenter"):
        sa, sb = a[0].state_dict()[net], b[0].state_dict()[net]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a[0].segment(a[1], True), b[0].segment(b[1], True))
    c = run_stages(tmp_path / "c", seed=4)
    assert not torch.equal(a[2], c[2])


def test_cams_on_odd_sizes_and_options(tmp_path: Path) -> None:
    """Image sides that are not multiples of the token stride, multi-scale CAMs, the stride-2
    last stage (CAM resized to the token grid), 'pull' diffusion and the pseudo-mask CRF."""
    method = ADCAM(
        ADCAMConfig(**FAST, last_stage="stride2", cam_scales=[1.0, 0.5], diffusion_direction="pull", pseudo_crf=True),
        INFO,
        torch.device("cpu"),
    )
    assert method.config.cam_scales == (1.0, 0.5)
    images = torch.rand(2, 3, 37, 45, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    cams = method.cams(images, labels)
    assert cams.shape == (2, 3, 37, 45) and cams.min() >= 0 and cams.max() <= 1
    assert torch.all(cams[labels == 0] == 0)
    masks = method.pseudo_masks(images, cams, labels)
    assert masks.shape == (2, 37, 45) and set(masks[1].unique().tolist()) <= {0, 2}
    assert method.segment(images, True).shape == (2, 4, 37, 45)
    assert set(method.macs_inputs()) == set(method.networks())


def test_state_dict_round_trip(tmp_path: Path) -> None:
    method = run_stages(tmp_path, epochs=1)[0]
    fresh = ADCAM(ADCAMConfig(**FAST), INFO, torch.device("cpu"))
    fresh.load_state_dict(method.state_dict())
    images = torch.rand(1, 3, 32, 32)
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.equal(fresh.cams(images, labels), method.cams(images, labels))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="refine_mode"):
        ADCAMConfig(refine_mode="tscam")
    with pytest.raises(ValueError, match="backbone"):
        ADCAMConfig(backbone="resnet50")
    assert isinstance(ADCAMConfig(test_scales=[1.0, 1.5]).test_scales, tuple)


def test_vit_variant_stop_gradient_detaches_cam_head_input() -> None:
    net = ViTCAM("vit_synth", 3, 32, stop_gradient=True)
    cnn_logits, _ = net(torch.randn(1, 3, 32, 32))
    cnn_logits.sum().backward()
    assert net.cam_head.weight.grad is not None
    assert all(p.grad is None for n, p in net.named_parameters() if n.startswith("vit."))


def test_optimiser_recipe_per_branch() -> None:
    """Sec. 5.1: AdamW; transformer branch at a constant lr_vit, CNN branch poly(0.9) from
    lr_cnn: at step 50 of 100 the CNN lr is 5e-4 * 0.5^0.9; no decay on 1-D params / cls token."""
    method = ADCAM(ADCAMConfig(lr_vit=2e-4, lr_cnn=5e-4, weight_decay=1e-4), INFO, torch.device("cpu"))
    opt = method._cam_optimizer()
    assert isinstance(opt, torch.optim.AdamW)
    method._set_cam_lr(opt, 50, 100)
    lrs = {(g["branch"], g["weight_decay"]): g["lr"] for g in opt.param_groups}
    assert lrs[("transformer", 1e-4)] == lrs[("transformer", 0.0)] == 2e-4
    assert lrs[("cnn", 1e-4)] == pytest.approx(5e-4 * 0.5**0.9)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(method.cam_net.cls_token) in no_decay and id(method.cam_net.conv1.weight) not in no_decay
    branch_of = {id(p): g["branch"] for g in opt.param_groups for p in g["params"]}
    assert branch_of[id(method.cam_net.conv_trans_3.squeeze_block.conv_project.weight)] == "transformer"
    assert branch_of[id(method.cam_net.conv_trans_3.expand_block.conv_project.weight)] == "cnn"
    assert len(branch_of) == sum(1 for _ in method.cam_net.parameters())
