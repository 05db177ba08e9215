"""Images for galleries and MLflow artifacts: label maps in the VOC palette, CAM heat maps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from harness.files import atomic_write_bytes


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map (bit-interleaved), (n, 3) uint8; 255 -> white."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    palette[255] = (255, 255, 255)
    return palette


def save_label_png(labels: np.ndarray, path: Path) -> None:
    """(H, W) uint8 labels -> palette PNG whose pixel values are the labels themselves.
    Written atomically (temp file, rename): a stage that resumes by skipping the files already
    there (pseudo masks, IRN's labels) never finds a half-written one after a kill -9."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().flatten().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_label_png(path: Path) -> np.ndarray:
    """Palette/greyscale PNG -> (H, W) uint8 label indices."""
    with Image.open(path) as image:
        return np.array(image)


def heatmap(cams: np.ndarray, image: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Max over classes of (C, H, W) CAMs in [0, 1], as a jet-like heat map blended on the image."""
    strength = cams.max(axis=0) if cams.size else np.zeros(image.shape[:2], np.float32)
    x = np.clip(strength, 0.0, 1.0)
    colour = np.stack(
        [np.clip(1.5 - np.abs(4 * x - 3), 0, 1), np.clip(1.5 - np.abs(4 * x - 2), 0, 1), np.clip(1.5 - np.abs(4 * x - 1), 0, 1)],
        axis=-1,
    )
    blended = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour
    return (np.clip(blended, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_rgb_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image.astype(np.uint8)).save(path)
