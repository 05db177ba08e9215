"""The WeakTr CAM network (paper Sec. 3.1, Fig. 3): a plain timm ViT with C class tokens,
attention and attention-branch outputs captured on every block, a 3x3 conv coarse-CAM head,
attention fusion (AAF or the mean-sum baseline) and the fine CAM.

Pretrained weights: a local single-cls-token ViT/DeiT checkpoint (``pretrained=<path>``), whose
cls token and its position embedding are repeated C times and whose patch position embeddings
are resampled to the model's grid (``methods.common.vit.load_pretrained``; with the default
``pos_resample="offset_bicubic"``: bicubic without antialiasing at load, and per input the
authors' ``scale_factor = (h + 0.1) / h0`` rule); or ``pretrained="auto"`` (old spelling
``"hub"``) for the registry's checkpoint of the architecture (``methods.common.weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import nn

from methods.common.vit import create_vit, patch_grid, run_blocks, tokens_to_map
from methods.common.weights import is_random_init
from methods.common.weights import resolve as resolve_weights
from methods.weaktr.aaf import AdaptiveAttentionFusion, mean_sum_fusion
from methods.weaktr.cam import class_token_logits, fine_cam, gap_logits, split_attention


def resolve_pretrained(spec: str | None, arch: str) -> str | None:
    """A checkpoint spec -> a local file path (or None for random init), through the weights
    registry (``methods.common.weights``): ``"auto"`` (or the old ``"hub"``) fetches the
    architecture's ImageNet checkpoint into the weights cache once; a registry name fetches
    that one; ``"none"`` is random init; anything else is a local path."""
    path = resolve_weights(spec, arch)
    return None if path is None else str(path)


@dataclass
class WeakTrOutputs:
    """Everything one forward pass of :class:`WeakTrCAMNet` produces."""

    cls_logits: torch.Tensor  # (B, C) from the class tokens
    coarse_logits: torch.Tensor  # (B, C) GAP of the coarse CAM
    fine_logits: torch.Tensor  # (B, C) GAP of the fine CAM
    coarse_cam: torch.Tensor  # (B, C, h, w) conv head output (before ReLU)
    fine_cam: torch.Tensor  # (B, C, h, w) >= 0, the inference CAM
    head_weights: torch.Tensor | None  # (B, H*K) AAF weights, None for mean-sum fusion


class WeakTrCAMNet(nn.Module):
    """ViT with C class tokens + coarse-CAM conv head + attention fusion (METHODS.md Stage 1).

    ``forward`` takes ImageNet-normalised images whose sides are multiples of the patch size.
    Attention maps and branch outputs are captured on every block and detached before fusion,
    as in the authors' code; heads read the last block's tokens without the final LayerNorm.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "vit_synth",
        img_size: int = 96,
        drop_path: float = 0.0,
        pretrained: str | None = None,
        aaf: bool = True,
        aaf_prior: str = "features",
        aaf_hidden: int = 0,
        aaf_feat_hidden: int = 8,
        pos_resample: str = "offset_bicubic",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = create_vit(
            arch, img_size, num_prefix_tokens=num_classes, drop_path_rate=drop_path,
            pretrained=resolve_pretrained(pretrained, arch), pos_resample=pos_resample,
        )
        if is_random_init(pretrained):
            self._init_class_tokens()
        dim = self.backbone.embed_dim
        self.num_layers = len(self.backbone.blocks)
        self.num_heads = self.backbone.blocks[0].attn.num_heads
        self.patch_size = self.backbone.patch_embed.patch_size[0]
        self.head = nn.Conv2d(dim, num_classes, kernel_size=3, padding=1)
        self.aaf = (
            AdaptiveAttentionFusion(
                self.num_layers, self.num_heads, dim // self.num_heads, aaf_hidden, aaf_feat_hidden, aaf_prior
            )
            if aaf
            else None
        )

    @torch.no_grad()
    def _init_class_tokens(self) -> None:
        """Random init (no checkpoint): draw the C class tokens and their position embeddings
        independently (trunc. normal, std 0.02, as the code initialises a fresh model) instead of
        C copies of one token, which would start the class tokens identical."""
        C = self.num_classes
        trunc_normal_(self.backbone.cls_token, std=0.02)
        self.backbone.pos_embed[:, :C] = trunc_normal_(torch.empty_like(self.backbone.pos_embed[:, :C]), std=0.02)

    def captured_bytes_per_image(self, height: int, width: int, bytes_per_float: int = 4) -> int:
        """Bytes of the tensors captured per image: K x H x T^2 attention + K x T x D branch."""
        T = self.num_classes + (height // self.patch_size) * (width // self.patch_size)
        K, H, D = self.num_layers, self.num_heads, self.backbone.embed_dim
        return (K * H * T * T + K * T * D) * bytes_per_float

    def forward(self, images: torch.Tensor) -> WeakTrOutputs:
        C = self.num_classes
        grid = patch_grid(self.backbone, images)
        out = run_blocks(self.backbone, images, capture=range(self.num_layers), final_norm=False)
        tokens = out.tokens
        coarse = self.head(tokens_to_map(tokens[:, C:], grid))
        # Detached, as in the code: the fine-CAM loss must train only the fusion module.
        attentions = [out.attentions[i].detach() for i in range(self.num_layers)]
        if self.aaf is not None:
            branches = [out.branch_outputs[i].detach() for i in range(self.num_layers)]
            fused, weights = self.aaf(attentions, branches)
        else:
            fused, weights = mean_sum_fusion(attentions), None
        cross, patch = split_attention(fused, C, grid)
        fine = fine_cam(coarse, cross, patch)
        return WeakTrOutputs(
            cls_logits=class_token_logits(tokens[:, :C]),
            coarse_logits=gap_logits(coarse),
            fine_logits=gap_logits(fine),
            coarse_cam=coarse,
            fine_cam=fine,
            head_weights=weights,
        )
