"""Attention fusion for WeakTr: the adaptive attention fusion (AAF, paper Sec. 3.1.2, Eqs. 3-5)
and the mean-sum fusion of the paper's baseline (MCTformer, Table 4 "Baseline (mean-sum)").

Both take the per-block attention maps captured from the backbone, a list of K tensors
(B, H, T, T) with T = C + N tokens (C class tokens first), and return one fused (B, T, T) map.
Its rows ``:C`` / columns ``C:`` are the cross-attention (class token -> patch) and its
``C:, C:`` block the patch-attention, exactly as the authors' code slices one map for both.

The "72 heads" of DeiT-S are indexed ``head * K + layer`` (METHODS.md), which is the order
used for the weights ``w`` below.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

AAF_PRIORS = ("features", "attention_avg", "attention_max", "random_fixed")


def split_heads_interleaved(branch: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, D) attention-branch output -> (B, H, T, D/H), head j taking channels
    j, j + H, j + 2H, ... (the interleaved split of the authors' code, METHODS.md AAF step 1;
    not the contiguous split of multi-head attention)."""
    B, T, D = branch.shape
    if D % num_heads:
        raise ValueError(f"embedding width {D} is not divisible by {num_heads} heads")
    return branch.reshape(B, T, D // num_heads, num_heads).permute(0, 3, 1, 2)


def pooled_head_features(branches: Sequence[torch.Tensor], num_heads: int) -> torch.Tensor:
    """K branch outputs (B, T, D) -> per-head token-max-pooled features (B, H*K, D/H), index
    ``head * K + layer`` (METHODS.md AAF steps 1-2: max-pool over all C + N tokens).

    Pools each block right away so only (B, H, D/H) per block is kept, never (B, 72, T, 64)."""
    pooled = [split_heads_interleaved(b, num_heads).amax(dim=2) for b in branches]  # K x (B, H, dh)
    stacked = torch.stack(pooled, dim=2)  # (B, H, K, dh)
    return stacked.flatten(1, 2)


def fuse_weighted(attentions: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Eqs. 4-5: ``(1 / KH) * sum_i w_i * A_i`` over all K*H heads, no renormalisation.

    ``attentions``: K maps (B, H, T, T); ``weights``: (B, H*K) indexed ``head * K + layer``.
    Accumulates block by block so no (B, K*H, T, T) stack is materialised."""
    K = len(attentions)
    B, H = attentions[0].shape[:2]
    if weights.shape != (B, H * K):
        raise ValueError(f"weights must be (B, H*K) = {(B, H * K)}, got {tuple(weights.shape)}")
    w = weights.view(B, H, K)
    fused = None
    for layer, attn in enumerate(attentions):
        term = torch.einsum("bh,bhij->bij", w[:, :, layer].to(attn.dtype), attn)
        fused = term if fused is None else fused + term
    return fused / (H * K)


def mean_sum_fusion(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Baseline fusion (paper Sec. 3.1.2, MCTformer): average the heads of each layer, then sum
    the layers. K maps (B, H, T, T) -> (B, T, T)."""
    fused = None
    for attn in attentions:
        term = attn.mean(dim=1)
        fused = term if fused is None else fused + term
    return fused


class AdaptiveAttentionFusion(nn.Module):
    """AAF (paper Eqs. 3-5), in the authors'-code form by default (METHODS.md):

    1. a prior per head, ``prior`` selecting how (``features``: the code's choice):
       - ``features``: attention-branch outputs split per head (interleaved), max-pooled over
         tokens, then Linear(dh -> ``feat_hidden``) and Linear(``feat_hidden`` -> 1), no
         activation in between;
       - ``attention_avg`` / ``attention_max``: the paper's Eq. 3 pooling of the attention map
         itself (note: a global *average* of a softmax map is exactly 1/T for every head, so
         that prior carries no information; max pooling does);
       - ``random_fixed``: a randomly initialised, frozen prior (paper Table 4 ablation);
    2. FFN: Linear(HK -> hidden, no bias) -> ReLU -> Linear(hidden -> HK, no bias) -> Sigmoid,
       giving weights w (B, HK);
    3. fused map = mean over heads of ``w_i * A_i`` (:func:`fuse_weighted`).
    """

    def __init__(
        self, num_layers: int, num_heads: int, head_dim: int, hidden: int = 0, feat_hidden: int = 8,
        prior: str = "features",
    ) -> None:
        super().__init__()
        if prior not in AAF_PRIORS:
            raise ValueError(f"unknown AAF prior {prior!r}; choose one of {AAF_PRIORS}")
        self.num_layers, self.num_heads, self.prior = num_layers, num_heads, prior
        maps = num_layers * num_heads
        # The code's FFN bottleneck is maps / 8 (72 -> 9; at least 4 so tiny ViTs keep live units);
        # the paper reports 18 (Table 8).
        hidden = hidden or max(4, maps // 8)
        if prior == "features":
            self.feat_proj = nn.Sequential(nn.Linear(head_dim, feat_hidden), nn.Linear(feat_hidden, 1))
        if prior == "random_fixed":
            self.register_buffer("fixed_prior", torch.rand(maps))
        self.ffn = nn.Sequential(
            nn.Linear(maps, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, maps, bias=False),
            nn.Sigmoid(),
        )

    def head_prior(self, attentions: Sequence[torch.Tensor], branches: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-head prior W (B, H*K) before the FFN (Eq. 3's Pooling)."""
        B = attentions[0].shape[0]
        if self.prior == "features":
            feats = pooled_head_features(branches, self.num_heads)  # (B, HK, dh)
            return self.feat_proj(feats).squeeze(-1)
        if self.prior == "random_fixed":
            return self.fixed_prior.expand(B, -1)
        pool = (lambda a: a.mean(dim=(-2, -1))) if self.prior == "attention_avg" else (lambda a: a.amax(dim=(-2, -1)))
        return torch.stack([pool(a) for a in attentions], dim=2).flatten(1, 2)  # (B, H, K) -> (B, HK)

    def forward(
        self, attentions: Sequence[torch.Tensor], branches: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K attention maps (B, H, T, T) and K branch outputs (B, T, D), detached ->
        (fused map (B, T, T), head weights w (B, H*K))."""
        if len(attentions) != self.num_layers:
            raise ValueError(f"AAF built for {self.num_layers} layers, got {len(attentions)} attention maps")
        weights = self.ffn(self.head_prior(attentions, branches))
        return fuse_weighted(attentions, weights), weights
