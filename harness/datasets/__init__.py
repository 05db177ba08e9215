"""Datasets behind one interface: ``synthetic`` (generated, the default), ``voc``, ``coco``.

Importing this package registers all three in :data:`DATASETS`. The runner builds one with
:func:`create_dataset` and asks it for splits by role (:meth:`Dataset.default_splits`).
"""

from harness.datasets.base import (
    DATASETS,
    ROLES,
    Dataset,
    Split,
    create_dataset,
    dataset_options,
    register_dataset,
)
from harness.datasets import coco, synthetic, voc  # noqa: F401  (registration)

__all__ = [
    "DATASETS",
    "ROLES",
    "Dataset",
    "Split",
    "create_dataset",
    "dataset_options",
    "register_dataset",
]
