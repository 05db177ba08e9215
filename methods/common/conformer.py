"""Conformer (Peng et al., ICCV 2021): a CNN branch and a transformer branch run side by side
and exchange features through Feature Coupling Units (FCU) at every stage.

timm has no Conformer, so it is written here from the Conformer paper's description, with the
original implementation's module names so its released ImageNet checkpoints (e.g.
``Conformer_small_patch16.pth``) load with ``strict=True``:

- stem ``conv1`` (7x7/2) + ``bn1`` + ReLU + max-pool (stride 4 in all);
- stage 1: ``conv_1`` (bottleneck ``ConvBlock``), ``trans_patch_conv`` (patch embedding from the
  stem, kernel = stride = patch/4) and ``trans_1`` (transformer block on cls + patch tokens);
- ``conv_trans_2`` .. ``conv_trans_<depth>``: one ``ConvTransBlock`` each, made of
  ``cnn_block`` (bottleneck), ``squeeze_block`` (FCUDown: ``conv_project`` 1x1, ``sample_pooling``
  avg-pool to the token grid, ``ln``, ``act``), ``trans_block`` (transformer block fed with the
  sum of the squeezed CNN tokens and the running tokens), ``expand_block`` (FCUUp:
  ``conv_project`` 1x1, ``bn``, ``act``, nearest upsampling to the CNN grid) and
  ``fusion_block`` (bottleneck whose 3x3 conv adds the expanded tokens). Stages of depth/3
  blocks at CNN strides 4, 8, 16; the final fusion block has stride 2 (CNN output at 1/32);
- heads: ``pooling`` (GAP) + ``conv_cls_head`` (CNN) and ``trans_norm`` + ``trans_cls_head`` on
  the cls token (transformer); ``cls_token`` parameter. No position embedding.

Additions for WSSS (none add parameters, so checkpoints still load strictly):

- ``last_stage``: ``"stride2"`` (original, CNN output at 1/32), ``"stride1"`` (the last fusion
  block keeps stride 1, so the CNN map sits on the 1/16 token grid) or ``"drop"`` (skip
  ``conv_trans_<depth>`` entirely, as AD-CAM's paper says: "drop the last Transformer and Conv
  block"; its parameters stay in the state dict so official checkpoints still load);
- ``patch_size`` and ``stage_strides`` (stride of the first block of stages 2 and 3, originally
  (2, 2)) generalise the strides: the tiny synthetic config uses 8 px patches and (2, 1), so a
  96 px image gives a 12x12 token grid while the CNN runs at 1/4, 1/8, 1/8;
- ``stop_gradient``: detaches every tensor that crosses between the branches (stem -> patch
  embedding, CNN -> FCUDown, transformer -> FCUUp), so each head's loss trains only its own
  branch (AD-CAM paper Sec. 4.1, Tab. 3). FCUDown then belongs to the transformer branch and
  FCUUp and the stem to the CNN branch (see :meth:`Conformer.branch_of`);
- attention capture: :meth:`Conformer.forward_features` can return the post-softmax attention
  of chosen transformer blocks and/or their mean over heads and blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from methods.common.vit import attention_weights
from methods.common.weights import resolve as resolve_weights

LastStage = Literal["stride2", "stride1", "drop"]

# Architectures by short name: keyword arguments of :class:`Conformer`.
CONFORMER_ARCHS: dict[str, dict] = {
    # Official sizes (Conformer paper Tab. 1): Ti 23.5M, S 37.7M, B 83.3M with 1000-class heads.
    "conformer_ti": dict(base_channel=64, channel_ratio=1, embed_dim=384, depth=12, num_heads=6),
    "conformer_s": dict(base_channel=64, channel_ratio=4, embed_dim=384, depth=12, num_heads=6),
    "conformer_b": dict(base_channel=64, channel_ratio=6, embed_dim=576, depth=12, num_heads=9),
    # Tiny config for the synthetic dataset: CNN channels 32/64/128 at strides 4/8/8, 6 blocks
    # of width 64 (2 heads) on 8 px patches, so 96 px images give a 12x12 token grid.
    "conformer_tiny": dict(
        base_channel=16, channel_ratio=2, embed_dim=64, depth=6, num_heads=2, patch_size=8, stage_strides=(2, 1)
    ),
}

_bn = partial(nn.BatchNorm2d, eps=1e-6)
_ln = partial(nn.LayerNorm, eps=1e-6)


class ConvBlock(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 (stride) -> 1x1, expansion 4) with an optional 1x1
    projection shortcut (``res_conv``). When given, ``x_t`` (the FCUUp output) is added to the
    input of the 3x3 conv: that is how a fusion block receives the transformer's features."""

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False) -> None:
        super().__init__()
        med = outplanes // 4
        self.conv1 = nn.Conv2d(inplanes, med, 1, bias=False)
        self.bn1 = _bn(med)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(med, med, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(med)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(med, outplanes, 1, bias=False)
        self.bn3 = _bn(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
            self.residual_bn = _bn(outplanes)

    def set_stride(self, stride: int) -> None:
        """Change the block's stride in place (no parameter changes)."""
        self.conv2.stride = (stride, stride)
        if self.res_conv:
            self.residual_conv.stride = (stride, stride)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (block output, the 3x3 conv's activation ``x2`` that FCUDown squeezes)."""
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x2 = self.act2(self.bn2(self.conv2(x if x_t is None else x + x_t)))
        x = self.bn3(self.conv3(x2))
        if self.res_conv:
            shortcut = self.residual_bn(self.residual_conv(shortcut))
        return self.act3(x + shortcut), x2


class FCUDown(nn.Module):
    """CNN map -> tokens: 1x1 conv to the embedding width, average-pool to the token grid,
    LayerNorm, GELU; the running cls token is prepended so the result adds to the tokens."""

    def __init__(self, inplanes: int, outplanes: int, dw_stride: int) -> None:
        super().__init__()
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.sample_pooling = nn.AvgPool2d(kernel_size=dw_stride, stride=dw_stride)
        self.ln = _ln(outplanes)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        x = self.sample_pooling(self.conv_project(x)).flatten(2).transpose(1, 2)
        x = self.act(self.ln(x))
        return torch.cat([x_t[:, :1], x], dim=1)


class FCUUp(nn.Module):
    """Tokens -> CNN map: drop the cls token, 1x1 conv to the CNN width, BN, ReLU, nearest
    upsampling by ``up_stride`` to the CNN grid."""

    def __init__(self, inplanes: int, outplanes: int, up_stride: int) -> None:
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(inplanes, outplanes, 1)
        self.bn = _bn(outplanes)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, _, D = x.shape
        x = x[:, 1:].transpose(1, 2).reshape(B, D, grid[0], grid[1])
        x = self.act(self.bn(self.conv_project(x)))
        return F.interpolate(x, size=(grid[0] * self.up_stride, grid[1] * self.up_stride))


def _transformer_block(dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> Block:
    # timm's Block has the original's parameter names (norm1, attn.qkv, attn.proj, norm2,
    # mlp.fc1, mlp.fc2) and the same computation; LayerNorm eps 1e-6 as in Conformer.
    return Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path, norm_layer=_ln)


class ConvTransBlock(nn.Module):
    """One Conformer block: CNN bottleneck -> FCUDown -> transformer block -> FCUUp -> fusion
    bottleneck. Returns the new CNN map and tokens, and (when asked) the block's attention."""

    def __init__(
        self,
        inplanes: int,
        outplanes: int,
        res_conv: bool,
        stride: int,
        dw_stride: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        last_fusion: bool = False,
    ) -> None:
        super().__init__()
        self.cnn_block = ConvBlock(inplanes, outplanes, stride=stride, res_conv=res_conv)
        if last_fusion:
            self.fusion_block = ConvBlock(outplanes, outplanes, stride=2, res_conv=True)
        else:
            self.fusion_block = ConvBlock(outplanes, outplanes)
        self.squeeze_block = FCUDown(outplanes // 4, embed_dim, dw_stride)
        self.expand_block = FCUUp(embed_dim, outplanes // 4, dw_stride)
        self.trans_block = _transformer_block(embed_dim, num_heads, mlp_ratio, drop_path)
        self.dw_stride = dw_stride

    def forward(
        self, x: torch.Tensor, x_t: torch.Tensor, stop_gradient: bool = False, want_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cross = (lambda t: t.detach()) if stop_gradient else (lambda t: t)
        x, x2 = self.cnn_block(x)
        H, W = x2.shape[-2:]
        x_st = self.squeeze_block(cross(x2), x_t)
        x_t, attn = run_transformer_block(self.trans_block, x_st + x_t, want_attention)
        x_t_r = self.expand_block(cross(x_t), (H // self.dw_stride, W // self.dw_stride))
        x, _ = self.fusion_block(x, x_t_r)
        return x, x_t, attn


def run_transformer_block(block: Block, x: torch.Tensor, want_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A pre-norm transformer block; with ``want_attention`` the attention is computed
    explicitly (same numbers as the fused path) and its weights (B, H, T, T) returned."""
    if not want_attention:
        return block(x), None
    branch, weights = attention_weights(block.attn, block.norm1(x))
    x = x + block.drop_path1(block.ls1(branch))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, weights


@dataclass
class ConformerFeatures:
    """Outputs of :meth:`Conformer.forward_features`.

    ``cnn``: final CNN map (B, C_cnn, h', w'); ``tokens``: cls + patch tokens after
    ``trans_norm`` (B, 1 + N, D); ``grid``: the token grid (h, w); ``attentions``: captured
    blocks' post-softmax attention (B, H, 1 + N, 1 + N) by block index (0 = ``trans_1``);
    ``attention_mean``: mean over heads and all blocks that ran (B, 1 + N, 1 + N), if asked.
    """

    cnn: torch.Tensor
    tokens: torch.Tensor
    grid: tuple[int, int]
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    attention_mean: torch.Tensor | None = None


class Conformer(nn.Module):
    """Conformer with the original parameter names; see the module docstring."""

    def __init__(
        self,
        num_classes: int = 1000,
        patch_size: int = 16,
        base_channel: int = 64,
        channel_ratio: int = 4,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        last_stage: LastStage = "stride2",
        stage_strides: tuple[int, int] = (2, 2),
        stop_gradient: bool = False,
    ) -> None:
        super().__init__()
        if depth % 3 or depth < 3:
            raise ValueError(f"Conformer depth must be a positive multiple of 3, got {depth}")
        cnn_strides = (4, 4 * stage_strides[0], 4 * stage_strides[0] * stage_strides[1])  # per stage
        if patch_size % 4 or any(patch_size % c for c in cnn_strides):
            raise ValueError(
                f"Conformer patch size {patch_size} must be a multiple of the CNN strides {cnn_strides} "
                "(each FCU pools / upsamples by patch_size / CNN stride)"
            )
        if last_stage not in ("stride2", "stride1", "drop"):
            raise ValueError(f"last_stage must be 'stride2', 'stride1' or 'drop', got {last_stage!r}")
        if last_stage == "drop" and depth < 6:
            raise ValueError("last_stage='drop' needs depth >= 6 so the last stage keeps a block (the CNN head's width)")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.last_stage = last_stage
        self.stop_gradient = stop_gradient
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        ch1 = base_channel * channel_ratio
        ch2, ch3 = ch1 * 2, ch1 * 4

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.pooling = nn.AdaptiveAvgPool2d(1)
        self.conv_cls_head = nn.Linear(ch3, num_classes)

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        dw = patch_size // 4
        self.conv_1 = ConvBlock(64, ch1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(64, embed_dim, kernel_size=dw, stride=dw)
        self.trans_1 = _transformer_block(embed_dim, num_heads, mlp_ratio, dpr[0])

        per_stage = depth // 3
        common = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
        for i in range(2, depth + 1):
            stage = (i - 1) // per_stage  # 0, 1, 2: CNN stride 4, 8, 16
            first = stage > 0 and i == stage * per_stage + 1
            in_ch = (ch1, ch1, ch2)[stage] if first else (ch1, ch2, ch3)[stage]
            block = ConvTransBlock(
                in_ch,
                (ch1, ch2, ch3)[stage],
                res_conv=first,
                stride=stage_strides[stage - 1] if first else 1,
                dw_stride=patch_size // cnn_strides[stage],
                drop_path=dpr[i - 1],
                last_fusion=i == depth,
                **common,
            )
            self.add_module(f"conv_trans_{i}", block)

        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        if last_stage == "stride1":
            self.last_block.fusion_block.set_stride(1)

    # -- structure ------------------------------------------------------------------------
    @property
    def last_block(self) -> ConvTransBlock:
        return getattr(self, f"conv_trans_{self.depth}")

    def conv_trans_blocks(self) -> list[ConvTransBlock]:
        """The ConvTransBlocks that run (the last one is skipped with ``last_stage='drop'``)."""
        stop = self.depth if self.last_stage == "drop" else self.depth + 1
        return [getattr(self, f"conv_trans_{i}") for i in range(2, stop)]

    @property
    def num_transformer_blocks(self) -> int:
        """L: transformer blocks that run (``trans_1`` + one per ConvTransBlock)."""
        return 1 + len(self.conv_trans_blocks())

    @property
    def token_stride(self) -> int:
        """Image pixels per token."""
        return self.trans_patch_conv.stride[0] * 4

    @property
    def cnn_stride(self) -> int:
        """Image pixels per cell of the final CNN map."""
        return self.token_stride * (2 if self.last_stage == "stride2" else 1)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (token grid and CNN grid must align)."""
        return max(self.token_stride, self.cnn_stride)

    @staticmethod
    def branch_of(name: str) -> str:
        """``"cnn"`` or ``"transformer"``: which branch a parameter belongs to. The stem and the
        FCUUp units (fed by the transformer, feeding the CNN) count as CNN; the patch
        embedding, FCUDown units and cls token as transformer. With ``stop_gradient`` this is
        exactly which head's loss can reach the parameter."""
        transformer = ("cls_token", "trans_", "squeeze_block")
        parts = name.split(".")
        return "transformer" if any(p.startswith(transformer) for p in parts) else "cnn"

    # -- forward ----------------------------------------------------------------------------
    def forward_features(
        self, x: torch.Tensor, capture: Iterable[int] = (), attention_mean: bool = False
    ) -> ConformerFeatures:
        """Normalised images (B, 3, H, W) with H, W multiples of :attr:`size_multiple` ->
        :class:`ConformerFeatures`. ``capture``: transformer block indices (0 = ``trans_1``,
        negative from the end) whose attention to keep; ``attention_mean``: also return the
        attention averaged over heads and every block that ran (accumulated on the fly, so
        memory holds one (B, T, T) map however many blocks there are)."""
        if x.shape[-2] % self.size_multiple or x.shape[-1] % self.size_multiple:
            raise ValueError(
                f"Conformer input {tuple(x.shape[-2:])} must have sides divisible by {self.size_multiple}; "
                "pad it first (methods.common.vit.pad_to_multiple)"
            )
        cross = (lambda t: t.detach()) if self.stop_gradient else (lambda t: t)
        L = self.num_transformer_blocks
        wanted = {i % L for i in capture}
        out_attn: dict[int, torch.Tensor] = {}
        mean: torch.Tensor | None = None

        def keep(index: int, weights: torch.Tensor | None) -> None:
            nonlocal mean
            if weights is None:
                return
            if index in wanted:
                out_attn[index] = weights
            if attention_mean:
                m = weights.mean(1)
                mean = m if mean is None else mean + m

        want = lambda i: attention_mean or i in wanted  # noqa: E731
        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x, _ = self.conv_1(x_base)
        x_t = self.trans_patch_conv(cross(x_base))
        grid = (x_t.shape[-2], x_t.shape[-1])
        x_t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x_t.flatten(2).transpose(1, 2)], dim=1)
        x_t, w = run_transformer_block(self.trans_1, x_t, want(0))
        keep(0, w)
        for index, block in enumerate(self.conv_trans_blocks(), start=1):
            x, x_t, w = block(x, x_t, stop_gradient=self.stop_gradient, want_attention=want(index))
            keep(index, w)
        return ConformerFeatures(
            cnn=x,
            tokens=self.trans_norm(x_t),
            grid=grid,
            attentions=out_attn,
            attention_mean=None if mean is None else mean / L,
        )

    def heads(self, feats: ConformerFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(CNN logits = FC(GAP(cnn map)), transformer logits = FC(cls token)), both (B, K)."""
        conv_cls = self.conv_cls_head(self.pooling(feats.cnn).flatten(1))
        trans_cls = self.trans_cls_head(feats.tokens[:, 0])
        return conv_cls, trans_cls

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (CNN logits, transformer logits), as the original model."""
        return self.heads(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    # The Conformer initialisation: truncated normal linears, Kaiming convs, unit norms.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


HEAD_KEYS = ("trans_cls_head.", "conv_cls_head.")


def load_conformer_checkpoint(model: Conformer, path: str | Path) -> None:
    """Load an official Conformer checkpoint (a plain state dict, or one under ``model`` /
    ``state_dict``) strictly, except for classifier heads whose class count differs (an
    ImageNet checkpoint into a 20-class model): those keep their fresh initialisation.
    Loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Conformer checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    for key in [k for k in state if k.startswith(HEAD_KEYS)]:
        if key in own and state[key].shape != own[key].shape:
            del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(HEAD_KEYS)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the Conformer: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )


def create_conformer(
    arch: str,
    num_classes: int = 1000,
    pretrained: str | Path | None = None,
    last_stage: LastStage = "stride2",
    drop_path_rate: float = 0.0,
    stop_gradient: bool = False,
    cls: type[Conformer] | None = None,
) -> Conformer:
    """A Conformer by short name (:data:`CONFORMER_ARCHS`), optionally loading a local
    checkpoint: a path, ``"auto"`` / a registry name (``methods.common.weights``) or None /
    ``"none"``. ``cls``: a Conformer subclass to build instead."""
    if arch not in CONFORMER_ARCHS:
        raise ValueError(f"unknown Conformer architecture {arch!r}; known: {sorted(CONFORMER_ARCHS)}")
    model = (cls or Conformer)(
        num_classes=num_classes,
        last_stage=last_stage,
        drop_path_rate=drop_path_rate,
        stop_gradient=stop_gradient,
        **CONFORMER_ARCHS[arch],
    )
    path = resolve_weights(None if pretrained is None else str(pretrained), arch)
    if path is not None:
        load_conformer_checkpoint(model, path)
    return model
