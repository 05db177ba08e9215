"""Plain ViT backbones from timm, with attention capture for the blocks that need it.

timm's attention uses fused ``scaled_dot_product_attention``, which never materialises the
attention weights. Methods that read attention maps (WeakTr's fusion, AFA's affinity on the
DeiT backbone, AD-CAM's diffusion) run the blocks through :func:`run_blocks`, which computes
``softmax(q k^T / sqrt(d))`` explicitly only for the requested blocks and keeps the fused path
everywhere else, so capture costs one (B, H, T, T) tensor per captured block and nothing more.

Position embeddings: a model keeps one patch-position grid (its native grid, ``img_size /
patch``); a checkpoint's grid is resampled to it once at load, and every input whose token grid
differs is given a grid resampled from the native one. :data:`POS_RESAMPLE_RULES` names how
(``create_vit(pos_resample=...)``); the rule each caller gets:

- ``"timm"`` (timm's dynamic resize: ``F.interpolate`` to the target size, bicubic, antialiased;
  at load and per input): the CAM baseline (``methods/cam``), AFA's ViT option
  (``methods/afa``), AD-CAM (``methods/adcam``), the harness's shared segmenter
  (``harness/common_seg.py``), and WeakTr when ``pos_resample="timm"`` is asked for.
- ``"offset_bicubic"`` (WeakTr's CAM network, the authors' ``models.py``, default there): per
  input, bicubic ``F.interpolate(scale_factor=((h + 0.1) / h0, (w + 0.1) / w0))`` from the
  native h0 x w0 grid, no antialiasing (an unchanged grid is used as is); at load, bicubic to
  the native size without antialiasing.
- ``"bilinear"`` (WeakTr's retraining Segmenter, the authors' ``segm/model/utils.py``, default
  there): bilinear to the target size, no antialiasing, at load and per input.

Only :func:`embed` / :func:`run_blocks` apply a non-timm rule (timm's own ``forward_features``
always uses timm's).
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

# How position embeddings are resampled to another grid (see the module docstring).
POS_RESAMPLE_RULES = ("timm", "offset_bicubic", "bilinear")


def create_vit(
    arch: str,
    img_size: int,
    num_prefix_tokens: int = 1,
    drop_path_rate: float = 0.0,
    pretrained: str | None = None,
    pos_resample: str = "timm",
) -> VisionTransformer:
    """A timm ViT without a classifier head, accepting any input size that is a multiple of
    the patch size (``dynamic_img_size``). ``num_prefix_tokens`` > 1 makes that many class
    tokens (WeakTr). ``pretrained``: a local checkpoint path (loaded with
    ``weights_only=True``), ``"auto"`` / a registry name (``methods.common.weights``:
    fetched into the weights cache when missing) or None / ``"none"`` (random init).
    ``pos_resample`` is one of :data:`POS_RESAMPLE_RULES` (stored as ``model.pos_resample``;
    ValueError otherwise)."""
    if arch not in VIT_ARCHS:
        raise ValueError(f"unknown ViT architecture {arch!r}; known: {sorted(VIT_ARCHS)}")
    if pos_resample not in POS_RESAMPLE_RULES:
        raise ValueError(f"unknown position-embedding rule {pos_resample!r}; known: {POS_RESAMPLE_RULES}")
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
    model.pos_resample = pos_resample
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
    embeddings are resampled to the model's grid by ``model.pos_resample``'s load rule
    (:func:`resample_to_size`; a square checkpoint grid is assumed), heads are dropped."""
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
        side = int(round(patch_pos.shape[1] ** 0.5))
        rule = getattr(model, "pos_resample", "timm")
        patch_pos = resample_to_size(patch_pos, (side, side), tuple(model.patch_embed.grid_size), rule)
        state["pos_embed"] = torch.cat([cls_pos.repeat(1, prefix, 1), patch_pos], dim=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def resample_to_size(
    patch_pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], rule: str
) -> torch.Tensor:
    """Patch position embeddings (1, h0 * w0, D) on ``old_grid`` -> (1, h * w, D) on
    ``new_grid`` by interpolating to the target size: ``"timm"`` bicubic with antialiasing
    (timm's ``resample_abs_pos_embed``), ``"offset_bicubic"`` bicubic without (the load rule of
    WeakTr's CAM code), ``"bilinear"`` bilinear without (WeakTr's Segmenter code);
    ``align_corners=False`` throughout. An unchanged grid is returned as is."""
    from timm.layers import resample_abs_pos_embed

    if tuple(old_grid) == tuple(new_grid):
        return patch_pos
    if rule == "timm":
        return resample_abs_pos_embed(patch_pos, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0)
    mode = "bilinear" if rule == "bilinear" else "bicubic"
    return _grid_to_tokens(F.interpolate(_tokens_to_grid(patch_pos, old_grid), size=tuple(new_grid), mode=mode, align_corners=False))


def resample_offset_bicubic(patch_pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """WeakTr's per-input rule (authors' ``models.py``, after DINO): patch position embeddings
    (1, h0 * w0, D) -> (1, h * w, D) by bicubic ``F.interpolate`` with
    ``scale_factor = ((h + 0.1) / h0, (w + 0.1) / w0)``, no antialiasing, so the source
    coordinate of output index i is ``(i + 0.5) / scale - 0.5`` (not ``(i + 0.5) * h0 / h - 0.5``
    as a size-based resize would use); the +0.1 makes ``floor(h0 * scale)`` equal h. The native
    grid itself is returned unchanged (the code's early exit)."""
    if tuple(old_grid) == tuple(new_grid):
        return patch_pos
    (h0, w0), (h, w) = old_grid, new_grid
    grid = F.interpolate(
        _tokens_to_grid(patch_pos, old_grid), scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic",
        align_corners=False,
    )
    if tuple(grid.shape[-2:]) != (h, w):  # the +0.1 guarantees it; guard against float surprises
        raise RuntimeError(f"offset-bicubic resampling gave grid {tuple(grid.shape[-2:])}, expected {(h, w)}")
    return _grid_to_tokens(grid)


def _tokens_to_grid(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, h * w, D) -> (1, D, h, w) in float32 (interpolation needs it)."""
    return patch_pos.float().reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)


def _grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(1, D, h, w) -> (1, h * w, D)."""
    return grid.permute(0, 2, 3, 1).reshape(1, grid.shape[-2] * grid.shape[-1], grid.shape[1])


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
    """Normalised images (B, 3, H, W) -> prefix + patch tokens with position embeddings
    (B, prefix + h * w, D), the patch grid resampled by ``model.pos_resample``."""
    x = model.patch_embed(images)
    rule = getattr(model, "pos_resample", "timm")
    x = model._pos_embed(x) if rule == "timm" else _pos_embed_by_rule(model, x, rule)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _pos_embed_by_rule(model: VisionTransformer, x: torch.Tensor, rule: str) -> torch.Tensor:
    """timm's ``_pos_embed`` (class tokens concatenated, then position embeddings added) with
    the patch grid resampled by ``rule`` instead of timm's resize. ``x``: (B, h, w, D)."""
    if model.reg_token is not None or model.no_embed_class or model.cls_token is None:
        raise ValueError("position-embedding rules other than 'timm' need a plain ViT (class tokens, no register tokens)")
    B, h, w, D = x.shape
    prefix = model.num_prefix_tokens
    pos = model.pos_embed
    native = tuple(model.patch_embed.grid_size)
    if rule == "offset_bicubic":
        patch_pos = resample_offset_bicubic(pos[:, prefix:], native, (h, w))
    else:
        patch_pos = resample_to_size(pos[:, prefix:], native, (h, w), rule)
    tokens = torch.cat([model.cls_token.expand(B, -1, -1), x.reshape(B, h * w, D)], dim=1)
    pos = torch.cat([pos[:, :prefix], patch_pos.to(pos.dtype)], dim=1)
    return model.pos_drop(tokens + pos)


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
