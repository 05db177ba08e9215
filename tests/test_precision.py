"""The shared precision options (methods/common/precision.py): bf16 autocast, channels_last,
torch.compile. Helper semantics on hand-computable inputs, then every method (and the common
segmenter) run end to end on CPU with ``bf16=true`` on tiny configs: finite float32 outputs
of the contract's shapes at the harness boundary."""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from harness.common_seg import CommonSegConfig, CommonSegmenter
from methods import load_all
from methods.base import DatasetInfo, Sample, StageContext
from methods.common.precision import Precision, PrecisionOptions, autocast, to_float32

CPU = torch.device("cpu")
METHODS = load_all()
# 1/3 in bfloat16: 1/3 = 1.010101...b x 2^-2; bf16 keeps 7 fraction bits, 1.0101010|10101...,
# the dropped part (0.10101...b of the last place) is above one half, so it rounds up to
# 1.0101011b x 2^-2 = (1 + 1/4 + 1/16 + 1/64 + 1/128) / 4 = 1.3359375 / 4 = 0.333984375.
THIRD_BF16 = 0.333984375


# -- helpers ----------------------------------------------------------------------------------
def test_to_float32_casts_reduced_precision_through_containers():
    Pair = namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Out:
        x: torch.Tensor
        items: list
        grid: tuple[int, int]

    half = torch.tensor([1.0 / 3.0]).bfloat16()
    out = to_float32(Out(half, [Pair(half, torch.tensor([1], dtype=torch.int64)), {"k": half.half()}], (3, 4)))
    assert isinstance(out, Out) and out.grid == (3, 4)
    assert out.x.dtype == torch.float32 and out.x.item() == THIRD_BF16
    pair = out.items[0]
    assert isinstance(pair, Pair) and pair.a.dtype == torch.float32 and pair.b.dtype == torch.int64
    assert out.items[1]["k"].dtype == torch.float32
    double = torch.tensor([0.1], dtype=torch.float64)
    assert to_float32(double) is double  # float64 and float32 are left as they are
    assert to_float32(None) is None


def test_forward_runs_under_bf16_autocast_and_returns_float32():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0 / 3.0)
    x = torch.ones(1, 1)
    on = Precision.of(PrecisionOptions(bf16=True), CPU).forward(net, x)
    off = Precision.of(PrecisionOptions(), CPU).forward(net, x)
    # bf16: the weight is rounded to bf16 before the matmul (1 * 0.333984375, exact in bf16)
    assert on.dtype == torch.float32 and on.item() == THIRD_BF16
    assert off.dtype == torch.float32 and off.item() == pytest.approx(1.0 / 3.0, abs=1e-7)


def test_autocast_context_toggles_cpu_autocast():
    with autocast(CPU, True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(CPU, False):
        assert not torch.is_autocast_enabled("cpu")


def test_channels_last_formats_weights_and_inputs_and_keeps_the_result():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(2, 3, 9, 7)
    ref = conv(x)
    prec = Precision.of(PrecisionOptions(channels_last=True), CPU)
    prec.module(conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert prec.input(x).is_contiguous(memory_format=torch.channels_last)
    assert prec.input(torch.rand(2, 3)).shape == (2, 3)  # non-4-D values pass through
    out = prec.forward(conv, x)
    assert torch.allclose(out, ref, atol=1e-6)  # same numbers up to float rounding


def test_compile_wraps_the_training_forward_once(monkeypatch):
    calls = []

    def fake_compile(module):
        calls.append(module)
        return lambda *a, **k: module(*a, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = nn.Linear(2, 2)
    assert Precision.of(PrecisionOptions(), CPU).train_forward(net) is net  # off: the module itself
    prec = Precision.of(PrecisionOptions(compile=True), CPU)
    first, second = prec.train_forward(net), prec.train_forward(net)
    assert first is second and calls == [net]  # compiled once per module, reused at every step


def test_every_method_and_the_common_segmenter_share_the_option_names():
    names = {"bf16", "channels_last", "compile"}
    for cls in [METHODS[n].Config for n in ("weaktr", "afa", "adcam", "cam")] + [CommonSegConfig]:
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert {n: fields.get(n) for n in names} == dict.fromkeys(names, False), cls.__name__


# -- every method end to end with bf16 on CPU -----------------------------------------------
CLASSES = ("red", "green", "blue")
INFO = DatasetInfo("tiny", CLASSES, input_size=48)


def _split(n: int = 6, size: int = 48) -> list[Sample]:
    """Coloured squares (1-2 classes per image) on grey noise, with their masks."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]])
    samples = []
    for i in range(n):
        image = rng.integers(90, 140, (size, size, 3)).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for c in rng.choice(3, size=int(rng.integers(1, 3)), replace=False):
            top, left = rng.integers(0, size - 16, 2)
            image[top : top + 16, left : left + 16] = colours[c]
            mask[top : top + 16, left : left + 16] = c + 1
        labels = np.array([(mask == c + 1).any() for c in range(3)], np.float32)
        samples.append(Sample(f"s{i}", image, labels, mask))
    return samples


TINY = {
    "cam": dict(crop=48, seg_crop=48, batch_size=3, seg_batch_size=3, epochs=1, seg_epochs=1, test_scales=(1.0, 0.75)),
    "weaktr": dict(cam_crop=48, cam_batch_size=3, cam_max_steps=2, cam_scales=(1.0,), seg_crop=48, clip_patch=24, window=48,
                   stride=32, seg_batch_size=3, seg_max_steps=2, test_scales=(1.0,), pseudo_crf=False),
    "afa": dict(crop=48, batch_size=2, iterations=5, cls_warmup_iters=1, rw_switch_iter=3, warmup_iters=1, decoder_dim=8,
                par_iters=2, aff_radius=3, cam_scales=(1.0, 0.5), test_scales=(1.0, 0.75)),
    "adcam": dict(crop=32, epochs=1, batch_size=3, top_k=4, seg_iterations=2, seg_batch_size=3, seg_crop=32,
                  test_scales=(0.75, 1.0)),
}  # fmt: skip


def _images(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    return images, torch.stack([torch.from_numpy(s.labels) for s in samples])


def _finite_float32(x: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert x.dtype == torch.float32 and tuple(x.shape) == shape and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["cam", "weaktr", "afa", "adcam"])
def test_every_method_runs_all_stages_with_bf16_on_cpu(name: str, tmp_path: Path):
    method = METHODS[name](METHODS[name].Config(**TINY[name], bf16=True), INFO, CPU)
    assert method.precision.bf16
    metrics: list[tuple[str, float, int]] = []
    ctx = StageContext(CPU, 0, tmp_path, log_metric=lambda n, v, s: metrics.append((n, float(v), s)))
    split = _split()
    method.train_cam(split, ctx)
    images, labels = _images(split[:2])
    cams = method.cams(images, labels)
    _finite_float32(cams, (2, 3, 48, 48))
    assert cams.min() >= 0 and cams.max() <= 1
    masks = method.pseudo_masks(images, cams, labels)
    assert tuple(masks.shape) == (2, 48, 48) and set(masks.unique().tolist()) <= {0, 1, 2, 3, 255}
    if not method.fused_segmentation:
        method.train_seg([dataclasses.replace(s, mask=m.numpy().astype(np.uint8)) for s, m in zip(split, masks)] + split[2:], ctx)
    for multiscale in (False, True):
        _finite_float32(method.segment(images, multiscale=multiscale), (2, 4, 48, 48))
    assert metrics and all(np.isfinite(v) for _, v, _ in metrics)  # the float32 losses stayed finite


@pytest.mark.parametrize("name", ["cam", "weaktr", "afa", "adcam"])
def test_bf16_changes_inference_only_by_rounding(name: str):
    """Same weights with and without bf16: the segmentation logits differ (autocast is really
    on) by less than bf16's rounding allows (inputs rounded at 2^-8 relative, through a few
    layers; bound: 10 % of the largest logit). CAMs are not compared: on an untrained network
    their per-class min-max (and AD-CAM's top-k) amplify any rounding."""
    torch.manual_seed(0)
    fp32 = METHODS[name](METHODS[name].Config(**TINY[name]), INFO, CPU)
    bf16 = METHODS[name](METHODS[name].Config(**TINY[name], bf16=True), INFO, CPU)
    for key, net in bf16.networks().items():
        net.load_state_dict(fp32.networks()[key].state_dict())
    images, labels = _images(_split()[:2])
    a, b = fp32.segment(images), bf16.segment(images)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() <= 0.1 * a.abs().max() + 1e-3


def test_channels_last_keeps_adcam_outputs_up_to_rounding():
    """AD-CAM's Conformer CNN branch and DeepLab-V2: NHWC gives the same network outputs, plain
    CAMs and logits up to float rounding (1e-4 absolute). The diffused CAMs are not compared: on
    an untrained network the co-neighbour top-k has near ties that rounding may flip."""
    torch.manual_seed(0)
    config = dict(TINY["adcam"], refine_mode="plain_cam")
    ref = METHODS["adcam"](METHODS["adcam"].Config(**config), INFO, CPU)
    nhwc = METHODS["adcam"](METHODS["adcam"].Config(**config, channels_last=True), INFO, CPU)
    for key, net in nhwc.networks().items():
        net.load_state_dict(ref.networks()[key].state_dict())
        net.eval()
        ref.networks()[key].eval()
    conv = next(m for m in nhwc.segmenter.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = _images(_split()[:2])
    x = images[..., :32, :32]
    out_ref = ref.precision.forward(ref.cam_net.extract, x, with_attention=True)
    out_nhwc = nhwc.precision.forward(nhwc.cam_net.extract, x, with_attention=True)
    assert torch.allclose(out_ref.cam, out_nhwc.cam, atol=1e-4)
    assert torch.allclose(out_ref.attention, out_nhwc.attention, atol=1e-4)
    assert torch.allclose(ref.cams(images, labels), nhwc.cams(images, labels), atol=1e-4)
    assert torch.allclose(ref.segment(images, multiscale=True), nhwc.segment(images, multiscale=True), atol=1e-4)


@pytest.mark.parametrize("arch", ["deeplab_lite_vit_synth", "deeplab_v2_small"])
def test_common_segmenter_trains_and_segments_with_bf16_and_channels_last(arch: str, tmp_path: Path):
    config = CommonSegConfig(arch=arch, crop=48, epochs=1, batch_size=3, test_scales=(1.0, 0.75), bf16=True, channels_last=True)
    seg = CommonSegmenter(config, INFO, CPU)
    split = _split()
    seg.train(split, StageContext(CPU, 0, tmp_path))
    images, _ = _images(split[:2])
    for multiscale in (False, True):
        _finite_float32(seg.segment(images, multiscale=multiscale), (2, 4, 48, 48))


@pytest.mark.slow
def test_compiled_training_forward_runs_on_cpu(tmp_path: Path):
    """A real torch.compile of the cam baseline's training forwards (slow: compilation)."""
    method = METHODS["cam"](METHODS["cam"].Config(**TINY["cam"], compile=True), INFO, CPU)
    split = _split()
    ctx = StageContext(CPU, 0, tmp_path)
    method.train_cam(split, ctx)
    images, labels = _images(split[:2])
    _finite_float32(method.cams(images, labels), (2, 3, 48, 48))


def test_one_bare_override_sets_bf16_for_every_method():
    """`wsss-bench run ... bf16=true`: the bare key reaches every selected method's config."""
    from harness.config import load_suite, parse_overrides
    from harness.sweep import _method_config

    suite, overrides = load_suite("synthetic"), parse_overrides(["bf16=true"])
    for name in ("weaktr", "afa", "adcam", "cam"):
        values = _method_config(name, METHODS[name], suite, overrides)
        assert values["bf16"] is True and values["channels_last"] is False and values["compile"] is False, name


def test_bf16_on_a_gpu_without_bfloat16_is_refused_with_the_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "TITAN X (Pascal)")
    with pytest.raises(ValueError, match=r"bf16=true: the CUDA device TITAN X \(Pascal\) has no native bfloat16"):
        Precision.of(PrecisionOptions(bf16=True), torch.device("cuda"))
    assert not Precision.of(PrecisionOptions(), torch.device("cuda")).bf16  # off: no check
