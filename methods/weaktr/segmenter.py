"""Online-retraining network (paper Sec. 3.2, Fig. 4, Eq. 8): a Segmenter-style plain-ViT
encoder with a mask-transformer decoder, and its sliding-window multi-scale + flip inference
(METHODS.md Stage 2, following the released code's test procedure).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from methods.common.training import resize_to
from methods.common.vit import create_vit, pad_to_multiple, patch_grid, run_blocks, tokens_to_map


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer (Eq. 8): patch tokens projected to ``dim``, concatenated with
    ``num_classes`` learnable class embeddings, ``depth`` transformer blocks (dropout on
    attention and MLP, as Segmenter), then per block output b:
    ``masks_b = LN_classes(L2norm(T_b P_patch) . L2norm(Q_b P_class)^T)``.

    The paper's ``1/sqrt(D)`` in Eq. 8 is left out (Segmenter's and the code's choice): the
    LayerNorm over classes removes any constant scale anyway. Masks of every block share the
    final norm and projections, which is how the code reads the first block's prediction."""

    def __init__(
        self, num_classes: int, encoder_dim: int, dim: int, depth: int = 2, heads: int = 6, ffn: int = 1536,
        dropout: float = 0.1, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, dim)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=ffn / dim, qkv_bias=True, proj_drop=dropout, attn_drop=dropout, drop_path=r)
            for r in rates
        )
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.proj_patch = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(_init_linear)
        trunc_normal_(self.cls_emb, std=0.02)

    def masks(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Decoder tokens (B, N + K, dim) -> mask logits (B, K, h, w)."""
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.num_classes], x[:, -self.num_classes :]
        patches = F.normalize(patches @ self.proj_patch, dim=-1)
        classes = F.normalize(classes @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
        return tokens_to_map(masks, grid)

    def forward(
        self, patch_tokens: torch.Tensor, grid: tuple[int, int], all_blocks: bool = False
    ) -> list[torch.Tensor]:
        """Patch tokens (B, N, encoder_dim) -> mask logits of the last block, or of every block
        when ``all_blocks`` (list of (B, K, h, w))."""
        x = self.proj_dec(patch_tokens)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if all_blocks or i == len(self.blocks) - 1:
                outputs.append(self.masks(x, grid))
        return outputs


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Segmenter(nn.Module):
    """ViT encoder (one cls token, final LayerNorm) + :class:`MaskTransformerDecoder`.

    ``forward`` takes ImageNet-normalised images (any size: padded to the patch size and cropped
    back) and returns logits (B, num_classes, H, W) upsampled bilinearly, or one per decoder
    block when ``all_blocks``. ``pos_resample`` (``methods.common.vit``): the authors' Segmenter
    resizes position embeddings bilinearly, without antialiasing (``"bilinear"``)."""

    def __init__(
        self, num_classes: int, arch: str = "vit_synth", img_size: int = 96, drop_path: float = 0.1,
        pretrained: str | None = None, decoder_depth: int = 2, decoder_dim: int = 0, decoder_heads: int = 0,
        decoder_ffn: int = 0, dropout: float = 0.1, pos_resample: str = "bilinear",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = create_vit(
            arch, img_size, num_prefix_tokens=1, drop_path_rate=drop_path, pretrained=pretrained,
            pos_resample=pos_resample,
        )
        enc_dim = self.encoder.embed_dim
        dim = decoder_dim or enc_dim
        heads = decoder_heads or self.encoder.blocks[0].attn.num_heads
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        self.decoder = MaskTransformerDecoder(
            num_classes, enc_dim, dim, decoder_depth, heads, decoder_ffn or 4 * dim, dropout
        )

    def forward(self, images: torch.Tensor, all_blocks: bool = False) -> torch.Tensor | list[torch.Tensor]:
        padded, (H, W) = pad_to_multiple(images, self.patch_size)
        grid = patch_grid(self.encoder, padded)
        tokens = run_blocks(self.encoder, padded).tokens[:, self.encoder.num_prefix_tokens :]
        masks = self.decoder(tokens, grid, all_blocks=all_blocks)
        size = padded.shape[-2:]
        masks = [F.interpolate(m, size=size, mode="bilinear", align_corners=False)[..., :H, :W] for m in masks]
        return masks if all_blocks else masks[-1]


def transfer_backbone(source: VisionTransformer, target: VisionTransformer) -> None:
    """Initialise ``target`` (one cls token) from ``source`` (possibly C class tokens) of the same
    architecture: the class tokens and their position embeddings are averaged into one, patch
    position embeddings resampled to the target grid. Not in the paper: a fast-recipe option for
    runs without an ImageNet checkpoint (the CAM backbone is then the only trained ViT)."""
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    n_src = source.num_prefix_tokens
    state["cls_token"] = state["cls_token"].mean(dim=1, keepdim=True)
    pos = state["pos_embed"]
    patch_pos = resample_abs_pos_embed(
        pos[:, n_src:], new_size=target.patch_embed.grid_size, old_size=source.patch_embed.grid_size,
        num_prefix_tokens=0,
    )
    state["pos_embed"] = torch.cat([pos[:, :n_src].mean(dim=1, keepdim=True), patch_pos], dim=1)
    target.load_state_dict(state, strict=True)


# -- inference -------------------------------------------------------------------------------


def window_anchors(size: int, window: int, stride: int) -> list[int]:
    """Window start offsets along one side: every ``stride`` while the window fits, plus a last
    window flush with the end (the released code's layout). ``size`` must be >= ``window``."""
    anchors = [a for a in range(0, size, stride) if a < size - window]
    return anchors + [size - window]


def sliding_window_logits(
    model: Segmenter, images: torch.Tensor, window: int, stride: int, two_block: bool
) -> list[torch.Tensor]:
    """Logits averaged over overlapping ``window`` x ``window`` crops (per decoder block when
    ``two_block``, else only the last). Images smaller than the window are padded with zeros
    (bottom/right) and the logits cropped back."""
    H, W = images.shape[-2:]
    ph, pw = max(0, window - H), max(0, window - W)
    padded = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
    Hp, Wp = padded.shape[-2:]
    sums: list[torch.Tensor] | None = None
    count = torch.zeros(1, 1, Hp, Wp, device=images.device)
    for top in window_anchors(Hp, window, stride):
        for left in window_anchors(Wp, window, stride):
            crop = padded[..., top : top + window, left : left + window]
            outs = model(crop, all_blocks=two_block)
            outs = outs if two_block else [outs]
            if sums is None:
                sums = [torch.zeros(o.shape[0], o.shape[1], Hp, Wp, device=images.device) for o in outs]
            for acc, o in zip(sums, outs):
                acc[..., top : top + window, left : left + window] += o.float()
            count[..., top : top + window, left : left + window] += 1
    return [(s / count)[..., :H, :W] for s in sums]


def view_size(size: tuple[int, int], base_size: int, ratio: float, window: int) -> tuple[int, int]:
    """The size one test view is run at: short side ``base_size * ratio`` (the native size times
    ``ratio`` when ``base_size`` is 0), keeping the aspect ratio, then upscaled so that the
    short side is at least the window (the released code's ``resize``)."""
    h, w = size
    scale = ratio * (base_size / min(h, w) if base_size else 1.0)
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    if min(h, w) < window:
        up = window / min(h, w)
        h, w = max(window, round(h * up)), max(window, round(w * up))
    return h, w


@torch.no_grad()
def segment_probs(
    model: Segmenter,
    images: torch.Tensor,
    ratios: Sequence[float],
    flip: bool,
    window: int,
    stride: int,
    base_size: int = 0,
    two_block: bool = False,
    two_block_weight: float = 0.8,
) -> torch.Tensor:
    """Multi-scale (+ flip) sliding-window inference, following the released code: per view,
    window logits are averaged, resized to the image, flipped back and soft-maxed; the views'
    probabilities are averaged. With ``two_block`` the first and last decoder blocks are kept
    apart and combined as ``0.8 * p1 + p2`` (p1: the block before the last, as the code;
    renormalised to sum to 1). Returns (B, K, H, W)."""
    H, W = images.shape[-2:]
    per_block: list[torch.Tensor] | None = None
    views = 0
    for ratio in ratios:
        resized = resize_to(images, view_size((H, W), base_size, ratio, window))
        for flipped in (False, True) if flip else (False,):
            view = resized.flip(-1) if flipped else resized
            logits = sliding_window_logits(model, view, window, stride, two_block)
            probs = []
            for lg in logits:
                lg = resize_to(lg, (H, W))
                probs.append((lg.flip(-1) if flipped else lg).softmax(dim=1))
            per_block = probs if per_block is None else [a + p for a, p in zip(per_block, probs)]
            views += 1
    per_block = [p / views for p in per_block]
    if two_block:
        return (two_block_weight * per_block[-2] + per_block[-1]) / (1.0 + two_block_weight)
    return per_block[-1]
