"""Inter-pixel affinity from a class-boundary map, and the boundary loss (IRN, Sec. 3.1-3.2).

The boundary branch predicts ``B`` (h, w) in [0, 1] on the stride-4 grid. The affinity of two
pixels is high unless a boundary lies on the straight line between them (paper, Eq. 1):

    a_ij = 1 - max_{k in Pi_ij} B(x_k)

``Pi_ij`` is the set of grid pixels on the segment from ``x_i`` to ``x_j``, both ends included.
We sample it at ``n = max(|dy|, |dx|) + 1`` equally spaced points, each rounded to the nearest
pixel (halves rounded up): every row (or column) the segment crosses contributes one pixel,
which is the usual digital line. The paper does not say how the line is rasterised.

Pairs are taken within a radius (paper: ``||x_i - x_j||_2 < gamma``): ``gamma = 10`` for the
training pairs and ``5`` for the random walk (IRN paper, implementation details; issue 14).

Boundary loss (paper, Eq. 2; the balancing of the three terms as we read the paper, each set
averaged on its own so that the abundant background pairs do not dominate):

    L_B = - 1/2 * mean_{P+_fg} log a_ij - 1/2 * mean_{P+_bg} log a_ij - mean_{P-} log(1 - a_ij)

An empty set contributes 0.
"""

from __future__ import annotations

import math

import torch

from methods.common.irn.labels import shift

TRAIN_RADIUS = 10  # IRN paper: gamma for the training pairs, in stride-4 grid pixels
WALK_RADIUS = 5  # IRN paper: radius of the random walk's neighbourhood, in grid pixels
EPS = 1e-5  # keeps log() finite where a_ij reaches 0 or 1


def offsets_within(radius: float, half: bool = True, include_self: bool = False) -> list[tuple[int, int]]:
    """Integer offsets ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2``.

    ``half=True`` keeps one of each pair ``+o`` / ``-o`` (``dy > 0``, or ``dy == 0 and dx > 0``):
    every unordered pair once. ``include_self`` adds ``(0, 0)``. Sorted, so deterministic."""
    r = math.ceil(radius)
    out = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx >= radius * radius or (dy, dx) == (0, 0):
                continue
            if half and not (dy > 0 or (dy == 0 and dx > 0)):
                continue
            out.append((dy, dx))
    return ([(0, 0)] if include_self else []) + out


def line_points(dy: int, dx: int) -> list[tuple[int, int]]:
    """Offsets of the grid pixels on the segment from (0, 0) to (dy, dx), ends included."""
    n = max(abs(dy), abs(dx)) + 1
    if n == 1:
        return [(0, 0)]
    points = []
    for s in range(n):
        t = s / (n - 1)
        p = (math.floor(t * dy + 0.5), math.floor(t * dx + 0.5))
        if p not in points:
            points.append(p)
    return points


def path_max(boundary: torch.Tensor, offsets: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_{k in Pi_ij} B(x_k)`` for every pixel ``i`` and ``j = i + offset``.

    ``boundary`` (..., h, w) in [0, 1]. Returns ``(maxima, inside)``, both (..., K, h, w):
    the path maximum, and whether ``j`` lies on the grid (outside pairs are 0 and False)."""
    h, w = boundary.shape[-2:]
    ones = torch.ones(h, w, dtype=torch.bool, device=boundary.device)
    maxima, inside = [], []
    for dy, dx in offsets:
        m = None
        for py, px in line_points(dy, dx):
            v = shift(boundary, py, px)
            m = v if m is None else torch.maximum(m, v)
        maxima.append(m)
        inside.append(shift(ones, dy, dx, fill=False))
    stacked = torch.stack(maxima, -3)
    return stacked, torch.stack(inside, 0).expand_as(stacked)


def affinity(boundary: torch.Tensor, offsets: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a_ij = 1 - max_{k in Pi_ij} B(x_k)`` (paper, Eq. 1). Shapes as :func:`path_max`;
    values in [0, 1] where ``inside``, 0 elsewhere."""
    maxima, inside = path_max(boundary, offsets)
    return (1 - maxima) * inside, inside


def boundary_loss(aff: torch.Tensor, pos_fg: torch.Tensor, pos_bg: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``L_B`` of the module docstring. ``aff`` (B, K, h, w) in [0, 1]; the sets are bool of the
    same shape (:func:`methods.common.irn.labels.pair_sets`). Returns a 0-d tensor."""
    a = aff.clamp(EPS, 1 - EPS)
    return 0.5 * _mean(-torch.log(a), pos_fg) + 0.5 * _mean(-torch.log(a), pos_bg) + _mean(-torch.log(1 - a), neg)


def _mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``where`` (0 when empty, still differentiable)."""
    return (values * where).sum() / where.sum().clamp(min=1)
