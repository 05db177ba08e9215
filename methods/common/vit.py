"""Plain ViT backbones from timm, with attention capture for the blocks that need it.

timm's attention uses fused ``scaled_dot_product_attention``, which never materialises the
attention weights. Methods that read attention maps (WeakTr's fusion, AFA's affinity on the
DeiT backbone, AD-CAM's diffusion) run the blocks through :func:`run_blocks`, which computes
``softmax(q k^T / sqrt(d))`` explicitly only for the requested blocks and keeps the fused path
everywhere else, so capture costs one (B, H, T, T) tensor per captured block and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from methods.common.weights import resolve as resolve_weights

# Architectures by short name: (timm model name, keyword overrides).
VIT_ARCHS: dict[str, tuple[str, dict]] = {
    # Tiny config for the synthetic dataset: 8x8 patches, 4 blocks, 3 heads, width 96.
    "vit_synth": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=96, depth=4, num_heads=3)),
    "deit_small": ("deit_small_patch16_224", {}),
    "vit_small": ("vit_small_patch16_224", {}),
    "deit_tiny": ("deit_tiny_patch16_224", {}),
}


def create_vit(
    arch: str,
    img_size: int,
    num_prefix_tokens: int = 1,
    drop_path_rate: float = 0.0,
    pretrained: str | None = None,
) -> VisionTransformer:
    """A timm ViT without a classifier head, accepting any input size that is a multiple of
    the patch size (``dynamic_img_size``). ``num_prefix_tokens`` > 1 makes that many class
    tokens (WeakTr). ``pretrained``: a local checkpoint path (loaded with
    ``weights_only=True``), ``"auto"`` / a registry name (``methods.common.weights``:
    fetched into the weights cache when missing) or None / ``"none"`` (random init)."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT architecture {arch!r}; known: {sorted(VIT_ARCHS)}")
    timm_name, overrides = VIT_ARCHS[arch]
    model = timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        **overrides,
    )
    if num_prefix_tokens > 1:
        expand_class_tokens(model, num_prefix_tokens)
    path = resolve_weights(pretrained, arch)
    if path is not None:
        load_pretrained(model, path)
    return model


def expand_class_tokens(model: VisionTransformer, count: int) -> None:
    """Replace the single cls token (and its position embedding) by ``count`` copies."""
    dim = model.embed_dim
    cls = model.cls_token.data
    model.cls_token = nn.Parameter(cls.repeat(1, count, 1))
    pos = model.pos_embed.data  # (1, 1 + N, D): cls position first
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    model.pos_embed = nn.Parameter(torch.cat([cls_pos.repeat(1, count, 1), patch_pos], dim=1))
    model.num_prefix_tokens = count
    assert model.cls_token.shape == (1, count, dim)


def load_pretrained(model: VisionTransformer, path: Path) -> None:
    """Load a single-cls-token ViT/DeiT checkpoint into ``model``: the cls token and its
    position embedding are repeated to ``model.num_prefix_tokens``, patch position
    embeddings are resampled (bicubic) to the model's grid, heads are dropped."""
    from timm.layers import resample_abs_pos_embed

    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith(("head", "fc_norm.", "head_dist", "dist_token"))}
    prefix = model.num_prefix_tokens
    if "cls_token" in state and state["cls_token"].shape[1] != prefix:
        state["cls_token"] = state["cls_token"][:, :1].repeat(1, prefix, 1)
    if "pos_embed" in state:
        pos = state["pos_embed"]
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]  # single-cls-token source checkpoint
        grid = model.patch_embed.grid_size
        patch_pos = resample_abs_pos_embed(patch_pos, new_size=grid, num_prefix_tokens=0, interpolation="bicubic")
        state["pos_embed"] = torch.cat([cls_pos.repeat(1, prefix, 1), patch_pos], dim=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def attention_weights(attn: Attention, x: torch.Tensor, return_scores: bool = False):
    """timm ``Attention`` forward with explicit weights.

    Returns (output after the output projection (B, T, D), post-softmax weights (B, H, T, T)),
    plus the raw scores ``q k^T`` (B, H, T, T, before the scaling and the softmax) as a third
    element when ``return_scores`` (AFA's affinity). Numerically the same computation as the
    fused path.
    """
    B, T, D = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if return_scores:
        scores = q @ k.transpose(-2, -1)
        weights = scores * attn.scale
    else:
        weights = (q * attn.scale) @ k.transpose(-2, -1)
    weights = weights.softmax(dim=-1)
    out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(B, T, D)
    out = getattr(attn, "norm", nn.Identity())(out)
    out = attn.proj_drop(attn.proj(out))
    return (out, weights, scores) if return_scores else (out, weights)


@dataclass
class BlockOutputs:
    """What :func:`run_blocks` returns: final tokens (after the last norm) and, per captured
    block index, the attention weights and the attention-branch output (after projection,
    before the residual, and before layer-scale / drop-path); with ``capture_scores`` also
    the raw ``q k^T`` scores (before scaling and softmax)."""

    tokens: torch.Tensor
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    branch_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)


def _block_with_attention(
    block: Block, x: torch.Tensor, return_scores: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    result = attention_weights(block.attn, block.norm1(x), return_scores=return_scores)
    branch, weights = result[:2]
    x = x + block.drop_path1(block.ls1(branch))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, weights, branch, (result[2] if return_scores else None)


def embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> prefix + patch tokens with position embeddings."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def run_blocks(
    model: VisionTransformer,
    images: torch.Tensor,
    capture: Iterable[int] = (),
    final_norm: bool = True,
    capture_scores: bool = False,
) -> BlockOutputs:
    """Forward through every block, capturing attention for the block indices in ``capture``
    (negative indices count from the end). ``final_norm=False`` returns the last block's
    tokens without the model's final LayerNorm (WeakTr's heads read them un-normalised).
    ``capture_scores=True`` also keeps the captured blocks' raw q k^T scores (AFA)."""
    depth = len(model.blocks)
    wanted = {i % depth for i in capture}
    x = embed(model, images)
    out = BlockOutputs(tokens=x)
    for index, block in enumerate(model.blocks):
        if index in wanted:
            x, weights, branch, scores = _block_with_attention(block, x, capture_scores)
            out.attentions[index] = weights
            out.branch_outputs[index] = branch
            if scores is not None:
                out.scores[index] = scores
        else:
            x = block(x)
    out.tokens = model.norm(x) if final_norm else x
    return out


def patch_grid(model: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    """Token grid (h, w) for an input of this size."""
    p = model.patch_embed.patch_size
    return images.shape[-2] // p[0], images.shape[-1] // p[1]


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (B, N, D) -> feature map (B, D, h, w)."""
    B, N, D = tokens.shape
    return tokens.transpose(1, 2).reshape(B, D, grid[0], grid[1])


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, C, H, W) on the bottom/right to a multiple of ``multiple``; returns the
    padded images and the original (H, W) for cropping results back."""
    H, W = images.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    return (F.pad(images, (0, pw, 0, ph)) if ph or pw else images), (H, W)
