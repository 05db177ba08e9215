"""Attention quality of the tiny synthetic backbones: random init vs ``pretrained="synthetic"``.

The figure (issue 15): how much of an object's attention mass stays on the object. For every
image of the synthetic val split (default options) and the backbone's last attention block,
averaged over heads, with the prefix (cls) tokens left out and each query's weights over the
patch tokens renormalised to sum to 1:

    on_object(c) = mean over query tokens q labelled c of  sum over key tokens k labelled c of A[q, k]

where a token is labelled c when more than half of its patch's GT pixels are class c (mixed
tokens are ignored). Reported per backbone as the mean over (image, object) pairs, beside the
object's share of the labelled tokens (what uniform attention would give) and the ratio of the
two (1 = no grouping; higher = attention stays on the object). The pretrained checkpoints come
from (and, when missing, are built into) ``<results>/cache/pretrained``; the backbones are the
ones the synthetic recipes use, at their 96 px input (stride 8, 12 x 12 tokens).

    PYTHONPATH=. python benchmarks/attention_quality.py --results results [--seed 0] [--max-images 48]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from harness.datasets.base import create_dataset
from harness.pretrain import install
from methods.common.conformer import create_conformer
from methods.common.mit import create_mit
from methods.common.training import normalize
from methods.common.vit import create_vit, run_blocks

# backbone -> (build(pretrained) -> model, attention(model, images) -> (B, N, N) patch attention, grid side)
AttentionFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _patch_rows(weights: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, H, T, T) post-softmax weights -> (B, N, N) head-mean patch-to-patch, rows renormalised."""
    a = weights.mean(1)[:, prefix:, prefix:]
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def _vit_attention(model, images):
    out = run_blocks(model, images, capture=[-1])
    return _patch_rows(out.attentions[len(model.blocks) - 1], model.num_prefix_tokens)


def _mit_attention(model, images):
    out = model(images, capture=[(4, -1)])
    (scores,) = out.scores.values()
    return _patch_rows((scores * model.block4[-1].attn.scale).softmax(-1), 0)


def _conformer_attention(model, images):
    feats = model.forward_features(images, capture=[-1])
    (weights,) = feats.attentions.values()
    return _patch_rows(weights, 1)


BACKBONES: dict[str, tuple[Callable[[str | None], torch.nn.Module], AttentionFn]] = {
    "vit_synth": (lambda p: create_vit("vit_synth", 96, pretrained=p), _vit_attention),
    "mit_synth": (lambda p: create_mit("mit_synth", drop_path_rate=0.0, pretrained=p), _mit_attention),
    "conformer_tiny": (lambda p: create_conformer("conformer_tiny", num_classes=5, pretrained=p, last_stage="drop"),
                       _conformer_attention),
}


def token_labels(mask: np.ndarray, side: int) -> np.ndarray:
    """GT mask (S, S) uint8 -> (side * side,) token labels: the class covering > 50 % of the
    token's patch, or -1 (mixed)."""
    classes = int(mask.max()) + 1
    onehot = F.one_hot(torch.from_numpy(mask.astype(np.int64)), classes).permute(2, 0, 1).float()[None]
    share = F.adaptive_avg_pool2d(onehot, side)[0].flatten(1)  # (classes, side * side)
    best, label = share.max(0)
    return torch.where(best > 0.5, label, torch.full_like(label, -1)).numpy()


@torch.no_grad()
def attention_quality(model: torch.nn.Module, attention: AttentionFn, samples: list) -> dict[str, float]:
    """Mean on-object attention share, mean object token share and their mean ratio over
    (image, object) pairs of ``samples`` (each with image (S, S, 3) uint8 and mask)."""
    model.eval()
    on, area, ratio = [], [], []
    for start in range(0, len(samples), 16):
        batch = samples[start : start + 16]
        images = torch.from_numpy(np.stack([s.image for s in batch])).permute(0, 3, 1, 2).float() / 255.0
        attn = attention(model, normalize(images)).numpy()  # (B, N, N)
        side = int(round(attn.shape[-1] ** 0.5))
        for b, sample in enumerate(batch):
            labels = token_labels(sample.mask, side)
            valid = labels >= 0
            for c in set(labels[valid].tolist()) - {0}:
                obj = labels == c
                mass = attn[b][obj][:, obj].sum(1).mean()
                share = obj.sum() / valid.sum()
                on.append(mass)
                area.append(share)
                ratio.append(mass / share)
    return {"on_object": 100 * float(np.mean(on)), "object_area": 100 * float(np.mean(area)),
            "ratio": float(np.mean(ratio)), "objects": len(on)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (pretrained=synthetic:<seed>)")
    parser.add_argument("--max-images", type=int, default=48)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    args = parser.parse_args()
    install(args.results / "cache")
    split = create_dataset("synthetic", None, args.results / "cache", {}).split("val")
    samples = [split[i] for i in range(min(len(split), args.max_images))]
    print("| backbone | init | attention on object (%) | object token share (%) | ratio | objects |")
    print("|---|---|---|---|---|---|")
    for name in args.backbones.split(","):
        build, attention = BACKBONES[name]
        for init in ("none", f"synthetic:{args.seed}"):
            torch.manual_seed(args.seed)
            q = attention_quality(build(init), attention, samples)
            print(f"| {name} | {init} | {q['on_object']:.1f} | {q['object_area']:.1f} | {q['ratio']:.2f} | {q['objects']} |", flush=True)


if __name__ == "__main__":
    main()
