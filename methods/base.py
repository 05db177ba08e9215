"""The common method interface: five named stages every WSSS method implements.

A method is one folder under ``methods/`` holding a :class:`Method` subclass decorated
with :func:`register`. The harness (``harness/``) drives the stages, times them,
checkpoints between them, evaluates their outputs and tracks everything; a method never
imports the harness. Stages, in order:

1. ``train_cam(train, ctx)``: train the classification / CAM network on image-level labels.
2. ``cams(images, labels)``: class activation maps ``(B, C, H, W)`` float in ``[0, 1]`` at
   image size, exactly zero for classes absent from ``labels``. Evaluated as **CAM mIoU**.
3. ``pseudo_masks(images, cams, labels)``: training masks ``(B, H, W)`` int64 with values
   in ``{0..C, 255}`` (0 background, ``c + 1`` for foreground class ``c``, 255 ignore).
   Evaluated as **mask mIoU** on the training split.
4. ``train_seg(train, ctx)``: train the segmentation network on the pseudo masks
   (``Sample.mask`` holds the pseudo mask). End-to-end methods set
   ``fused_segmentation = True``: their ``train_cam`` trains the segmentation network too,
   and the harness skips this stage (recording it as fused, time 0).
5. ``segment(images, multiscale)``: logits ``(B, C + 1, H, W)`` at image size. Evaluated as
   **val mIoU**, single-scale (``multiscale=False``) and with the method's multi-scale + flip
   protocol (``multiscale=True``), the latter also with dense CRF (``crf_params``).

Tensors handed to a method: ``images`` float32 ``(B, 3, H, W)`` RGB in ``[0, 1]``
(methods normalise themselves); ``labels`` float32 ``(B, C)`` multi-hot over the C
foreground classes. Everything a stage learns must be in :meth:`Method.state_dict`, which
the harness saves after each training stage and restores on resume.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = 255


@dataclass(frozen=True)
class DatasetInfo:
    """What a method may know about a dataset: its classes and its benchmark input size."""

    name: str
    class_names: tuple[str, ...]  # the C foreground classes; background is implicit (index 0)
    input_size: int = 224  # side of the square input used for MACs and as crop default

    @property
    def num_classes(self) -> int:
        """C, the number of foreground classes."""
        return len(self.class_names)


@dataclass
class Sample:
    """One image. ``mask`` is GT for evaluation, or the pseudo mask in ``train_seg``."""

    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (C,) float32 multi-hot
    mask: np.ndarray | None = None  # (H, W) uint8 in {0..C, 255}


class SampleSource(Protocol):
    """A split as a method's training stage sees it: indexable samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


@dataclass
class CRFParams:
    """Dense CRF parameters (Kraehenbuehl & Koltun): Gaussian and bilateral kernels."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10


@dataclass
class StageContext:
    """What the harness gives a training stage: device, seed, a scratch directory for
    mid-stage checkpoints (resumed by the method itself if it wants), and callbacks.

    ``score_cams``, when the harness provides it, scores the method's *current* ``cams()`` on
    the cam-eval split against its pixel labels: CAM mIoU in percent at the best background
    threshold of the evaluation sweep. Selecting a model with it is an **oracle** (pixel
    supervision); a method using it must say so in its config and metrics."""

    device: torch.device
    seed: int
    workdir: Path
    # (name, value, step); value may be a 0-d tensor: it is converted off the training thread,
    # so logging a CUDA loss does not synchronise the device every step.
    log_metric: Callable[[str, "float | torch.Tensor", int], None] = lambda name, value, step: None
    progress: Callable[[int, int], None] = lambda done, total: None
    num_workers: int = 0  # DataLoader worker processes of the stage's training loops
    checkpoint_every_steps: int = 0  # mid-stage checkpoint every N steps (0: by time only)
    checkpoint_every_s: float = 600.0  # ... or every M seconds (0: by steps only)
    score_cams: Callable[[], float] | None = None

    def stream_seed(self, offset: int = 0) -> int:
        """An integer seed derived from the trial seed (offset separates streams)."""
        return self.seed * 1000 + offset

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with :meth:`stream_seed`."""
        return torch.Generator().manual_seed(self.stream_seed(offset))


@dataclass
class MethodConfig:
    """Base of every method's hyper-parameter dataclass. Fields are the override keys
    (``wsss-bench run ... key=value``); defaults are the fast synthetic recipe unless a
    suite file sets the paper's values."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class NoPrediction(LookupError):
    """Raised by ``segment`` of a method that has no output for an image (one that reads
    predictions made elsewhere has none for training images): the harness leaves such an
    image out where it is optional (the gallery) and fails the trial where it is not."""


class Method(abc.ABC):
    """Base class of every WSSS method. See the module docstring for the stage contract."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    fused_segmentation: ClassVar[bool] = False
    # True: the harness also passes ``ids=[sample id per image]`` to cams / pseudo_masks /
    # segment (a method that reads per-image files made elsewhere needs them).
    wants_ids: ClassVar[bool] = False
    # False (may be set per instance): the method has no segmentation network; the harness
    # trains and evaluates its common recipe (harness/common_seg.py) in train_seg / segment.
    has_segmenter: bool = True

    @classmethod
    def check_inputs(cls, config: MethodConfig, dataset: DatasetInfo, split_ids: dict[str, list[str]]) -> MethodConfig:
        """Called once when a sweep is planned, before any trial runs. ``split_ids``: role
        (``train``, ``cam_eval``, ``val``) -> the ids the trial will ask for, and ``known``
        -> every id of those splits. A method that reads files made elsewhere checks them
        here and returns its config completed (e.g. with a hash of the files, which then is
        part of the trial's identity). Raise ValueError naming the file: the sweep stops
        with that message (exit code 2)."""
        return config

    @classmethod
    def row_name(cls, config: dict[str, Any]) -> str:
        """The name of this method's rows in MLflow (``wsss.method``) and the report."""
        return cls.name

    def __init__(self, config: MethodConfig, dataset: DatasetInfo, device: torch.device) -> None:
        self.config = config
        self.dataset = dataset
        self.device = device

    # -- stages ---------------------------------------------------------------------------
    @abc.abstractmethod
    def train_cam(self, train: SampleSource, ctx: StageContext) -> None:
        """Stage 1: train the CAM network on ``train`` (image-level labels only)."""

    @abc.abstractmethod
    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Stage 2: ``(B, 3, H, W)`` in [0, 1] -> ``(B, C, H, W)`` in [0, 1], zero where absent."""

    @abc.abstractmethod
    def pseudo_masks(self, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Stage 3: -> ``(B, H, W)`` int64 in {0..C, 255}."""

    def train_seg(self, train: SampleSource, ctx: StageContext) -> None:
        """Stage 4: train the segmentation network on pseudo masks (``Sample.mask``)."""
        if not self.fused_segmentation:
            raise NotImplementedError(f"method {self.name!r} must implement train_seg")

    @abc.abstractmethod
    def segment(self, images: torch.Tensor, multiscale: bool = False) -> torch.Tensor:
        """Stage 5: ``(B, 3, H, W)`` -> logits ``(B, C + 1, H, W)``."""

    # -- state and cost -------------------------------------------------------------------
    @abc.abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """The trainable networks by name (saved, counted for params / MACs)."""

    def macs_inputs(self) -> dict[str, tuple[Any, ...]]:
        """Example forward inputs per network at the benchmark input size (for MACs)."""
        size = self.dataset.input_size
        return {name: (torch.zeros(1, 3, size, size),) for name in self.networks()}

    def cam_threshold(self) -> float | None:
        """The background threshold in [0, 1] this method itself declares for its CAMs (a
        pixel is foreground when a present class's CAM exceeds it), or None for none. The
        harness reports CAM mIoU at it beside the oracle sweep; None: the suite's
        ``eval.fixed_threshold``."""
        return None

    def crf_params(self) -> CRFParams:
        """Dense-CRF parameters for the ``+CRF`` val protocol."""
        return CRFParams()

    def crf_inputs(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the ``+CRF`` val protocol refines for one image: ``probs`` (C + 1, H, W) float32
        is the softmax of ``segment(..., multiscale=True)``. Returns ``(unary, classes)``:
        ``unary`` (k, H, W), whose ``-log`` (after clipping to [1e-8, 1]) is the CRF unary,
        and ``classes`` (k,) int64, the class index of each CRF label; the prediction is
        ``classes[argmax_k marginals]``. Default: all classes, ``probs`` unchanged."""
        return crf_inputs_all_classes(probs)

    def state_dict(self) -> dict[str, Any]:
        return {name: net.state_dict() for name, net in self.networks().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, net in self.networks().items():
            net.load_state_dict(state[name])


def crf_inputs_all_classes(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The default of :meth:`Method.crf_inputs`: every class, the probabilities as given."""
    return probs, np.arange(probs.shape[0], dtype=np.int64)


METHODS: dict[str, type[Method]] = {}


def add_to_registry(registry: dict[str, Any], cls: Any, kind: str) -> Any:
    """Put ``cls`` in ``registry`` under ``cls.name``; a name may not be taken twice."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    if cls.name in registry and registry[cls.name] is not cls:
        raise ValueError(f"{kind} name {cls.name!r} registered twice")
    registry[cls.name] = cls
    return cls


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to the harness under ``cls.name``."""
    return add_to_registry(METHODS, cls, "method")


def iter_batches(n: int, batch_size: int) -> Iterator[range]:
    """Consecutive index ranges covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield range(start, min(n, start + batch_size))


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    return torch.tensor(image, dtype=torch.float32).permute(2, 0, 1).div_(255.0)


def to_uint8_image(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (for CRF and galleries)."""
    return (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def stack_samples(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-size samples -> (images (B, 3, H, W), labels (B, C))."""
    images = torch.stack([to_tensor_image(s.image) for s in samples])
    labels = torch.from_numpy(np.stack([s.labels for s in samples])).float()
    return images, labels
