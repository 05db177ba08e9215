"""Mix Transformer (MiT), the SegFormer encoder (Xie et al., NeurIPS 2021), which timm lacks.

Written from the architecture's description; parameter names follow the official SegFormer
``mit_b*`` checkpoints (listed by :func:`official_mit_keys`) so those load strictly with
:func:`load_mit_checkpoint` (their ImageNet ``head.*`` is dropped). Stage ``i`` (1..4):

* ``patch_embed{i}``: overlapping patch embedding, ``proj`` = conv (kernel 7 stride 4 for
  stage 1, kernel 3 for the others, padding kernel // 2) + ``norm`` = LayerNorm;
* ``block{i}.{j}``: ``norm1`` -> efficient self-attention ``attn`` (``q``, ``kv`` linears,
  spatial reduction ``sr`` conv + ``norm`` when the ratio is > 1, output ``proj``) ->
  ``norm2`` -> Mix-FFN ``mlp`` (``fc1``, 3x3 depth-wise ``dwconv.dwconv``, GELU, ``fc2``);
* ``norm{i}``: LayerNorm on the stage output, reshaped to a (B, C, H, W) map.

AFA (METHODS.md) sets the stage-4 patch-embedding stride to 1 so stage 4 is at stride 16
(the kernel keeps its shape, so the checkpoint still loads); :data:`MIT_ARCHS` carries the
strides per architecture. The raw attention scores ``q k^T`` (before the ``1/sqrt(d)``
scaling and the softmax) of the blocks asked for are returned by :meth:`MixVisionTransformer.forward`
(AFA reads those of the last stage, whose ratio is 1, so they are N x N over its tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.common.weights import resolve as resolve_weights

LN_EPS = 1e-6  # the official configs use LayerNorm(eps=1e-6)


@dataclass(frozen=True)
class MiTArch:
    """Hyper-parameters of one MiT variant."""

    embed_dims: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    strides: tuple[int, int, int, int] = (4, 2, 2, 1)  # AFA: stage 4 at stride 16
    patch_sizes: tuple[int, int, int, int] = (7, 3, 3, 3)


MIT_ARCHS: dict[str, MiTArch] = {
    "mit_b0": MiTArch(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2)),
    "mit_b1": MiTArch(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2)),
    "mit_b2": MiTArch(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(3, 4, 6, 3)),
    # The original SegFormer strides (stage 4 at stride 32), for completeness.
    "mit_b1_s32": MiTArch(
        embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), strides=(4, 2, 2, 2)
    ),
    # Tiny variant for the 96 px synthetic dataset (0.9 M parameters): narrow stages, one
    # block in stages 1-2, and stages 3-4 at stride 1 so the last stage is at stride 8 (a
    # 12 x 12 grid on 96 px instead of 6 x 6 at stride 16). Not an official architecture.
    "mit_synth": MiTArch(
        embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 4, 4), depths=(1, 1, 2, 2), sr_ratios=(4, 2, 1, 1),
        strides=(4, 2, 1, 1),
    ),
}


def official_mit_keys(arch: str, with_head: bool = True) -> list[str]:
    """Parameter names of an official SegFormer ``mit_*`` ImageNet checkpoint, hard-coded from
    the architecture (not generated from this module), in checkpoint order."""
    spec = MIT_ARCHS[arch]
    keys: list[str] = []
    for stage in range(1, 5):
        for part in ("proj", "norm"):
            keys += [f"patch_embed{stage}.{part}.weight", f"patch_embed{stage}.{part}.bias"]
    for stage in range(1, 5):
        for j in range(spec.depths[stage - 1]):
            names = ["norm1", "attn.q", "attn.kv", "attn.proj"]
            if spec.sr_ratios[stage - 1] > 1:
                names += ["attn.sr", "attn.norm"]
            names += ["norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            for name in names:
                keys += [f"block{stage}.{j}.{name}.weight", f"block{stage}.{j}.{name}.bias"]
        keys += [f"norm{stage}.weight", f"norm{stage}.bias"]
    if with_head:
        keys += ["head.weight", "head.bias"]
    return keys


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (the global RNG: seed it for reproducible training)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: conv (kernel ``patch_size``, ``stride``) + LayerNorm."""

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class EfficientAttention(nn.Module):
    """Multi-head self-attention with spatial reduction of keys/values (ratio ``sr_ratio``)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(
        self, x: torch.Tensor, H: int, W: int, return_scores: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, C) -> (output (B, N, C), raw scores q k^T (B, heads, N, M) or None)."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        kv = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        scores = None
        if return_scores:
            scores = q @ k.transpose(-2, -1)
            out = (scores * self.scale).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), scores


class MixFFN(nn.Module):
    """fc1 -> 3x3 depth-wise conv (position information) -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class DWConv(nn.Module):
    """Depth-wise 3x3 conv on tokens; the extra level matches the official name ``dwconv.dwconv``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)); stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = drop_path

    def forward(
        self, x: torch.Tensor, H: int, W: int, return_scores: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        branch, scores = self.attn(self.norm1(x), H, W, return_scores)
        x = x + drop_path(branch, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x), H, W), self.drop_path, self.training)
        return x, scores


@dataclass
class MiTOutputs:
    """Stage maps (B, C_i, H_i, W_i) for the stages run, and raw q k^T scores
    (B, heads, N, M) of the captured blocks keyed by (stage, block) (1-based stage)."""

    features: list[torch.Tensor]
    scores: dict[tuple[int, int], torch.Tensor]


class MixVisionTransformer(nn.Module):
    """The MiT encoder (no classification head). ``forward(x, capture)`` returns
    :class:`MiTOutputs`; ``capture`` lists (stage, block) pairs (block may be negative)."""

    def __init__(self, arch: MiTArch, in_chans: int = 3, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.arch = arch
        self.embed_dims = list(arch.embed_dims)
        rates = torch.linspace(0, drop_path_rate, sum(arch.depths)).tolist()
        start = 0
        channels = in_chans
        for i in range(4):
            embed = OverlapPatchEmbed(arch.patch_sizes[i], arch.strides[i], channels, arch.embed_dims[i])
            blocks = nn.ModuleList(
                MiTBlock(arch.embed_dims[i], arch.num_heads[i], arch.mlp_ratios[i], arch.sr_ratios[i], rates[start + j])
                for j in range(arch.depths[i])
            )
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(arch.embed_dims[i], eps=LN_EPS))
            start += arch.depths[i]
            channels = arch.embed_dims[i]
        self.apply(_init_weights)

    @property
    def stride(self) -> int:
        """Output stride of the last stage."""
        out = 1
        for s in self.arch.strides:
            out *= s
        return out

    def forward(self, x: torch.Tensor, capture: Iterable[tuple[int, int]] = ()) -> MiTOutputs:
        wanted = {(s, b % self.arch.depths[s - 1]) for s, b in capture}
        out = MiTOutputs(features=[], scores={})
        B = x.shape[0]
        for stage in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{stage}")(x)
            for j, block in enumerate(getattr(self, f"block{stage}")):
                x, scores = block(x, H, W, return_scores=(stage, j) in wanted)
                if scores is not None:
                    out.scores[(stage, j)] = scores
            x = getattr(self, f"norm{stage}")(x)
            x = x.transpose(1, 2).reshape(B, -1, H, W)
            out.features.append(x)
        return out


def _init_weights(module: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal (0.02) linears, unit LayerNorms,
    He-normal convolutions (fan-out over groups)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def create_mit(arch: str, drop_path_rate: float = 0.1, pretrained: str | Path | None = None) -> MixVisionTransformer:
    """A MiT encoder by name (see :data:`MIT_ARCHS`), optionally loaded from a checkpoint:
    a path, ``"auto"`` / a registry name (``methods.common.weights``) or None / ``"none"``."""
    if arch not in MIT_ARCHS:
        raise ValueError(f"unknown MiT architecture {arch!r}; known: {sorted(MIT_ARCHS)}")
    model = MixVisionTransformer(MIT_ARCHS[arch], drop_path_rate=drop_path_rate)
    path = resolve_weights(None if pretrained is None else str(pretrained), arch)
    if path is not None:
        load_mit_checkpoint(model, path)
    return model


def load_mit_checkpoint(model: MixVisionTransformer, path: Path) -> None:
    """Strictly load an official-format ``mit_*.pth`` (a bare state dict, or one under
    ``state_dict`` / ``model``); the ImageNet classifier ``head.*`` is dropped. Any other
    missing or unexpected key is an error."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=True)


def stage_channels(model: MixVisionTransformer) -> Sequence[int]:
    """Channels of the four stage maps."""
    return tuple(model.arch.embed_dims)
