"""The library versions that decide a trial's numbers, as MLflow tags.

The same code and seed give bit-identical metrics on CPU only with the same library versions
(a newer torch changes CAM and mask mIoU by a point or more), so every trial run records them
and the report never averages runs whose versions differ.

Tags written by :func:`environment_tags` (values are version strings, ``absent`` when a
library is not installed):

``wsss.lib.<name>``  for each name in :data:`RESULT_LIBRARIES` (the installed
                     versions, e.g. ``wsss.lib.torch = 2.14.1+cu130``), ``wsss.lib.mlflow``
                     (bookkeeping: it stores the numbers, it does not compute them),
                     ``wsss.lib.python`` (e.g. ``3.11.7``) and, for a trial on a CUDA device,
                     ``wsss.lib.cuda`` (the CUDA version torch was built with) and
                     ``wsss.lib.cudnn`` (cuDNN's version number, e.g. ``91200``); for a
                     trial on the CPU, ``wsss.lib.cpu_threads`` (torch's intra-op thread
                     count: it sets how float sums are split, so the same seed and versions
                     give other numbers with another count, e.g. AFA's synthetic CAM* on seed
                     0 moved from 34.4 with 1 thread to 34.6 with 2)
``wsss.env``         :func:`env_hash` of every ``wsss.lib.*`` tag except the bookkeeping ones
                     (Python by its minor version): runs with equal hashes ran on the same
                     result-deciding versions
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import platform
from typing import Mapping

# Distributions (pip names) whose versions decide a trial's numbers: the tensor and model code,
# image decoding and resizing, dense CRF, COCO mask rasterisation, metric accumulation.
RESULT_LIBRARIES: tuple[str, ...] = (
    "torch", "torchvision", "timm", "torchmetrics", "numpy", "pillow", "pydensecrf2", "pycocotools",
)
# Recorded for the record, left out of the hash: they store results, they do not compute them.
BOOKKEEPING_LIBRARIES: tuple[str, ...] = ("mlflow",)
# Distributions whose module's ``__version__`` names the build (``2.14.1+cu130``, ``+cpu``),
# which their installed metadata (``2.14.1``) leaves out: the build is what runs.
BUILD_VERSION_MODULES: dict[str, str] = {"torch": "torch", "torchvision": "torchvision"}
LIB_PREFIX = "wsss.lib."
ENV_TAG = "wsss.env"
ABSENT = "absent"
# The order of the human-readable versions text (names not listed come after, sorted).
_TEXT_ORDER: tuple[str, ...] = RESULT_LIBRARIES + ("python", "cuda", "cudnn", "cpu_threads")


def cpu_count() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def distribution_version(name: str) -> str:
    """The installed version of distribution ``name`` (pip name, case-insensitive), or
    :data:`ABSENT`. Reads the package metadata, except for :data:`BUILD_VERSION_MODULES`
    (imported for their ``__version__``; the metadata's version if the import fails)."""
    if name in BUILD_VERSION_MODULES:
        try:
            return str(importlib.import_module(BUILD_VERSION_MODULES[name]).__version__)
        except Exception:  # noqa: BLE001 - a broken build (e.g. torchvision for another torch) raises many types
            pass
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ABSENT


def cuda_versions() -> dict[str, str]:
    """``{"cuda": torch's CUDA build version, "cudnn": cuDNN's version number}`` where torch
    has them ({} for a CPU-only torch build; cudnn is left out when it cannot be loaded)."""
    import torch

    out: dict[str, str] = {}
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
        if torch.backends.cudnn.is_available():
            out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def library_versions(device: str = "cpu") -> dict[str, str]:
    """Name -> version for :data:`RESULT_LIBRARIES`, :data:`BOOKKEEPING_LIBRARIES` and
    ``python``; plus ``cuda`` / ``cudnn`` when ``device`` is a CUDA device (on a CPU the
    CUDA libraries compute nothing, and torch's version string already names its build,
    e.g. ``2.14.1+cpu`` or ``2.14.1+cu130``), else ``cpu_threads``: this process's
    ``torch.get_num_threads()`` (call it where the trial runs, after its thread count is set)."""
    versions = {name: distribution_version(name) for name in RESULT_LIBRARIES + BOOKKEEPING_LIBRARIES}
    versions["python"] = platform.python_version()
    if device.startswith("cuda"):
        versions.update(cuda_versions())
    else:
        import torch

        versions["cpu_threads"] = str(torch.get_num_threads())
    return versions


def env_hash(versions: Mapping[str, str]) -> str:
    """12 hex digits of SHA-1 over the sorted ``name=version`` lines of ``versions`` without
    :data:`BOOKKEEPING_LIBRARIES`, ``python`` by its minor version (``3.11.7`` -> ``3.11``: the
    lock file pins packages for a minor version, and CPython patch releases keep ``random``'s
    and the numeric libraries' results): equal exactly when every result-deciding version is
    equal, independent of the mapping's order."""
    hashed = {name: version for name, version in versions.items() if name not in BOOKKEEPING_LIBRARIES}
    if "python" in hashed:
        hashed["python"] = ".".join(hashed["python"].split(".")[:2])
    lines = sorted(f"{name}={version}" for name, version in hashed.items())
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def environment_tags(device: str = "cpu") -> dict[str, str]:
    """The MLflow tags of this process's environment for a trial on ``device`` (see the
    module docstring): ``wsss.lib.<name>`` per version and ``wsss.env``, their hash."""
    versions = library_versions(device)
    return {**{LIB_PREFIX + name: version for name, version in versions.items()}, ENV_TAG: env_hash(versions)}


def versions_text(tags: Mapping[str, str]) -> str:
    """The result-deciding versions in a run's tags as one line, e.g. ``torch 2.14.1,
    timm 1.0.31, ..., python 3.11.7`` ('' when the run recorded none). Runs older than the
    ``wsss.lib.*`` tags recorded only ``wsss.torch`` and ``wsss.timm``; those are used then."""
    versions = {key[len(LIB_PREFIX):]: value for key, value in tags.items() if key.startswith(LIB_PREFIX)}
    if not versions:
        versions = {name: tags[f"wsss.{name}"] for name in ("torch", "timm") if f"wsss.{name}" in tags}
    names = [n for n in _TEXT_ORDER if n in versions] + sorted(set(versions) - set(_TEXT_ORDER) - set(BOOKKEEPING_LIBRARIES))
    return ", ".join(f"{name} {versions[name]}" for name in names)
