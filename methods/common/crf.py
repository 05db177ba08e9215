"""Dense CRF (Kraehenbuehl & Koltun, NIPS 2011) through pydensecrf2, on numpy arrays.

Two unaries are used by the methods: softmax probabilities (inference post-processing) and
hard labels with a confidence ``gt_prob`` (WeakTr's pseudo-label refinement).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

import multiprocessing as mp
import numpy as np

from methods.base import CRFParams


def _pairwise(crf, image: np.ndarray, params: CRFParams) -> None:
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.require(image, dtype=np.uint8, requirements=["C", "W"]),  # pydensecrf needs a writable buffer
        compat=params.bilateral_compat,
    )


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """Refine class probabilities ``probs`` (K, H, W) on ``image`` (H, W, 3) uint8.

    Unary = -log(p); returns the CRF marginals (K, H, W) float32.
    """
    import pydensecrf.densecrf as dcrf

    n_labels, height, width = probs.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"dense_crf: image is {image.shape[:2]} but probabilities are {(height, width)}")
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(n_labels, -1).astype(np.float32)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    _pairwise(crf, image, params)
    marginals = np.array(crf.inference(params.iterations), dtype=np.float32)
    return marginals.reshape(n_labels, height, width)


def dense_crf_labels(
    image: np.ndarray, labels: np.ndarray, n_labels: int, params: CRFParams, gt_prob: float = 0.7
) -> np.ndarray:
    """Refine a hard label map ``labels`` (H, W) in [0, n_labels) with a label unary.

    Each pixel's label gets probability ``gt_prob`` and the others share the rest
    (``zero_unsure=False``: every pixel is a confident label). Returns (H, W) int64 labels.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = labels.shape
    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.astype(np.float32)))
    _pairwise(crf, image, params)
    marginals = np.array(crf.inference(params.iterations), dtype=np.float32)
    return marginals.reshape(n_labels, height, width).argmax(0).astype(np.int64)


def _crf_job(args: tuple[np.ndarray, np.ndarray, CRFParams]) -> np.ndarray:
    return dense_crf(*args)


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal the kernel sends when the parent dies


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a worker is SIGKILLed when the process that forked it dies (a
    ``kill -9`` of the trial's process must not leave orphans computing for nobody). Linux
    only (prctl); if the parent died before this ran, exit at once."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def map_forked(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int | None = None) -> list[Any]:
    """``[fn(job) for job in jobs]``, in up to ``workers`` forked processes (default: every
    core; serial for <= 1): dense CRF inference is C++ that holds the GIL. Results keep the
    order of ``jobs``. ``fn`` must be a module-level function (it is pickled by name).

    The workers are forked (cheap: no re-import) and die with this process
    (:func:`_die_with_parent`); whoever holds locks must not let forked children keep them
    (the harness closes its trial-lock fds in every forked child)."""
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    if workers <= 1:
        return [fn(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        return list(pool.map(fn, jobs))


def dense_crf_many(
    images: Sequence[np.ndarray], probs: Sequence[np.ndarray], params: CRFParams, workers: int | None = None
) -> list[np.ndarray]:
    """``dense_crf`` over many images in parallel processes (:func:`map_forked`)."""
    return map_forked(_crf_job, [(img, p, params) for img, p in zip(images, probs, strict=True)], workers)
