"""IRN's settings: every constant with its source.

Defaults are the fast synthetic recipe (tiny ResNet, 96 px crops, CPU minutes), the project's
convention for recipes; :data:`PAPER` holds the IRN paper's values, which the VOC suites set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from methods.common.weights import weights_field


@dataclass
class IRNConfig:
    """IRN training and random-walk settings (``eval.irn`` table / ``eval.irn=key=value,...``)."""

    arch: str = "tiny"  # "resnet50" in the paper (ImageNet-pretrained)
    # "auto" (arch resnet50: torchvision's ImageNet ResNet-50 from the weights registry), a registered
    # name, a local checkpoint path, or None / "none" = random init (methods.common.weights.resolve)
    pretrained: str | None = weights_field("arch")
    freeze_backbone: bool = False  # our understanding: the authors keep a pretrained backbone fixed (README)
    crop: int = 96  # paper: 512
    scale_min: float = 0.7  # random rescale of the image; IRN: long side 320-640 (~0.64-1.28 on VOC)
    scale_max: float = 1.3
    epochs: int = 3  # paper: 3
    batch_size: int = 16  # paper: 32
    lr: float = 0.1  # paper: 0.1, polynomial decay (power 0.9)
    momentum: float = 0.0  # not stated in the paper (plain SGD assumed; README)
    weight_decay: float = 1e-4  # paper: 1e-4
    fg_threshold: float = 0.30  # paper: confident foreground CAM score
    bg_threshold: float = 0.05  # paper: confident background CAM score
    label_crf: bool = False  # paper: confident areas refined with dCRF (slow on CPU; VOC suites set it)
    train_radius: float = 10.0  # paper: gamma = 10 (stride-4 grid) for the training pairs
    walk_radius: float = 5.0  # paper: radius 5 for the random walk
    beta: float = 10.0  # paper: affinity exponent
    steps: int = 256  # paper: t, random-walk iterations
    sem_bg_threshold: float = 0.25  # authors' released default for the background score (README)
    edge_dim: int = 32  # channels per level in the boundary branch
    disp_dim: int = 64  # channels per level in the displacement branch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The IRN paper's recipe (ResNet-50, crop 512, batch 32, 3 epochs, lr 0.1); set by the VOC suites.
PAPER: dict[str, Any] = dict(
    arch="resnet50", pretrained="auto", freeze_backbone=True, crop=512, scale_min=0.64, scale_max=1.28, epochs=3, batch_size=32, lr=0.1,
    weight_decay=1e-4, label_crf=True,
)
