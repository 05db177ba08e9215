"""AD-CAM's attention processing and activation diffusion (paper Sec. 4.2-4.3), as pure
functions on tensors. No public code exists; everything follows the paper's equations, with
two choices the paper leaves open exposed as options:

- ``attention_norm`` (how the patch x patch matrix A is made row-stochastic, Sec. 4.2 states
  "the sum on each row equals 1" but the transformer's attention also covers the cls token):
  ``"renorm"`` (default) drops the cls row and column and divides each row by its sum;
  ``"raw"`` drops them and keeps the rows as they are (sums < 1).
- ``direction`` of the diffusion (Eq. 8 is garbled: ``M(i)' = sum_j A~_ji M(i)``):
  ``"push"`` (default) ``M' = A~^T M``: pixel j sends the fraction A~_ji of its activation to
  pixel i, as the text says ("diffuses its own activation to neighbors ... receives activation
  from the pixels which take i as nearest neighbors"), and total activation is conserved;
  ``"pull"`` ``M' = A~ M``: each pixel averages its neighbours' activations (random-walk style).

Shapes: A (B, N, N) row-stochastic; CAMs M (B, C, N) over the N = h * w tokens.
"""

from __future__ import annotations

from typing import Literal

import torch

AttentionNorm = Literal["renorm", "raw"]
Direction = Literal["push", "pull"]
RefineMode = Literal["adcam", "diffusion_only", "plain_cam"]

EPS = 1e-12


def patch_attention(attention: torch.Tensor, num_prefix: int = 1, norm: AttentionNorm = "renorm") -> torch.Tensor:
    """Sec. 4.2 "AM": attention over all tokens (B, T, T) (already averaged over heads and
    blocks, A = 1/L sum_i A_i) -> patch x patch matrix (B, N, N), N = T - ``num_prefix``.

    ``"renorm"``: rows divided by their sum so each sums to 1 (what Eq. 6's bound S_ij in
    [0, 1] assumes); ``"raw"``: the patch block as is."""
    a = attention[:, num_prefix:, num_prefix:]
    if norm == "renorm":
        return a / a.sum(-1, keepdim=True).clamp_min(EPS)
    if norm == "raw":
        return a
    raise ValueError(f"attention_norm must be 'renorm' or 'raw', got {norm!r}")


def co_neighbour_similarity(attention: torch.Tensor) -> torch.Tensor:
    """Eq. 6: S_ij = sum_k sqrt(A_ik A_jk), i.e. S = sqrt(A) @ sqrt(A)^T in one batched matmul.

    (B, N, N) -> (B, N, N), symmetric; for row-stochastic A, S_ij in [0, 1] (Cauchy-Schwarz),
    S_ii = 1. Theorem 4.1: if i and j attend uniformly (1/n) to sets P and Q of n tokens, S_ij =
    |P & Q| / n = 2J / (1 + J) with J = |P & Q| / |P | Q| their Jaccard similarity."""
    root = attention.clamp_min(0).sqrt()
    return root @ root.transpose(-1, -2)


def top_k_mask(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 7's TOP(S, k): per row, 1 at the k largest similarities, 0 elsewhere (exactly k ones
    per row; ties resolved by ``torch.topk``; k is capped at N)."""
    k = min(k, similarity.shape[-1])
    index = similarity.topk(k, dim=-1).indices
    return torch.zeros_like(similarity).scatter_(-1, index, 1.0)


def row_normalize(matrix: torch.Tensor) -> torch.Tensor:
    """Eq. 7's NORM: each row divided by its sum (rows of zeros stay zero)."""
    return matrix / matrix.sum(-1, keepdim=True).clamp_min(EPS)


def refine_attention(attention: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 7, co-neighbour AM refinement: A~ = NORM(TOP(S, k) (.) A) with S from Eq. 6.
    (B, N, N) -> (B, N, N) with rows summing to 1 and at most k non-zeros per row."""
    refined = top_k_mask(co_neighbour_similarity(attention), k)  # S is freed here
    refined.mul_(attention)  # in place on the fresh mask: peak memory ~2 (N, N) maps besides A
    return refined.div_(refined.sum(-1, keepdim=True).clamp_min(EPS))


def diffuse(cams: torch.Tensor, transition: torch.Tensor, steps: int, direction: Direction = "push") -> torch.Tensor:
    """Eq. 8, attention-based CAM diffusion, T = ``steps`` times.

    cams (B, C, N), transition A~ (B, N, N). ``"push"``: M^(t+1) = A~^T M^(t), written for
    row-vector maps as M @ A~ (M'[c, i] = sum_j M[c, j] A~[j, i]); ``"pull"``: M^(t+1) = A~ M^(t),
    i.e. M @ A~^T."""
    if direction not in ("push", "pull"):
        raise ValueError(f"diffusion direction must be 'push' or 'pull', got {direction!r}")
    operator = transition if direction == "push" else transition.transpose(-1, -2)
    # T matmuls of (C, N) x (N, N) cost T C N^2, less than forming A~^T (N^3 per step) as C << N.
    for _ in range(steps):
        cams = cams @ operator
    return cams


def adcam_refine(
    cams: torch.Tensor,
    attention: torch.Tensor,
    mode: RefineMode = "adcam",
    top_k: int = 50,
    steps: int = 2,
    direction: Direction = "push",
) -> torch.Tensor:
    """CAMs on the token grid (B, C, N) (Eq. 2: ReLU, / max) and a row-stochastic patch
    attention A (B, N, N) -> refined CAMs (B, C, N), not renormalised.

    ``mode``: ``"adcam"`` = Eq. 7 refinement then Eq. 8 diffusion (the method);
    ``"diffusion_only"`` = Eq. 8 with A itself (paper Tab. 3 "Att-Diffu Only");
    ``"plain_cam"`` = the CAM unchanged (Tab. 3 "CAM")."""
    if mode == "plain_cam":
        return cams
    if mode == "diffusion_only":
        return diffuse(cams, attention, steps, direction)
    if mode == "adcam":
        return diffuse(cams, refine_attention(attention, top_k), steps, direction)
    raise ValueError(f"refine mode must be 'adcam', 'diffusion_only' or 'plain_cam', got {mode!r}")
