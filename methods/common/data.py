"""The training data path: seeded, worker-count-independent batches through a DataLoader.

Every training loop reads its batches from :func:`training_batches`. Randomness is split so
that no draw depends on which process makes it:

* the sample order of epoch ``e`` is a permutation drawn from ``(seed, e)`` in the loop's
  process;
* sample ``i`` of epoch ``e`` is augmented with a generator seeded from ``(seed, e, i)``
  (:func:`sample_generator`), in whichever DataLoader worker loads it.

So the batches are bit-identical for 0, 1 or N workers, and a loop resumed at step ``k``
(:func:`training_batches` with ``start_step=k``) sees exactly the batches an uninterrupted
loop sees from step ``k`` on: the loader's position is the step number, nothing else.

Augmentations (``Augment``) take the decoded image as a uint8 ``(3, H, W)`` tensor and the
mask as a uint8 ``(H, W)`` tensor (or None) and return ``(image, mask, valid)``: the image as
uint8 ``(3, crop, crop)`` where the recipe has no float step (batched as uint8: a quarter of
the bytes through collation, pinning and the host-to-device copy; :meth:`Batch.images_on`
scales it to ``[0, 1]`` on the device) or float32 (in ``[0, 1]``, or already normalised where
the method's recipe normalises inside the augmentation), the mask uint8 ``(crop, crop)`` with
255 on padding (batched as int64), and ``valid`` bool ``(crop, crop)``, False on padding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from methods.base import SampleSource
from methods.common.training import to_float

Augment = Callable[[torch.Tensor, "torch.Tensor | None", torch.Generator], tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]]


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, crop, crop) uint8, or float32 in [0, 1] unless the augment normalises: read via images_on
    labels: torch.Tensor  # (B, C) multi-hot float32
    masks: torch.Tensor | None  # (B, crop, crop) int64, 255 = ignore / padding
    valid: torch.Tensor  # (B, crop, crop) bool, False on padding
    indices: list[int]  # sample indices in the source

    def images_on(self, device: torch.device | str) -> torch.Tensor:
        """The images as float32 (B, 3, crop, crop) on ``device``: uint8 batches travel as uint8
        and are scaled to ``[0, 1]`` there (:func:`to_float`, the same values as scaling each
        sample on the CPU); float batches are only moved."""
        images = self.images.to(device)
        return to_float(images) if images.dtype == torch.uint8 else images

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``)."""
        return Batch(
            self.images.pin_memory(), self.labels.pin_memory(),
            self.masks.pin_memory() if self.masks is not None else None, self.valid.pin_memory(), self.indices,
        )


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from values (blake2b of their text): distinct tuples give unrelated
    streams, the same tuple the same seed in any process."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator that augments sample ``index`` in ``epoch`` of a loop seeded ``seed``."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, index))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of ``epoch``: a permutation of ``range(n)`` drawn from ``(seed, epoch)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, "order"))).tolist()


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches in one epoch of ``n`` samples (a last partial batch is dropped when asked,
    unless it would be the only one)."""
    if drop_last and n >= batch_size:
        return n // batch_size
    return -(-n // batch_size)


class AugmentedSamples(Dataset):
    """Map-style view of a split: ``(epoch, index)`` -> one augmented sample.

    The DataLoader's sampler hands out ``(epoch, index)`` pairs so the epoch travels with the
    index to the worker (no worker state to keep in sync)."""

    def __init__(self, source: SampleSource, augment: Augment, seed: int, with_masks: bool) -> None:
        if not with_masks and hasattr(source, "without_masks"):
            source = source.without_masks()  # e.g. VOC with label files: no mask PNG decoded per sample
        self.source, self.augment, self.seed, self.with_masks = source, augment, seed, with_masks

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample = self.source[index]
        image = torch.from_numpy(np.require(sample.image, requirements=("C", "W"))).permute(2, 0, 1)
        mask = None
        if self.with_masks and sample.mask is not None:
            mask = torch.from_numpy(np.require(sample.mask, np.uint8, ("C", "W")))
        image, mask, valid = self.augment(image, mask, sample_generator(self.seed, epoch, index))
        labels = torch.from_numpy(np.asarray(sample.labels, dtype=np.float32))
        return image, mask, valid, labels, index


def _collate(items) -> Batch:
    images, masks, valid, labels, indices = zip(*items)
    return Batch(
        images=torch.stack(images),
        labels=torch.stack(labels),
        masks=torch.stack(masks).long() if masks[0] is not None else None,
        valid=torch.stack(valid),
        indices=list(indices),
    )


def _one_thread(_: int) -> None:
    # Each worker augments one sample at a time: intra-op threads would only fight the
    # training process (and each other) for the same cores.
    torch.set_num_threads(1)


class StepKeys(Sampler[list[tuple[int, int]]]):
    """The batches of steps ``start_step .. total_steps - 1`` as lists of ``(epoch, index)``
    keys: step ``s`` is batch ``s % per_epoch`` of epoch ``s // per_epoch`` in
    :func:`epoch_order`'s permutation. One sampler spans every epoch, so one DataLoader (and
    its workers) serves the whole loop: no worker start-up and no drained prefetch queue at
    each epoch boundary, which on small splits (synthetic, subsets) cost more than the
    loading itself."""

    def __init__(self, n: int, batch_size: int, seed: int, total_steps: int, start_step: int = 0, drop_last: bool = True) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.per_epoch = batches_per_epoch(n, batch_size, drop_last)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        bs, step = self.batch_size, self.start_step
        while step < self.total_steps:
            epoch, first = divmod(step, self.per_epoch)
            order = epoch_order(self.n, self.seed, epoch)  # drawn lazily, one epoch at a time
            last = min(self.per_epoch, first + (self.total_steps - step))
            for b in range(first, last):
                yield [(epoch, i) for i in order[b * bs : (b + 1) * bs]]
            step += last - first


def training_batches(
    source: SampleSource,
    batch_size: int,
    augment: Augment,
    seed: int,
    total_steps: int,
    start_step: int = 0,
    with_masks: bool = False,
    drop_last: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> Iterator[tuple[int, Batch]]:
    """``(step, batch)`` for steps ``start_step .. total_steps - 1``, epoch after epoch.

    Step ``s`` is batch ``s % per_epoch`` of epoch ``s // per_epoch`` (``per_epoch`` from
    :func:`batches_per_epoch`), so resuming is ``start_step=s``. Batches are read by one
    ``torch.utils.data.DataLoader`` for all the steps (:class:`StepKeys`) with
    ``num_workers`` worker processes (0: in this process), ``prefetch_factor`` batches ahead
    per worker and pinned memory when asked (for CUDA); their content does not depend on
    ``num_workers``.

    Raises ``ValueError`` for an empty source or a non-positive batch size.
    """
    n = len(source)
    if n == 0 or batch_size <= 0:
        raise ValueError(f"training_batches: need samples and batch_size > 0 (got {n} samples, batch_size {batch_size})")
    if start_step >= total_steps:
        return
    loader = DataLoader(
        AugmentedSamples(source, augment, seed, with_masks),
        batch_sampler=StepKeys(n, batch_size, seed, total_steps, start_step, drop_last),
        num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory,
        worker_init_fn=_one_thread if num_workers else None, prefetch_factor=prefetch_factor if num_workers else None,
        # Its own generator: by default a loader iterator draws a base seed from torch's
        # global RNG, which would shift dropout's stream (and differ after a resume).
        generator=torch.Generator().manual_seed(0),
    )
    yield from enumerate(loader, start=start_step)
