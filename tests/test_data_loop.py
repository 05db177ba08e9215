"""The training data path (methods/common/data.py) and mid-stage checkpoints (loop.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from methods.base import Sample, StageContext
from methods.common.data import StepKeys, batches_per_epoch, epoch_order, training_batches
from methods.common.loop import ResumableLoop
from methods.common.training import CropAugment
from methods.weaktr.augment import SegAugment


class ListSource:
    """Random images of varying size with masks: what a real split hands a loader."""

    def __init__(self, n: int = 10, classes: int = 3, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.samples = []
        for i in range(n):
            h, w = 20 + 3 * (i % 4), 24 + 2 * (i % 3)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = rng.integers(0, classes + 1, (h, w)).astype(np.uint8)
            labels = np.zeros(classes, np.float32)
            labels[i % classes] = 1
            self.samples.append(Sample(f"s{i}", image, labels, mask))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def _all(source, workers: int, start: int = 0, total: int = 7, augment=None):
    augment = augment or CropAugment(16, (0.7, 1.3))
    return list(training_batches(source, 3, augment, seed=5, total_steps=total, start_step=start, with_masks=True, num_workers=workers))


@pytest.mark.parametrize("recipe", ["crop", "timm"])
def test_batches_do_not_depend_on_the_number_of_workers(recipe):
    # timm's RandAugment picks its ops from numpy's global RNG, torchvision's crops from
    # Python's and torch's: each is seeded per sample, or a worker's stream would leak in.
    from methods.weaktr.augment import TimmCamAugment

    source = ListSource()
    augment = TimmCamAugment(16) if recipe == "timm" else None
    serial, parallel = _all(source, 0, augment=augment), _all(source, 2, augment=augment)
    assert [s for s, _ in serial] == list(range(7))
    for (s0, a), (s1, b) in zip(serial, parallel, strict=True):
        assert s0 == s1 and a.indices == b.indices
        assert torch.equal(a.images, b.images) and torch.equal(a.valid, b.valid) and torch.equal(a.labels, b.labels)
        assert (a.masks is None and b.masks is None) if recipe == "timm" else torch.equal(a.masks, b.masks)


@pytest.mark.parametrize("recipe", ["crop", "timm"])
def test_a_resumed_loader_continues_with_the_same_batches(recipe):
    from methods.weaktr.augment import TimmCamAugment

    source = ListSource()
    augment = TimmCamAugment(16) if recipe == "timm" else None
    full = _all(source, 0, augment=augment)
    np.random.seed(123)  # a resumed process's global streams are elsewhere: they must not leak in
    resumed = _all(source, 0, start=4, augment=augment)
    assert [s for s, _ in resumed] == [4, 5, 6]
    for (_, a), (_, b) in zip(full[4:], resumed, strict=True):
        assert a.indices == b.indices and torch.equal(a.images, b.images)


def test_epochs_and_their_orders():
    # 10 samples, batch 3, drop_last: 3 batches per epoch; step 3 starts epoch 1.
    assert batches_per_epoch(10, 3) == 3 and batches_per_epoch(10, 3, drop_last=False) == 4
    assert batches_per_epoch(2, 3) == 1  # fewer samples than a batch: one partial batch
    batches = _all(ListSource(), 0, total=4)
    order0, order1 = epoch_order(10, 5, 0), epoch_order(10, 5, 1)
    assert sorted(order0) == list(range(10)) and order0 != order1
    assert [b.indices for _, b in batches] == [order0[0:3], order0[3:6], order0[6:9], order1[0:3]]


def test_crop_augment_pads_uint8_input_and_marks_the_padding():
    # A 2 x 3 image of value 255 with scale fixed at 1 into a 4 x 4 crop: the image sits in
    # the top-left 2 x 3 corner (the only window), or its mirror after a flip; the rest is
    # 0 in the image, 255 in the mask and False in `valid`.
    image = torch.full((3, 2, 3), 255, dtype=torch.uint8)
    mask = torch.ones(2, 3, dtype=torch.uint8)
    out, out_mask, valid = CropAugment(4, (1.0, 1.0), flip=False)(image, mask, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == (3, 4, 4)  # scaled to [0, 1] by Batch.images_on
    expected_valid = torch.zeros(4, 4, dtype=torch.bool)
    expected_valid[:2, :3] = True
    assert torch.equal(valid, expected_valid)
    assert torch.equal(out[0], expected_valid.to(torch.uint8) * 255)  # 255 inside, 0 outside
    assert torch.equal(out_mask, torch.where(expected_valid, 1, 255))


def test_seg_augment_retries_only_the_crop_window():
    # Left half class 1, right half class 2 (8 x 8, crop 4, scale fixed at 1): a window is
    # accepted when no class covers >= 75 % of it, i.e. it straddles the middle column by at
    # least one column on each side. The scale is drawn once (mmseg), so every accepted crop
    # comes from the unscaled image.
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    mask = torch.ones(8, 8, dtype=torch.uint8)
    mask[:, 4:] = 2
    augment = SegAugment(crop=4, scale_range=(1.0, 1.0), cat_max_ratio=0.75, photometric=False)
    for seed in range(20):
        _, out_mask, _ = augment(image, mask, torch.Generator().manual_seed(seed))
        share = (out_mask == 1).float().mean().item()
        assert 0.25 <= share <= 0.5 or share == 0.75 or share == 0.5, share


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)  # draws from the global RNG: restored on resume
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.drop(self.conv(x).mean((2, 3))))


def _train(tmp_path, stop_at: int | None, every_steps: int = 2) -> dict[str, torch.Tensor]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = TinyNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ctx = StageContext(torch.device("cpu"), 0, tmp_path, checkpoint_every_steps=every_steps, checkpoint_every_s=0)
    loop = ResumableLoop(ctx, "tiny", {"net": net}, {"optimizer": optimizer}, total_steps=9)
    for step, batch in loop.batches(ListSource(), 3, CropAugment(16), seed=1):
        loss = nn.functional.multilabel_soft_margin_loss(net(batch.images_on("cpu")), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if stop_at is not None and step + 1 == stop_at:
            raise KeyboardInterrupt  # killed inside the step after `stop_at` finished steps
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("stop_at", [1, 4, 5, 8])
def test_a_loop_killed_mid_stage_resumes_bit_identically(tmp_path, stop_at):
    reference = _train(tmp_path / "ref", None)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run", stop_at)
    # Checkpoints are written between steps, every 2: killed inside step `stop_at` - 1, the
    # last one holds the largest even step count below `stop_at`; the rerun redoes the rest.
    expected = (stop_at - 1) // 2 * 2
    path = tmp_path / "run" / "tiny.pt"
    assert (torch.load(path, weights_only=True)["step"] if path.exists() else 0) == expected
    resumed = _train(tmp_path / "run", None)
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert not (tmp_path / "run" / "tiny.pt").exists()  # removed once the loop completed


def test_timm_cam_augment_posterizes_zero_bits_to_black_instead_of_crashing():
    # inc1 posterize keeps 4 - int(level / 10 * 4) bits: level 10 (magnitude 9 + 0.5 * N(0, 1)
    # clipped at 10) keeps 0 bits; 255 & ~(2^8 - 1) = 0, so every pixel becomes 0 (black).
    from PIL import Image

    from methods.weaktr.augment import TimmCamAugment, _rand_augment_ops, posterize_any_bits

    augment = TimmCamAugment(32)
    ops = [op for op in _rand_augment_ops(augment._tf) if op.name.startswith("Posterize")]
    assert ops and all(op.aug_fn is posterize_any_bits for op in ops)
    img = Image.new("RGB", (4, 4), (255, 128, 7))
    assert np.asarray(posterize_any_bits(img, 0)).max() == 0
    assert np.asarray(posterize_any_bits(img, 1))[0, 0].tolist() == [128, 128, 0]  # keep the top bit
    assert posterize_any_bits(img, 8) is img
    # many draws of the whole recipe: none raises
    image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    for seed in range(300):
        augment(image, None, torch.Generator().manual_seed(seed))


def test_resized_mask_windows_are_the_pixels_torch_nearest_and_padding_give():
    """Hand case: 3 -> 5 columns takes source 0, 0, 1, 1, 2 (floor(i * 0.6)); 4 -> 2 takes 0, 2;
    padding to a 6-wide crop adds one 255 column. Then, on many random sizes (2x included)
    and windows, the same pixels as F.interpolate(mode="nearest") + F.pad(255) + slicing, and
    class_counts equal to the bincount of those pixels."""
    import torch.nn.functional as F

    from methods.common.training import ResizedMask, nearest_source_index

    assert nearest_source_index(3, 5).tolist() == [0, 0, 1, 1, 2]
    assert nearest_source_index(4, 2).tolist() == [0, 2]
    hand = ResizedMask(torch.tensor([[1, 2, 3]], dtype=torch.uint8), (2, 5), crop=6)
    assert hand.shape == (6, 6)
    assert hand.window(slice(0, 3), slice(0, 6)).tolist() == [[1, 1, 2, 2, 3, 255]] * 2 + [[255] * 6]
    # Counted without cutting: the window's 2 rows x (2, 2, 1) columns of classes 1, 2, 3.
    assert hand.class_counts(slice(0, 3), slice(0, 6))[:4].tolist() == [0, 4, 4, 2]
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        h, w, crop = (int(v) for v in torch.randint(1, 200, (3,), generator=gen))
        size = (2 * h, 2 * w) if trial % 10 == 0 else tuple(int(v) for v in torch.randint(1, 500, (2,), generator=gen))
        mask = torch.randint(0, 256, (h, w), generator=gen, dtype=torch.uint8)
        full = F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0]
        full = F.pad(full, (0, max(0, crop - size[1]), 0, max(0, crop - size[0])), value=255)
        resized = ResizedMask(mask, size, crop)
        assert resized.shape == tuple(full.shape)
        top = int(torch.randint(0, full.shape[0] - crop + 1, (), generator=gen))
        left = int(torch.randint(0, full.shape[1] - crop + 1, (), generator=gen))
        rows, cols = slice(top, top + crop), slice(left, left + crop)
        assert torch.equal(resized.window(rows, cols), full[rows, cols]), (h, w, size, crop)
        expected_counts = np.bincount(full[rows, cols].numpy().ravel(), minlength=256)[:255]
        assert np.array_equal(resized.class_counts(rows, cols), expected_counts), (h, w, size, crop)


def test_one_sampler_spans_the_epochs_in_step_order():
    # 10 samples, batch 3, drop_last: 3 batches per epoch, so steps 2..7 are epoch 0's last
    # batch, all of epoch 1, and the first two batches of epoch 2.
    keys = list(StepKeys(10, 3, seed=5, total_steps=8, start_step=2))
    assert len(StepKeys(10, 3, seed=5, total_steps=8, start_step=2)) == 6 == len(keys)
    assert [[e for e, _ in batch] for batch in keys] == [[0] * 3, [1] * 3, [1] * 3, [1] * 3, [2] * 3, [2] * 3]
    for epoch, batches in ((1, keys[1:4]), (2, keys[4:6])):
        order = epoch_order(10, 5, epoch)
        assert [i for batch in batches for _, i in batch] == order[: 3 * len(batches)]
    assert [i for _, i in keys[0]] == epoch_order(10, 5, 0)[6:9]
    assert list(StepKeys(10, 3, seed=5, total_steps=4, start_step=4)) == []


@pytest.mark.parametrize("windowed", [True, False])
def test_resized_image_windows_are_the_pixels_of_resizing_padding_and_slicing(monkeypatch, windowed):
    """Hand case: a 1 x 2 image [0, 100] resized to 1 x 4 takes source x = (i + 0.5) / 2 - 0.5
    = -0.25, 0.25, 0.75, 1.25 (clamped into 0..1): 0, 25, 75, 100; padded to a 3-wide crop
    and cut at rows 0..2, columns 1..3. Then, on many random sizes and windows, the same
    pixels as resize_uint8 + padding + slicing (bilinear's two passes, one call per axis,
    give the pixels of one call: the fact the windowed path rests on)."""
    import torch.nn.functional as F

    from methods.common import training
    from methods.common.training import ResizedImage, resize_uint8

    if not windowed:  # the fallback where torch's kernel is not separable: resize whole, cut
        monkeypatch.setattr(training, "windowed_resize_is_exact", lambda: False)
    hand = ResizedImage(torch.tensor([[[0, 100]]] * 3, dtype=torch.uint8), (1, 4), crop=3)
    assert hand.shape == (3, 4)
    window, valid = hand.window(slice(0, 3), slice(1, 4))
    assert window[0].tolist() == [[25, 75, 100], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [False] * 3, [False] * 3]
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        h, w, crop = (int(v) for v in torch.randint(1, 160, (3,), generator=gen))
        size = tuple(int(v) for v in torch.randint(1, 480, (2,), generator=gen))
        size = (h, w) if trial % 25 == 0 else (h, size[1]) if trial % 25 == 1 else size
        hwc = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8)
        image = hwc.permute(2, 0, 1) if trial % 2 else hwc.permute(2, 0, 1).contiguous()  # decoded, or CHW
        resized = resize_uint8(image, size)
        assert torch.equal(resized, resize_uint8(resize_uint8(image, (h, size[1])), size))
        full = F.pad(resized, (0, max(0, crop - size[1]), 0, max(0, crop - size[0])), value=0)
        lazy = ResizedImage(image, size, crop)
        assert lazy.shape == tuple(full.shape[1:])
        top = int(torch.randint(0, full.shape[1] - crop + 1, (), generator=gen))
        left = int(torch.randint(0, full.shape[2] - crop + 1, (), generator=gen))
        rows, cols = slice(top, top + crop), slice(left, left + crop)
        window, valid = lazy.window(rows, cols)
        assert torch.equal(window, full[:, rows, cols]), (h, w, size, crop, top, left)
        expected_valid = torch.zeros(full.shape[1:], dtype=torch.bool)
        expected_valid[: size[0], : size[1]] = True
        assert torch.equal(valid, expected_valid[rows, cols])


def test_uint8_batches_scale_on_the_device_to_the_per_sample_values():
    # A CropAugment batch is uint8; images_on gives float32 in [0, 1], equal to scaling each
    # sample by itself (the pre-uint8 path), so the training numbers do not move.
    from methods.common.training import to_float

    (_, batch), = _all(ListSource(), 0, total=1)
    assert batch.images.dtype == torch.uint8
    on_device = batch.images_on("cpu")
    assert on_device.dtype == torch.float32
    assert torch.equal(on_device, torch.stack([to_float(image) for image in batch.images]))
