"""Synthetic pretraining (harness/pretrain.py, harness/pretrain_corpus.py): the corpus, the
official checkpoint formats through the real loaders, the cache, concurrent builds and
``pretrained = "synthetic"`` end to end. Builds use a few steps on a 32 px corpus (seconds)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import pretrain
from harness.pretrain import Recipe, checkpoint_path, ensure_pretrained
from harness.pretrain_corpus import PretrainCorpus, corpus_classes, generate_image, resolve_options
from methods.common import weights as registry

REPO = Path(__file__).resolve().parents[1]
SMALL = {"per_class": 1, "image_size": 32, "shapes": 2, "textures": 2, "part_classes": 1}  # 2 x 2 + 1 = 5 classes
QUICK = Recipe(steps=2, batch_size=4, warmup=1)


def _build(arch: str, directory: Path, seed: int = 0, logs: list[str] | None = None) -> Path:
    return ensure_pretrained(arch, directory, seed, SMALL, QUICK, log=(logs if logs is not None else []).append)


# -- corpus ---------------------------------------------------------------------------------


def test_corpus_classes_and_balance():
    options = resolve_options(SMALL)
    names = [c.name for c in corpus_classes(options)]
    # shapes x textures in table order (triangle, square) x (stripes, checker), then one part class.
    assert names == ["triangle-stripes", "triangle-checker", "square-stripes", "square-checker", "body-knob"]
    corpus = PretrainCorpus({**SMALL, "per_class": 3})
    # image i is class i % 5, so 15 images are 3 per class, in the order 0 1 2 3 4 0 1 ...
    assert corpus.targets.tolist() == [0, 1, 2, 3, 4] * 3
    assert np.bincount(corpus.targets).tolist() == [3, 3, 3, 3, 3]
    # 10 images of 4 classes (labels 0 1 2 3 0 1 2 3 0 1): 3, 3, 2, 2.
    four = resolve_options({**SMALL, "part_classes": 0})
    assert np.bincount([generate_image(four, i)[2] for i in range(10)]).tolist() == [3, 3, 2, 2]
    sample = corpus[7]
    assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
    assert sample.labels.tolist() == [0, 0, 1, 0, 0]  # index 7 -> class 7 % 5 = 2
    assert sample.mask.any() and set(np.unique(sample.mask)) <= {0, 1}


def test_corpus_is_deterministic():
    options = resolve_options(SMALL)
    a, b = generate_image(options, 3), generate_image(options, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    other = generate_image(resolve_options({**SMALL, "seed": 1}), 3)
    assert not np.array_equal(a[0], other[0])
    # An image does not depend on how many images the corpus has.
    assert np.array_equal(PretrainCorpus(SMALL).images[3], PretrainCorpus({**SMALL, "per_class": 4}).images[3])


def test_corpus_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown pretraining corpus option 'colours'"):
        resolve_options({"colours": 3})
    with pytest.raises(ValueError, match="shapes in 1..6"):
        resolve_options({"shapes": 0})


# -- checkpoints in the official formats, through the real loaders ---------------------------


def test_vit_checkpoint_is_deit_format(tmp_path):
    from methods.common.vit import create_vit

    path = _build("vit_synth", tmp_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == ["model"]  # the DeiT release wraps its state dict in "model"
    keys = set(state["model"])
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.3.attn.qkv.weight", "norm.weight", "head.weight"} <= keys
    assert state["model"]["head.weight"].shape == (5, 96)  # 5 corpus classes, width 96
    model = create_vit("vit_synth", 96, num_prefix_tokens=3, pretrained=str(path))  # WeakTr-style: 3 class tokens
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["model"]["blocks.0.attn.qkv.weight"])
    assert model.pos_embed.shape == (1, 3 + 12 * 12, 96)  # 4 x 4 grid (32 px) resampled to 12 x 12


def test_mit_checkpoint_is_segformer_format(tmp_path):
    from methods.common.mit import create_mit, official_mit_keys

    path = _build("mit_synth", tmp_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == official_mit_keys("mit_synth", with_head=True)  # names and order of the release
    model = create_mit("mit_synth", pretrained=str(path))  # strict load
    assert torch.equal(model.block4[1].attn.kv.weight, state["block4.1.attn.kv.weight"])


def test_conformer_checkpoint_loads_strictly(tmp_path):
    from methods.common.conformer import create_conformer

    path = _build("conformer_tiny", tmp_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "conv_trans_6.trans_block.attn.qkv.weight" in state and state["trans_cls_head.weight"].shape[0] == 5
    model = create_conformer("conformer_tiny", num_classes=3, pretrained=str(path), last_stage="drop")
    assert torch.equal(model.conv_trans_2.trans_block.attn.qkv.weight, state["conv_trans_2.trans_block.attn.qkv.weight"])


def test_resnet_checkpoint_loads_into_deeplab(tmp_path):
    from methods.common.deeplab import DeepLabV2

    path = _build("small", tmp_path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "fc.weight" in state and "layer4.0.conv1.weight" in state  # timm / torchvision ResNet names
    net = DeepLabV2(6, "small", pretrained=str(path))
    assert torch.equal(net.backbone.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])


def test_unknown_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(registry.WeightsError, match="no synthetic pretraining for architecture 'resnet9000'"):
        _build("resnet9000", tmp_path)


# -- cache, determinism, concurrency ---------------------------------------------------------


def test_cache_is_reused_and_recorded(tmp_path, monkeypatch):
    logs: list[str] = []
    path = _build("vit_synth", tmp_path, logs=logs)
    assert path == checkpoint_path(tmp_path, "vit_synth", 0, SMALL, QUICK) and path.name.startswith("vit_synth-")
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["arch"] == "vit_synth" and record["recipe"]["steps"] == 2 and record["corpus"]["per_class"] == 1
    assert record["file_sha256"] == registry.sha256_file(path) and record["wall_s"] >= 0
    assert sum(line.startswith("pretraining vit_synth") for line in logs) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a cached checkpoint was trained again")

    monkeypatch.setattr(pretrain, "train_backbone", no_training)
    assert _build("vit_synth", tmp_path, logs=logs) == path
    assert len(logs) == 2  # no new log line either
    # Another seed or other corpus options are another checkpoint.
    assert checkpoint_path(tmp_path, "vit_synth", 1, SMALL, QUICK) != path
    assert checkpoint_path(tmp_path, "vit_synth", 0, {**SMALL, "per_class": 2}, QUICK) != path
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted([path.name, path.with_suffix(".json").name])


def test_same_seed_same_bytes(tmp_path):
    a = _build("vit_synth", tmp_path / "a")
    b = _build("vit_synth", tmp_path / "b")
    c = _build("vit_synth", tmp_path / "c", seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_build_trains_on_one_thread_whatever_the_process_uses(tmp_path):
    """The checkpoint must not depend on the machine's core count: the build runs on one
    torch thread (recorded as such) and gives the caller's thread count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        real = pretrain.normalize

        def spy(images):
            seen.append(torch.get_num_threads())
            return real(images)

        pretrain.normalize = spy
        try:
            path = _build("vit_synth", tmp_path)
        finally:
            pretrain.normalize = real
        assert set(seen) == {1} and torch.get_num_threads() == 2
        assert json.loads(path.with_suffix(".json").read_text())["threads"] == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # spawned interpreters importing torch: ~15 s
def test_parallel_builds_equal_serial_ones(tmp_path, monkeypatch):
    """build_missing with two workers writes the same bytes as builds in this process, and
    builds nothing that is cached."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(pretrain, "default_build", lambda: (dict(SMALL), QUICK))
    pairs = [("vit_synth", 0), ("vit_synth", 1), ("vit_synth", 0)]  # a repeat is built once
    pretrain.build_missing(pairs, tmp_path / "serial", workers=1, log=lambda text: None)
    pretrain.build_missing(pairs, tmp_path / "parallel", workers=2, log=lambda text: None)
    for seed in (0, 1):
        serial = checkpoint_path(tmp_path / "serial" / "pretrained", "vit_synth", seed, SMALL, QUICK)
        parallel = checkpoint_path(tmp_path / "parallel" / "pretrained", "vit_synth", seed, SMALL, QUICK)
        assert serial.read_bytes() == parallel.read_bytes()
    logs: list[str] = []
    pretrain.build_missing(pairs, tmp_path / "parallel", workers=2, log=logs.append)
    assert logs == []


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """A build killed after 2 of 4 steps resumes from its work directory (ResumableLoop) and
    writes the same checkpoint bytes as an uninterrupted build."""
    recipe = Recipe(steps=4, batch_size=4, warmup=1)
    reference = ensure_pretrained("vit_synth", tmp_path / "ref", 0, SMALL, recipe, log=lambda text: None)
    monkeypatch.setattr(pretrain, "CHECKPOINT_EVERY_STEPS", 1)
    real, calls = pretrain.normalize, []

    def interrupted(images):
        calls.append(1)
        if len(calls) == 3:  # the forward pass of step 2: steps 0 and 1 are done and saved
            raise KeyboardInterrupt
        return real(images)

    monkeypatch.setattr(pretrain, "normalize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_pretrained("vit_synth", tmp_path / "run", 0, SMALL, recipe, log=lambda text: None)
    (work,) = (tmp_path / "run").glob(".*.work")
    assert torch.load(work / "pretrain.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(pretrain, "normalize", real)
    resumed = ensure_pretrained("vit_synth", tmp_path / "run", 0, SMALL, recipe, log=lambda text: None)
    assert resumed.read_bytes() == reference.read_bytes() and not work.exists()


_WORKER = """
import sys
from pathlib import Path
from harness.pretrain import Recipe, ensure_pretrained
path = ensure_pretrained("vit_synth", Path(sys.argv[1]), 0, {small!r}, Recipe(steps=2, batch_size=4, warmup=1),
                         log=lambda text: print(text, flush=True))
print("RESULT", path, flush=True)
"""


@pytest.mark.slow  # two fresh interpreters importing torch: ~20 s on a busy machine
def test_two_processes_build_once(tmp_path):
    """Both processes wait on the lock (held here first), then one trains and the other
    finds its file: one 'pretraining' line in all, the same path for both."""
    target = checkpoint_path(tmp_path, "vit_synth", 0, SMALL, QUICK)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = _WORKER.format(small=SMALL)
    with open(tmp_path / f".{target.stem}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        outs = [tmp_path / f"out{i}.txt" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=open(o, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
                 for o in outs]
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in o.read_text() for o in outs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [o.read_text() for o in outs]
            time.sleep(0.2)
    for p in procs:
        assert p.wait(timeout=180) == 0
    texts = [o.read_text() for o in outs]
    assert sum(line.startswith("pretraining vit_synth") for t in texts for line in t.splitlines()) == 1, texts
    assert all(f"RESULT {target}" in t for t in texts), texts
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.work"))


# -- pretrained = "synthetic" through the registry and a trial -------------------------------


def test_synthetic_spelling():
    assert registry.synthetic_seed("synthetic") == 0 and registry.synthetic_seed("Synthetic:3") == 3
    assert registry.synthetic_seed("auto") is None and registry.synthetic_seed(None) is None
    assert registry.source_for("synthetic", "vit_synth") is None
    with pytest.raises(registry.WeightsError, match="non-negative integer seed"):
        registry.synthetic_seed("synthetic:x")


def test_synthetic_needs_the_harness_builder(monkeypatch):
    monkeypatch.setattr(registry, "_synthetic_builder", None)
    with pytest.raises(registry.WeightsError, match="built by the harness"):
        registry.resolve("synthetic", "vit_synth")


@pytest.mark.slow  # a whole (tiny) trial: ~20 s
def test_synthetic_resolves_in_a_tiny_trial(tmp_path, monkeypatch):
    """A cam trial with pretrained=synthetic builds the checkpoint
    before the trial, in <results>/cache/pretrained, and the trial loads it."""
    from harness.cli import main

    monkeypatch.setenv("WSSS_PRETRAIN", "tiny")
    results = tmp_path / "results"
    args = ["run", "--methods", "cam", "--dataset", "synthetic", "--seeds", "0", "--results", str(results),
            "dataset.num_train=6", "dataset.num_val=3", "dataset.image_size=48", "epochs=1", "seg_epochs=1", "crop=48",
            "seg_crop=48", "batch_size=3", "seg_batch_size=3", "eval.gallery_size=1", "cam.pretrained=synthetic",
            "cam.seg_pretrained=synthetic"]
    assert main(args) == 0
    (checkpoint,) = (results / "cache" / "pretrained").glob("vit_synth-*.pth")
    corpus, recipe = pretrain.default_build()
    assert checkpoint == checkpoint_path(results / "cache" / "pretrained", "vit_synth", 0, corpus, recipe)
    assert json.loads(checkpoint.with_suffix(".json").read_text())["recipe"]["steps"] == pretrain.TINY_RECIPE.steps
