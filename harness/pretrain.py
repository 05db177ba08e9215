"""Synthetic pretraining: the tiny backbones trained on the generated classification corpus
(:mod:`harness.pretrain_corpus`), the stand-in for the ImageNet checkpoints of the papers.

``pretrained = "synthetic"`` (or ``"synthetic:<seed>"``) in a method's config resolves through
the weights registry (``methods.common.weights.resolve``) to :func:`ensure_pretrained`, which
:func:`install` sets up in every process that runs trials. For one (architecture, corpus
options, training recipe, seed) the checkpoint is trained once and cached as

    <results>/cache/pretrained/<arch>-<key>.pth     the checkpoint, official key format
    <results>/cache/pretrained/<arch>-<key>.json    what it is: corpus, recipe, seed, cost, accuracy

where ``key`` hashes everything that determines it (:func:`cache_key`). The checkpoint uses
the key names and layout of the family's released ImageNet checkpoints, so it loads through
the very loaders that read those: DeiT / timm ViT (``{"model": state}``, ``cls_token``,
``pos_embed``, ``blocks.N...``, ``head``; ``methods.common.vit.load_pretrained``), SegFormer
``mit_*.pth`` (flat, ``patch_embed1...``, ``block1.0...``, ``head``; ``load_mit_checkpoint``),
Conformer (flat, ``conv_trans_N...``, both class heads; ``load_conformer_checkpoint``) and
timm / torchvision ResNet (flat, ``conv1...``, ``layerN...``, ``fc``;
``methods.common.deeplab.load_backbone``). The classifier heads carry the corpus classes and
are dropped (or, for the Conformer, replaced) by those loaders.

Training: cross-entropy with label smoothing on the corpus (the Conformer: the mean of its CNN
and transformer heads' losses, as its paper trains), AdamW, linear warm-up + cosine decay,
random rescale / crop / flip, ImageNet normalisation, batches from
``methods.common.loop.ResumableLoop`` (seeded per (seed, epoch, index); an interrupted build
resumes from its work directory). Weight init is seeded from (seed, arch). A build trains on
one torch thread whatever the process uses (a thread count splits float sums differently), so
the same seed gives the same checkpoint bytes on any machine with the same library versions
(and vector units); ``wsss-bench run`` builds the missing ones in parallel processes
(:func:`build_missing`).

Concurrency: a builder holds an exclusive ``fcntl`` lock on ``.<arch>-<key>.lock`` while it
trains; a second process asking for the same checkpoint waits on the lock and then finds the
file. The file is written to a temporary name and renamed into place (after its JSON record),
so a present ``.pth`` is always complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from harness.profiling import measure
from harness.pretrain_corpus import PretrainCorpus, generate_image, options_digest, resolve_options
from methods.base import StageContext
from methods.common import weights as registry
from methods.common.conformer import CONFORMER_ARCHS, Conformer
from methods.common.deeplab import SEG_ARCHS
from methods.common.data import mix_seed
from methods.common.loop import ResumableLoop
from methods.common.mit import MIT_ARCHS, MixVisionTransformer, official_mit_keys
from methods.common.training import CropAugment, normalize, seeded, set_lr, warmup_cosine_lr
from methods.common.vit import VIT_ARCHS

PRETRAIN_VERSION = 3  # bump when the training code changes what a checkpoint holds
VAL_PER_CLASS = 8  # held-out images per class for the recorded accuracy
CHECKPOINT_EVERY_S = 60.0  # an interrupted build resumes from its last mid-build checkpoint ...
CHECKPOINT_EVERY_STEPS = 0  # ... written this often (0: by time only)

Log = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Recipe:
    """How a backbone is trained on the corpus (steps of ``batch_size`` images)."""

    steps: int = 600  # about 5 epochs of the default corpus; a tiny ViT leaves chance level after ~250
    batch_size: int = 16  # small batches: more updates in the same CPU time
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 30
    label_smoothing: float = 0.1
    scale_range: tuple[float, float] = (0.8, 1.2)


def family_of(arch: str) -> str:
    """``vit`` | ``mit`` | ``conformer`` | ``resnet`` for an architecture short name.
    Errors: WeightsError for an architecture outside those tables."""
    for family, table in (("vit", VIT_ARCHS), ("mit", MIT_ARCHS), ("conformer", CONFORMER_ARCHS), ("resnet", SEG_ARCHS)):
        if arch in table:
            return family
    known = sorted([*VIT_ARCHS, *MIT_ARCHS, *CONFORMER_ARCHS, *SEG_ARCHS])
    raise registry.WeightsError(f"pretrained='synthetic': no synthetic pretraining for architecture {arch!r} (known: {', '.join(known)}).")


# -- classifiers over the corpus, each able to write its family's official checkpoint -------


class _Classifier(nn.Module):
    """A backbone with a corpus-class head. ``forward`` returns a list of logits (B, K)."""

    def official_checkpoint(self) -> dict[str, Any]:
        raise NotImplementedError


class _ViTClassifier(_Classifier):
    def __init__(self, arch: str, num_classes: int, image_size: int) -> None:
        super().__init__()
        name, overrides = VIT_ARCHS[arch]
        # Mean-pooled patch tokens (fc_norm off, so the final norm keeps its official name
        # ``norm``). DeiT pools through the cls token; at this recipe that head reached 8.5 %
        # held-out accuracy against 17.0 % for this one (the README has what each does to
        # the attention; their effect on the trials was not measured).
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size,
                                     global_pool="avg", fc_norm=False, **overrides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]

    def official_checkpoint(self) -> dict[str, Any]:
        return {"model": self.net.state_dict()}  # the DeiT release layout


class _MiTClassifier(_Classifier):
    def __init__(self, arch: str, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.encoder_arch = arch
        self.encoder = MixVisionTransformer(MIT_ARCHS[arch], drop_path_rate=0.0)
        self.head = nn.Linear(MIT_ARCHS[arch].embed_dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # SegFormer's ImageNet classifier: mean over the last stage's tokens, then head.
        return [self.head(self.encoder(x).features[-1].mean(dim=(2, 3)))]

    def official_checkpoint(self) -> dict[str, Any]:
        state = {**self.encoder.state_dict(), "head.weight": self.head.weight.data, "head.bias": self.head.bias.data}
        return {key: state[key] for key in official_mit_keys(self.encoder_arch)}  # the release's key order


class _ConformerClassifier(_Classifier):
    def __init__(self, arch: str, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.net = Conformer(num_classes=num_classes, **CONFORMER_ARCHS[arch])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))

    def official_checkpoint(self) -> dict[str, Any]:
        return self.net.state_dict()


class _ResNetClassifier(_Classifier):
    def __init__(self, arch: str, num_classes: int, image_size: int) -> None:
        super().__init__()
        spec = SEG_ARCHS[arch]
        if isinstance(spec, str):
            self.net = timm.create_model(spec, pretrained=False, num_classes=num_classes)
        else:
            self.net = timm.models.resnet.ResNet(**spec, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]

    def official_checkpoint(self) -> dict[str, Any]:
        return self.net.state_dict()


CLASSIFIERS: dict[str, type[_Classifier]] = {
    "vit": _ViTClassifier, "mit": _MiTClassifier, "conformer": _ConformerClassifier, "resnet": _ResNetClassifier,
}


# -- cache ---------------------------------------------------------------------------------


def cache_key(arch: str, seed: int, corpus: dict[str, Any], recipe: Recipe) -> str:
    """12 hex digits of sha256 over everything that determines the checkpoint."""
    text = json.dumps(
        {"arch": arch, "seed": seed, "corpus": options_digest({**corpus, "seed": seed}), "recipe": asdict(recipe),
         "version": PRETRAIN_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_path(directory: Path, arch: str, seed: int = 0, corpus: dict[str, Any] | None = None, recipe: Recipe | None = None) -> Path:
    """Where the checkpoint of (arch, seed, corpus options, recipe) is cached."""
    return Path(directory) / f"{arch}-{cache_key(arch, seed, resolve_options(corpus), recipe or Recipe())}.pth"


def ensure_pretrained(
    arch: str,
    directory: Path,
    seed: int = 0,
    corpus: dict[str, Any] | None = None,
    recipe: Recipe | None = None,
    log: Log = _stderr,
) -> Path:
    """The cached checkpoint of ``arch`` pretrained on the corpus, trained now (under a file
    lock, written atomically, with a log line stating its cost) when not cached yet.
    Errors: WeightsError for an architecture without a pretraining recipe."""
    family = family_of(arch)
    recipe = recipe or Recipe()
    options = resolve_options({**(corpus or {}), "seed": seed})
    target = checkpoint_path(directory, arch, seed, options, recipe)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.stem}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is pretraining {arch} -> {target}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if target.is_file():  # built by another process while we waited
            return target
        log(f"pretraining {arch} on the synthetic corpus (seed {seed}; first use, cached afterwards) -> {target}")
        workdir = target.parent / f".{target.stem}.work"
        workdir.mkdir(exist_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread on every machine: float sums split per thread change the bytes
        try:
            with measure(torch.device("cpu")) as cost:
                checkpoint, stats = train_backbone(arch, family, options, recipe, seed, workdir)
        finally:
            torch.set_num_threads(threads)
        stats.update(wall_s=round(cost.wall_s, 1), cpu_s=round(cost.cpu_s, 1))
        staged = target.with_name(target.name + ".tmp")
        torch.save(checkpoint, staged)
        record = {
            "arch": arch, "family": family, "seed": seed, "corpus": options, "recipe": asdict(recipe),
            "version": PRETRAIN_VERSION, "file": target.name, "file_sha256": registry.sha256_file(staged),
            "torch": torch.__version__, "threads": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **stats,
        }
        json_tmp = target.with_suffix(".json.tmp")
        json_tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(json_tmp, target.with_suffix(".json"))
        os.replace(staged, target)
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"pretrained {arch} in {stats['wall_s']:.0f} s wall / {stats['cpu_s']:.0f} s CPU "
            f"({recipe.steps} steps x {recipe.batch_size}; held-out corpus accuracy {stats['val_accuracy']:.1f} %)")
    return target


def train_backbone(
    arch: str, family: str, options: dict[str, Any], recipe: Recipe, seed: int, workdir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``arch`` with a corpus head: (official-format checkpoint, stats). Resumes from
    ``workdir`` when an earlier build was interrupted."""
    python_rng = random.getstate()  # a resumed loop restores Python's RNG too: give the caller's back
    try:
        with seeded(mix_seed(seed, arch, "init"), torch.device("cpu")):
            return _train(arch, family, options, recipe, seed, workdir)
    finally:
        random.setstate(python_rng)


def _train(arch: str, family: str, options: dict[str, Any], recipe: Recipe, seed: int, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The body of :func:`train_backbone`, run under its seeded RNG."""
    corpus = PretrainCorpus(options)
    size = int(options["image_size"])
    model = CLASSIFIERS[family](arch, corpus.num_classes, size)
    decays = {n: p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if decays[n]]
    no_decay = [p for n, p in model.named_parameters() if not decays[n]]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr
    )
    ctx = StageContext(torch.device("cpu"), seed, workdir, checkpoint_every_steps=CHECKPOINT_EVERY_STEPS,
                       checkpoint_every_s=CHECKPOINT_EVERY_S)
    loop = ResumableLoop(ctx, "pretrain", {"model": model}, {"optimizer": optimizer}, recipe.steps)
    augment = CropAugment(crop=size, scale_range=recipe.scale_range)
    model.train()
    losses: list[float] = []
    for step, batch in loop.batches(corpus, recipe.batch_size, augment, mix_seed(seed, "pretrain-data")):
        set_lr(optimizer, warmup_cosine_lr(recipe.lr, step, recipe.steps, recipe.warmup))
        targets = batch.labels.argmax(dim=1)
        logits = model(normalize(batch.images_on("cpu")))
        loss = sum(F.cross_entropy(z, targets, label_smoothing=recipe.label_smoothing) for z in logits) / len(logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    stats = {"val_accuracy": held_out_accuracy(model, options, corpus.num_classes),
             "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
             "num_classes": corpus.num_classes, "num_images": len(corpus)}
    return model.official_checkpoint(), stats


@torch.no_grad()
def held_out_accuracy(model: _Classifier, options: dict[str, Any], num_classes: int) -> float:
    """Top-1 accuracy (%) on :data:`VAL_PER_CLASS` images per class drawn after the training
    images (indices N .. N + K * VAL_PER_CLASS - 1, so balanced and never trained on)."""
    model.eval()
    start = num_classes * int(options["per_class"])
    drawn = [generate_image(options, i) for i in range(start, start + num_classes * VAL_PER_CLASS)]
    images = torch.from_numpy(np.stack([d[0] for d in drawn])).permute(0, 3, 1, 2).float() / 255.0
    targets = torch.tensor([d[2] for d in drawn])
    logits = torch.stack(model(normalize(images))).mean(0)
    model.train()
    return round(float((logits.argmax(1) == targets).float().mean()) * 100, 1)


# ``WSSS_PRETRAIN=tiny``: a smoke-test build (2 steps on a 32 px corpus of 2 images per class)
# for the test suite and quick checks; its cache key differs, so it never stands in for the
# real checkpoint.
TINY_CORPUS: dict[str, Any] = {"per_class": 2, "image_size": 32}
TINY_RECIPE = Recipe(steps=2, batch_size=8, warmup=1)


def default_build() -> tuple[dict[str, Any], Recipe]:
    """(corpus options, recipe) of ``pretrained = "synthetic"``: the defaults, or the
    smoke-test build when ``$WSSS_PRETRAIN`` is ``tiny``."""
    if os.environ.get("WSSS_PRETRAIN", "").strip().lower() == "tiny":
        return dict(TINY_CORPUS), TINY_RECIPE
    return {}, Recipe()


def build_missing(pairs: list[tuple[str, int]], cache_root: Path, workers: int = 1, log: Log = _stderr) -> None:
    """Build the not yet cached ``pretrained = "synthetic"`` checkpoints of (architecture,
    seed) pairs under ``<cache_root>/pretrained``, up to ``workers`` at a time in spawned
    processes. Each build trains on one thread, so the bytes equal those of a serial build.
    Errors: WeightsError (raised again here) for an architecture without a recipe."""
    directory = Path(cache_root) / "pretrained"
    corpus, recipe = default_build()
    missing = [(a, s) for a, s in dict.fromkeys(pairs) if not checkpoint_path(directory, a, s, corpus, recipe).is_file()]
    if workers <= 1 or len(missing) <= 1:
        for arch, seed in missing:
            ensure_pretrained(arch, directory, seed, corpus, recipe, log=log)
        return
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pool
    with ProcessPoolExecutor(max_workers=min(workers, len(missing)), mp_context=spawn) as pool:
        builds = [pool.submit(ensure_pretrained, arch, directory, seed, corpus, recipe) for arch, seed in missing]
        for build in builds:
            build.result()


def install(cache_root: Path, log: Log = _stderr) -> None:
    """Make ``pretrained = "synthetic"`` resolve to checkpoints under
    ``<cache_root>/pretrained`` in this process (``cache_root``: the results cache)."""
    directory = Path(cache_root) / "pretrained"

    def build(arch: str, seed: int) -> Path:
        corpus, recipe = default_build()
        return ensure_pretrained(arch, directory, seed, corpus, recipe, log=log)

    registry.set_synthetic_builder(build)
