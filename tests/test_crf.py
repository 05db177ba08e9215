"""Tests of methods.common.crf on tiny images with the real pydensecrf."""

from __future__ import annotations

import numpy as np
import pytest

from methods.base import CRFParams
from methods.common.crf import dense_crf, dense_crf_labels, dense_crf_many


def _image_and_probs(height: int = 9, width: int = 11, n_labels: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    logits = rng.normal(size=(n_labels, height, width))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return image, probs.astype(np.float32)


def test_dense_crf_returns_normalised_probabilities():
    image, probs = _image_and_probs()
    out = dense_crf(image, probs, CRFParams(iterations=3))
    assert out.shape == probs.shape and out.dtype == np.float32
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-4)


def test_dense_crf_keeps_confident_labels():
    image = np.zeros((8, 10, 3), np.uint8)
    image[:, 5:] = 255
    probs = np.full((2, 8, 10), 0.1, np.float32)
    probs[0, :, :5] = probs[1, :, 5:] = 0.9
    out = dense_crf(image, probs, CRFParams())
    np.testing.assert_array_equal(out.argmax(0), probs.argmax(0))


def test_dense_crf_size_mismatch_raises():
    image, probs = _image_and_probs()
    with pytest.raises(ValueError, match="image is"):
        dense_crf(image[:-1], probs, CRFParams())


def test_dense_crf_labels_shape_and_range():
    image, probs = _image_and_probs()
    out = dense_crf_labels(image, probs.argmax(0), 3, CRFParams(iterations=3))
    assert out.shape == image.shape[:2] and out.dtype == np.int64
    assert out.min() >= 0 and out.max() < 3

    image.flags.writeable = False  # as np.asarray(PIL image) gives: pydensecrf wants a writable buffer
    np.testing.assert_array_equal(dense_crf_labels(image, probs.argmax(0), 3, CRFParams(iterations=3)), out)


def test_dense_crf_many_parallel_equals_serial():
    pairs = [_image_and_probs(6 + i, 7 + i, seed=i) for i in range(3)]
    images, probs = [p[0] for p in pairs], [p[1] for p in pairs]
    params = CRFParams(iterations=3)
    serial = dense_crf_many(images, probs, params, workers=1)
    parallel = dense_crf_many(images, probs, params, workers=2)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    assert dense_crf_many([], [], params, workers=2) == []
