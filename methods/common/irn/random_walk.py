"""The random walk that turns CAM seeds into pseudo masks (IRN, Sec. 3.4 / 4).

On the stride-4 grid of ``N = h * w`` pixels, with affinities from the boundary map
(:func:`methods.common.irn.affinity.affinity`, pairs within radius 5, each pixel also with
itself, ``a_ii = 1 - B(x_i)``):

    A   = [a_ij^beta]                (Hadamard power, beta = 10; 0 outside the radius)
    T   = S^{-1} A,  S = diag_i(sum_j a_ij^beta)     (row normalisation: rows of T sum to 1)
    vec(M*_c) = T^t . vec(M_c * (1 - B))             (t = 256)

for every present class ``c`` (IRN paper, Eq. 7 and implementation details: beta = 10,
t = 256, radius 5; AD-CAM restates Eq. 7 as its Eq. 9). Each step replaces a pixel's score by
the affinity-weighted mean of its neighbours', so scores spread inside regions and stop at
boundaries. Applying ``T`` 256 times to the (N, C) score matrix equals ``T^256`` without the
dense N x N power (T is sparse: about 81 neighbours per pixel).

Pseudo mask (:func:`walk_to_mask`): the propagated maps are upsampled (bilinear) to image size,
divided by their maximum over classes and pixels, a constant background score
``bg_threshold`` is put in front and the argmax taken. ``bg_threshold = 0.25`` is the value of
the authors' released configuration; we did not find it in the paper text (README).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from methods.common.irn.affinity import WALK_RADIUS, affinity, offsets_within

BETA = 10.0  # IRN paper: exponent of the affinities in the transition matrix
STEPS = 256  # IRN paper: t, the number of random-walk steps (T^t)
BG_THRESHOLD = 0.25  # authors' released default for the background score (not found in the paper)


def transition_matrix(boundary: torch.Tensor, radius: float = WALK_RADIUS, beta: float = BETA) -> torch.Tensor:
    """``T = S^{-1} A^beta`` for one boundary map ``boundary`` (h, w) in [0, 1].

    Returns a sparse CSR (N, N) float tensor, ``N = h * w`` in row-major order; every row sums
    to 1, except a row whose affinities all underflow to 0 (``B = 1`` around the pixel), which
    stays 0 (the pixel loses its score instead of producing NaN)."""
    h, w = boundary.shape
    half = offsets_within(radius, half=True)
    aff, inside = affinity(boundary, half)  # (K, h, w): pair (i, i + o_k)
    index = torch.arange(h * w, device=boundary.device).view(h, w)
    rows, cols, vals = [index.flatten()], [index.flatten()], [(1 - boundary).flatten()]
    for k, (dy, dx) in enumerate(half):
        keep = inside[k]
        i = index[keep]
        j = i + dy * w + dx
        a = aff[k][keep]
        rows += [i, j]  # symmetric: a_ij = a_ji
        cols += [j, i]
        vals += [a, a]
    values = torch.cat(vals).clamp(min=1e-12).pow(beta)
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    sums = torch.zeros(h * w, dtype=values.dtype, device=values.device).index_add_(0, rows_t, values)
    coo = torch.sparse_coo_tensor(torch.stack([rows_t, cols_t]), values / sums.clamp(min=1e-30)[rows_t], (h * w, h * w), check_invariants=False)
    with warnings.catch_warnings():  # CSR is "beta" in torch; its mat-vec is ~30x faster than COO's
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


def propagate(transition: torch.Tensor, scores: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """``T^steps . scores`` for ``scores`` (N, K) (one column per class)."""
    for _ in range(steps):
        scores = transition @ scores
    return scores


def random_walk(boundary: torch.Tensor, cams: torch.Tensor, radius: float = WALK_RADIUS, beta: float = BETA, steps: int = STEPS) -> torch.Tensor:
    """``vec(M*_c) = T^t vec(M_c * (1 - B))`` for each map of ``cams`` (K, h, w) (on the grid of
    ``boundary`` (h, w)). Returns (K, h, w), non-negative."""
    K, h, w = cams.shape
    if K == 0:
        return cams
    T = transition_matrix(boundary, radius, beta)
    seeds = (cams * (1 - boundary)).reshape(K, h * w).T
    return propagate(T, seeds, steps).T.reshape(K, h, w)


def walk_to_mask(walked: torch.Tensor, classes: torch.Tensor, size: tuple[int, int], bg_threshold: float = BG_THRESHOLD) -> torch.Tensor:
    """Pseudo mask from the propagated maps of the present classes.

    ``walked`` (K, h, w) >= 0 for the classes ``classes`` (K,) int64 (0-based foreground
    indices); ``size`` the image (H, W). Returns (H, W) int64: 0 background, ``c + 1`` class c."""
    H, W = size
    if walked.shape[0] == 0:
        return torch.zeros(H, W, dtype=torch.long)
    up = F.interpolate(walked[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    up = up / up.max().clamp(min=1e-12)
    scores = torch.cat([torch.full((1, H, W), bg_threshold, dtype=up.dtype, device=up.device), up])
    lookup = torch.cat([torch.zeros(1, dtype=torch.long), classes.long().cpu() + 1]).to(up.device)
    return lookup[scores.argmax(0)]
