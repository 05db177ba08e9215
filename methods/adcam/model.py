"""AD-CAM's classification networks: two heads (CNN-style CAM head, transformer cls-token
head) and attention capture, on either backbone family.

- :class:`ConformerCAM` (the paper, Sec. 4.1): a :class:`~methods.common.conformer.Conformer`
  (its parameter names unchanged, so official checkpoints load); CNN logits (Eq. 4) =
  FC1(GAP(f_CNN)), transformer logits (Eq. 5) = FC2(cls token); the CAM is FC1's weights
  applied to f_CNN at every position (Eq. 2's F_k = w_k^T f, no bias); the attention matrix is
  the mean over heads and over the L transformer blocks that run (Sec. 4.2).
- :class:`ViTCAM` (same-backbone variant, not in the paper): a timm ViT/DeiT from
  :mod:`methods.common.vit`; CNN-style head = a linear layer on the patch tokens (CAM = its
  weights on each token, logits = GAP), transformer head = a linear layer on the cls token;
  attention from :func:`~methods.common.vit.run_blocks`, averaged the same way. There is only
  one trunk, so ``stop_gradient`` here detaches the patch tokens feeding the CAM head: the trunk
  is then trained by the cls-token loss alone and the CAM head is a probe on it.

Both expose ``forward(x) -> (cnn_logits, transformer_logits)`` (used for training and MACs),
``extract(x, with_attention)`` and ``branch_parameters()`` (for the per-branch learning rates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.common.conformer import CONFORMER_ARCHS, Conformer, LastStage, create_conformer
from methods.common.vit import VIT_ARCHS, create_vit, patch_grid, run_blocks, tokens_to_map

BACKBONES = tuple(CONFORMER_ARCHS) + tuple(VIT_ARCHS)


@dataclass
class CamExtraction:
    """What CAM extraction needs from one forward pass.

    ``cam``: class scores F_k = w_k^T f(x) (B, K, h', w') on the CAM head's grid (before ReLU);
    ``attention``: (B, T, T) over prefix + patch tokens, mean over heads and blocks, or None;
    ``grid``: the token grid (h, w); ``num_prefix``: prefix (cls) tokens in ``attention``."""

    cam: torch.Tensor
    attention: torch.Tensor | None
    grid: tuple[int, int]
    num_prefix: int = 1


class ConformerCAM(Conformer):
    """Conformer + AD-CAM's extraction (see the module docstring)."""

    def extract(self, x: torch.Tensor, with_attention: bool = True) -> CamExtraction:
        feats = self.forward_features(x, attention_mean=with_attention)
        cam = torch.einsum("bchw,kc->bkhw", feats.cnn, self.conv_cls_head.weight)
        return CamExtraction(cam=cam, attention=feats.attention_mean, grid=feats.grid)

    def branch_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"cnn": [], "transformer": []}
        for name, p in self.named_parameters():
            groups[self.branch_of(name)].append((name, p))
        return groups


class ViTCAM(nn.Module):
    """Same-backbone AD-CAM on a plain ViT (see the module docstring)."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        img_size: int,
        pretrained: str | None = None,
        drop_path_rate: float = 0.0,
        stop_gradient: bool = False,
    ) -> None:
        super().__init__()
        self.vit = create_vit(arch, img_size, num_prefix_tokens=1, drop_path_rate=drop_path_rate, pretrained=pretrained)
        dim = self.vit.embed_dim
        self.cam_head = nn.Linear(dim, num_classes)
        self.cls_head = nn.Linear(dim, num_classes)
        for head in (self.cam_head, self.cls_head):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.stop_gradient = stop_gradient
        self.size_multiple = self.vit.patch_embed.patch_size[0]
        self.token_stride = self.size_multiple

    def _heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.vit.num_prefix_tokens
        patches = tokens[:, prefix:]
        if self.stop_gradient:
            patches = patches.detach()
        return self.cam_head(patches.mean(1)), self.cls_head(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(run_blocks(self.vit, x).tokens)

    def extract(self, x: torch.Tensor, with_attention: bool = True) -> CamExtraction:
        depth = len(self.vit.blocks)
        out = run_blocks(self.vit, x, capture=range(depth) if with_attention else ())
        grid = patch_grid(self.vit, x)
        patches = tokens_to_map(out.tokens[:, self.vit.num_prefix_tokens :], grid)
        cam = torch.einsum("bchw,kc->bkhw", patches, self.cam_head.weight)
        attention = None
        if with_attention:
            attention = torch.stack([a.mean(1) for a in out.attentions.values()]).mean(0)
        return CamExtraction(cam=cam, attention=attention, grid=grid, num_prefix=self.vit.num_prefix_tokens)

    def branch_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"cnn": [], "transformer": []}
        for name, p in self.named_parameters():
            groups["cnn" if name.startswith("cam_head.") else "transformer"].append((name, p))
        return groups


CamNet = ConformerCAM | ViTCAM


def build_cam_net(
    backbone: str,
    num_classes: int,
    img_size: int,
    pretrained: str | None = None,
    last_stage: LastStage = "drop",
    drop_path_rate: float = 0.0,
    stop_gradient: bool = True,
) -> CamNet:
    """The CAM network for ``backbone`` (a Conformer or ViT short name)."""
    if backbone in CONFORMER_ARCHS:
        return create_conformer(backbone, num_classes, pretrained, last_stage, drop_path_rate, stop_gradient, cls=ConformerCAM)
    if backbone in VIT_ARCHS:
        return ViTCAM(backbone, num_classes, img_size, pretrained, drop_path_rate, stop_gradient)
    raise ValueError(f"unknown AD-CAM backbone {backbone!r}; known: {sorted(BACKBONES)}")
