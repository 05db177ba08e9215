"""Registry of the ImageNet checkpoints the backbones load, with download, verification,
format conversion and a local cache.

Every architecture that has published ImageNet weights maps to one :class:`WeightSource`
(:data:`ARCH_WEIGHTS`). A ``pretrained`` value anywhere in a method's config is resolved by
:func:`resolve`:

* ``None`` / ``""`` / ``"none"``: random initialisation (no file);
* ``"auto"`` (``"hub"``, the old WeakTr spelling, is the same): the registry's checkpoint for
  the architecture, fetched into the cache on first use;
* a registry name (``"deit_small"``, see ``wsss-bench weights list``): that checkpoint;
* ``"synthetic"`` (or ``"synthetic:<seed>"``): the architecture pretrained on the generated
  classification corpus, built once by the harness (``harness.pretrain``, which installs its
  builder with :func:`set_synthetic_builder`) and cached under the results cache;
* anything else: a local file path (the loaders check that it exists).

Cache: ``$WSSS_WEIGHTS``, else ``$XDG_CACHE_HOME/wsss-bench/weights``, else
``~/.cache/wsss-bench/weights``. A cached file is ``<cache>/<source.filename>``, already in
the format the loader reads (converted when the source's key names differ), written
atomically after its checksum passed, so a file present there is trusted. Beside it
``<filename>.json`` records where it came from and the sha256 of what was downloaded.

Sources come in three kinds:

* ``url``: a direct download (torch.hub's ``download_url_to_file``);
* ``hf``: a Hugging Face hub file (``huggingface_hub.hf_hub_download``; the endpoint is
  ``$HF_ENDPOINT`` read at call time). The hub publishes each LFS file's sha256 as its ETag,
  which is checked when the registry has no checksum of its own;
* ``manual``: no stable direct URL (a shared-drive link): the user downloads the file from
  the page and puts it in the cache under the expected name.

Offline (``WSSS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, or any network failure) a missing
file raises :class:`WeightsError` naming the file, the directory to put it in and how to
fetch it ahead of time (``wsss-bench weights fetch``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

# Field metadata key: a config field holding a ``pretrained`` value names the config field
# holding the architecture it is for (see :func:`weights_field`).
WEIGHTS_ARCH = "weights_arch"

RANDOM_INIT = ("", "none", "null")
AUTO = ("auto", "hub")
SYNTHETIC = "synthetic"

# (architecture, pretraining seed) -> checkpoint path; installed by the harness, which owns the
# corpus and the cache (methods never import the harness).
SyntheticBuilder = Callable[[str, int], Path]
_synthetic_builder: SyntheticBuilder | None = None


class WeightsError(RuntimeError):
    """A checkpoint cannot be provided: unknown name, not downloadable, checksum mismatch,
    or offline and not cached. The message says what to do."""


@dataclass(frozen=True)
class WeightSource:
    """One pretrained checkpoint and where it comes from."""

    name: str  # registry key, used by `wsss-bench weights fetch NAME` and `pretrained=NAME`
    description: str
    filename: str  # cached file name, in the format our loader reads
    kind: str  # "url" | "hf" | "manual"
    url: str = ""  # url: the file; manual: the page that links to it
    repo: str = ""  # hf: repository id
    repo_file: str = ""  # hf: file inside the repository
    revision: str = "main"  # hf: branch, tag or commit
    sha256: str = ""  # published digest (or its published prefix) of the downloaded file; "" = none known
    checksum_note: str = "no checksum published; the sha256 of the downloaded file is recorded"
    convert: str = ""  # "" (as downloaded) | "safetensors" | "hf_segformer"
    note: str = ""

    @property
    def location(self) -> str:
        """Where the file comes from, in one line."""
        if self.kind == "hf":
            return f"hf://{self.repo}/{self.repo_file}@{self.revision}"
        if self.kind == "manual":
            return f"manual download from {self.url}"
        return self.url


_TORCH_HUB_PREFIX = "published as the prefix in the file name (torch.hub check_hash convention)"

SOURCES: dict[str, WeightSource] = {
    s.name: s
    for s in (
        WeightSource(
            "deit_small", "DeiT-S/16 ImageNet-1k (Touvron et al. 2021), timm deit_small_patch16_224.fb_in1k",
            "deit_small_patch16_224-cd65a155.pth", "url",
            url="https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth",
            sha256="cd65a155", checksum_note=_TORCH_HUB_PREFIX,
            note="the authors' release; what WeakTr's code loads through timm",
        ),
        WeightSource(
            "deit_tiny", "DeiT-T/16 ImageNet-1k, timm deit_tiny_patch16_224.fb_in1k",
            "deit_tiny_patch16_224-a1311bcf.pth", "url",
            url="https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth",
            sha256="a1311bcf", checksum_note=_TORCH_HUB_PREFIX,
        ),
        WeightSource(
            "vit_small", "ViT-S/16 AugReg ImageNet-21k -> 1k, timm vit_small_patch16_224.augreg_in21k_ft_in1k",
            "vit_small_patch16_224.augreg_in21k_ft_in1k.pth", "hf",
            repo="timm/vit_small_patch16_224.augreg_in21k_ft_in1k", repo_file="model.safetensors",
            checksum_note="the hub's LFS sha256 (ETag) is checked; none in the registry", convert="safetensors",
        ),
        *(
            WeightSource(
                f"mit_{b}", f"MiT-{b.upper()} (SegFormer encoder) ImageNet-1k, HF transformers format",
                f"mit_{b}.pth", "hf", repo=f"nvidia/mit-{b}", repo_file="pytorch_model.bin",
                checksum_note="the hub's LFS sha256 (ETag) is checked; none in the registry",
                convert="hf_segformer",
                note=f"the official mit_{b}.pth (SegFormer release, a shared-drive link) is the same weights "
                     f"under the official key names: put it in the cache as mit_{b}.pth to use it instead",
            )
            for b in ("b0", "b1", "b2")
        ),
        *(
            WeightSource(
                f"conformer_{size}", f"Conformer-{size.upper()}/16 ImageNet-1k (Peng et al. 2021)",
                f"Conformer_{long}_patch16.pth", "manual", url="https://github.com/pengzhiliang/Conformer",
                checksum_note="no checksum published; the sha256 of the file found is recorded",
                note="the release links are Google Drive / Baidu pan pages (no stable direct URL)",
            )
            for size, long in (("ti", "tiny"), ("s", "small"), ("b", "base"))
        ),
        WeightSource(
            "resnet101", "ResNet-101 ImageNet-1k (torchvision IMAGENET1K_V1)", "resnet101-63fe2227.pth", "url",
            url="https://download.pytorch.org/models/resnet101-63fe2227.pth", sha256="63fe2227",
            checksum_note=_TORCH_HUB_PREFIX,
        ),
        WeightSource(
            "resnet50", "ResNet-50 ImageNet-1k (torchvision IMAGENET1K_V1)", "resnet50-0676ba61.pth", "url",
            url="https://download.pytorch.org/models/resnet50-0676ba61.pth", sha256="0676ba61",
            checksum_note=_TORCH_HUB_PREFIX, note="DeepLab-V2 R50 and IRN's backbone (irn.pretrained with arch=resnet50)",
        ),
    )
}

# Architecture short names (methods.common.{vit,mit,conformer,deeplab,irn}) -> registry name.
# Architectures absent here (the tiny synthetic configs) have no pretrained weights.
ARCH_WEIGHTS: dict[str, str] = {
    "deit_small": "deit_small",
    "deit_tiny": "deit_tiny",
    "vit_small": "vit_small",
    "mit_b0": "mit_b0",
    "mit_b1": "mit_b1",
    "mit_b1_s32": "mit_b1",  # same kernels, other strides
    "mit_b2": "mit_b2",
    "conformer_ti": "conformer_ti",
    "conformer_s": "conformer_s",
    "conformer_b": "conformer_b",
    "deeplab_v2_r101": "resnet101",
    "deeplab_v2_r50": "resnet50",
    "resnet50": "resnet50",  # IRN's backbone (methods.common.irn, arch="resnet50")
}


def weights_field(arch_field: str, default: str | None = None) -> Any:
    """A dataclass field for a ``pretrained`` value whose architecture is in config field
    ``arch_field``; the harness finds such fields (dry-run, fetching before a sweep)."""
    return dataclasses.field(default=default, metadata={WEIGHTS_ARCH: arch_field})


def config_weight_fields(config_cls: type) -> dict[str, str]:
    """``{pretrained field: architecture field}`` of a config dataclass."""
    return {f.name: f.metadata[WEIGHTS_ARCH] for f in dataclasses.fields(config_cls) if WEIGHTS_ARCH in f.metadata}


def cache_dir() -> Path:
    """The weights cache: ``$WSSS_WEIGHTS``, else ``$XDG_CACHE_HOME/wsss-bench/weights``,
    else ``~/.cache/wsss-bench/weights`` (not created here)."""
    if os.environ.get("WSSS_WEIGHTS"):
        return Path(os.environ["WSSS_WEIGHTS"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "wsss-bench" / "weights"


def offline() -> bool:
    """True when downloads are disabled (``WSSS_OFFLINE`` or ``HF_HUB_OFFLINE`` set true)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("WSSS_OFFLINE", "HF_HUB_OFFLINE"))


def is_random_init(spec: str | None) -> bool:
    return spec is None or str(spec).strip().lower() in RANDOM_INIT


def set_synthetic_builder(builder: SyntheticBuilder | None) -> None:
    """Install (or with None remove) what builds / finds the synthetic pretrained checkpoint
    of an architecture: ``builder(arch, seed) -> path``."""
    global _synthetic_builder
    _synthetic_builder = builder


def synthetic_seed(spec: str | None) -> int | None:
    """The pretraining seed of a ``"synthetic"`` / ``"synthetic:<seed>"`` value (0 for the
    bare spelling), or None for any other value. Errors: WeightsError for a seed that is not
    a non-negative integer."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text == SYNTHETIC:
        return 0
    if not text.startswith(SYNTHETIC + ":"):
        return None
    seed = text[len(SYNTHETIC) + 1:]
    if not seed.isdigit():
        raise WeightsError(f"pretrained={spec!r}: expected 'synthetic' or 'synthetic:<seed>' with a non-negative integer seed.")
    return int(seed)


def source_for(spec: str | None, arch: str) -> WeightSource | None:
    """The registry entry a ``pretrained`` value names, or None for random init or a local
    path. Errors: ``auto`` for an architecture without published weights."""
    if is_random_init(spec) or synthetic_seed(spec) is not None:
        return None
    text = str(spec).strip()
    if text.lower() in AUTO:
        if arch not in ARCH_WEIGHTS:
            raise WeightsError(
                f"pretrained={text!r}: no ImageNet checkpoint is registered for architecture {arch!r} "
                f"(registered: {', '.join(sorted(ARCH_WEIGHTS))}). Pass pretrained=none for random "
                f"initialisation or a checkpoint file path."
            )
        return SOURCES[ARCH_WEIGHTS[arch]]
    if text.startswith("hub:"):  # the old WeakTr spelling hub:<name>
        if text[4:] not in SOURCES:
            raise WeightsError(f"pretrained={text!r}: {text[4:]!r} is not a registered checkpoint (registered: {', '.join(SOURCES)}).")
        text = text[4:]
    return SOURCES.get(text)


def cached_path(source: WeightSource) -> Path:
    return cache_dir() / source.filename


def is_cached(source: WeightSource) -> bool:
    return cached_path(source).is_file()


def describe(spec: str | None, arch: str) -> tuple[str, str]:
    """(source text, cache state) of a ``pretrained`` value for ``--dry-run`` and listings:
    state is ``cached``, ``missing`` (will be downloaded), ``manual`` (must be put there by
    hand), ``file`` / ``no file`` (a local path), ``-`` (random init) or ``error``."""
    try:
        source = source_for(spec, arch)
    except WeightsError:
        return (f"{spec} ({arch}): none registered", "error")
    if source is None:
        if is_random_init(spec):
            return ("random init", "-")
        if synthetic_seed(spec) is not None:
            return (f"synthetic pretraining of {arch} (seed {synthetic_seed(spec)})", "built on first use")
        return (str(spec), "file" if Path(str(spec)).expanduser().is_file() else "no file")
    state = "cached" if is_cached(source) else ("manual" if source.kind == "manual" else "missing")
    return (f"{source.name} ({source.location})", state)


def resolve(spec: str | None, arch: str, download: bool = True) -> Path | None:
    """A ``pretrained`` value -> the checkpoint file to load, or None for random init.

    Registry values are fetched into the cache when missing and ``download`` (errors:
    :class:`WeightsError`); ``"synthetic"`` goes to the installed builder (which trains the
    checkpoint on first use, whatever ``download`` says); a local path is returned as given."""
    seed = synthetic_seed(spec)
    if seed is not None:
        if _synthetic_builder is None:
            raise WeightsError(
                f"pretrained={spec!r} ({arch}): the synthetic pretraining is built by the harness "
                f"(harness.pretrain.install), which has not been set up in this process."
            )
        return _synthetic_builder(arch, seed)
    source = source_for(spec, arch)
    if source is None:
        return None if is_random_init(spec) else Path(str(spec)).expanduser()
    return fetch(source) if download else cached_path(source)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _where_to_put(source: WeightSource) -> str:
    expected = f"sha256 {source.sha256}{'...' if len(source.sha256) < 64 else ''}" if source.sha256 else source.checksum_note
    return (
        f"Put the file {source.filename} ({expected}) in {cache_dir()} (the weights cache: $WSSS_WEIGHTS, "
        f"default ~/.cache/wsss-bench/weights), or run `wsss-bench weights fetch {source.name}` on a machine "
        f"with network access and copy it there." + (f" Note: {source.note}." if source.note else "")
    )


def fetch(source: WeightSource, force: bool = False) -> Path:
    """Make ``source`` available in the cache and return its path.

    Downloads to a temporary file in the cache directory, checks the sha256 (the registry's
    published digest or prefix; for hub files the hub's LFS sha256), converts the key names
    when needed and renames the result into place, so an interrupted fetch leaves nothing
    behind. Errors: :class:`WeightsError` (offline, download failure, checksum mismatch,
    manual source missing)."""
    target = cached_path(source)
    if target.is_file() and not force:
        if source.kind == "manual" and not _manifest_path(target).is_file():
            _check_manual(source, target)
        return target
    if source.kind == "manual":
        raise WeightsError(
            f"Checkpoint {source.name} ({source.description}) has no stable direct download URL "
            f"({source.note or 'a shared-drive link'}). Download {source.filename} from {source.url} and put it in "
            f"{cache_dir()} (the weights cache: $WSSS_WEIGHTS, default ~/.cache/wsss-bench/weights); "
            f"{source.checksum_note}."
        )
    if offline():
        raise WeightsError(f"Checkpoint {source.name} is not cached and downloads are off (WSSS_OFFLINE / HF_HUB_OFFLINE). {_where_to_put(source)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        try:
            downloaded, info = _DOWNLOADERS[source.kind](source, Path(tmp))
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
            raise WeightsError(
                f"Could not download checkpoint {source.name} from {source.location} ({type(exc).__name__}: {exc}). "
                f"{_where_to_put(source)}"
            ) from None
        digest = sha256_file(downloaded)
        expected = source.sha256 or info.get("hub_sha256", "")
        if expected and not digest.startswith(expected.lower()):
            raise WeightsError(
                f"Checksum mismatch for checkpoint {source.name} from {source.location}: sha256 {digest}, expected "
                f"{expected}{'...' if len(expected) < 64 else ''} ({source.checksum_note if source.sha256 else 'the hub ETag'}). "
                f"The download was discarded. {_where_to_put(source)}"
            )
        staged = Path(tmp) / (source.filename + ".part")
        _CONVERTERS[source.convert](downloaded, staged)
        manifest = {
            "name": source.name, "source": source.location, "downloaded_sha256": digest,
            "expected_sha256": source.sha256 or None, "checksum": source.checksum_note, "conversion": source.convert or None,
            "file_sha256": sha256_file(staged), "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info,
        }
        os.replace(staged, target)
        _write_manifest(target, manifest)
    return target


def _manifest_path(target: Path) -> Path:
    return target.with_name(target.name + ".json")


def _write_manifest(target: Path, manifest: dict[str, Any]) -> None:
    path = _manifest_path(target)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_manual(source: WeightSource, target: Path) -> None:
    """First use of a hand-placed file: check a known checksum, record the sha256 found."""
    digest = sha256_file(target)
    if source.sha256 and not digest.startswith(source.sha256.lower()):
        raise WeightsError(f"Checksum mismatch for {target}: sha256 {digest}, expected {source.sha256}. Replace the file with the one from {source.url}.")
    _write_manifest(target, {"name": source.name, "source": source.location, "downloaded_sha256": digest,
                             "file_sha256": digest, "expected_sha256": source.sha256 or None,
                             "checksum": source.checksum_note, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# -- downloaders: (source, temporary directory) -> (downloaded file, manifest extras) -------


def _download_url(source: WeightSource, tmp: Path) -> tuple[Path, dict[str, Any]]:
    dst = tmp / source.filename
    torch.hub.download_url_to_file(source.url, str(dst), progress=sys.stderr.isatty())
    return dst, {"url": source.url}


def _download_hf(source: WeightSource, tmp: Path) -> tuple[Path, dict[str, Any]]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not at import, so it can change
    url = hf_hub_url(source.repo, source.repo_file, revision=source.revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    # Pin the download to the commit the metadata came from, so file and ETag agree.
    path = hf_hub_download(source.repo, source.repo_file, revision=meta.commit_hash or source.revision,
                           local_dir=tmp / "hub", endpoint=endpoint)
    etag = (meta.etag or "").strip('"').lower()
    info: dict[str, Any] = {"url": url, "commit": meta.commit_hash}
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):  # LFS files: the ETag is the sha256
        info["hub_sha256"] = etag
    return Path(path), info


_DOWNLOADERS: dict[str, Callable[[WeightSource, Path], tuple[Path, dict[str, Any]]]] = {"url": _download_url, "hf": _download_hf}


# -- converters: downloaded file -> a file our loaders read -----------------------------------


def _copy(src: Path, dst: Path) -> None:
    shutil.move(src, dst)


def _from_safetensors(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(str(src)), dst)


def hf_segformer_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face transformers SegFormer / MiT key names -> the official SegFormer names
    that :mod:`methods.common.mit` loads. ``attention.self.key`` and ``.value`` are
    concatenated (key rows first) into the official ``attn.kv``; stage indices shift from
    0-based (``block.0``) to 1-based (``block1``); the classifier becomes ``head``.
    Errors: ValueError on a key outside that layout."""
    renames = (  # inside a block, applied in order
        ("layer_norm_1.", "norm1."), ("layer_norm_2.", "norm2."), ("attention.self.query.", "attn.q."),
        ("attention.self.sr.", "attn.sr."), ("attention.self.layer_norm.", "attn.norm."),
        ("attention.output.dense.", "attn.proj."), ("mlp.dense1.", "mlp.fc1."), ("mlp.dense2.", "mlp.fc2."),
        ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv."),
    )
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # official kv key -> {"key": t, "value": t}
    for key, value in state.items():
        name = key.removeprefix("segformer.").removeprefix("encoder.")
        parts = name.split(".")
        if parts[0] == "classifier":
            out["head." + ".".join(parts[1:])] = value
        elif parts[0] == "patch_embeddings":
            sub = {"proj": "proj", "layer_norm": "norm"}.get(parts[2])
            if sub is None:
                raise ValueError(f"unexpected SegFormer key {key!r}")
            out[f"patch_embed{int(parts[1]) + 1}.{sub}.{parts[3]}"] = value
        elif parts[0] == "layer_norm":
            out[f"norm{int(parts[1]) + 1}.{parts[2]}"] = value
        elif parts[0] == "block":
            prefix = f"block{int(parts[1]) + 1}.{parts[2]}."
            rest = ".".join(parts[3:])
            if rest.startswith(("attention.self.key.", "attention.self.value.")):
                which, leaf = rest.split(".")[2], rest.split(".")[3]
                pending.setdefault(f"{prefix}attn.kv.{leaf}", {})[which] = value
                continue
            for old, new in renames:
                if rest.startswith(old):
                    out[prefix + new + rest[len(old):]] = value
                    break
            else:
                raise ValueError(f"unexpected SegFormer key {key!r}")
        else:
            raise ValueError(f"unexpected SegFormer key {key!r}")
    for kv_key, pair in pending.items():
        if set(pair) != {"key", "value"}:
            raise ValueError(f"SegFormer checkpoint has only {sorted(pair)} for {kv_key}")
        out[kv_key] = torch.cat([pair["key"], pair["value"]], dim=0)
    return out


def _from_hf_segformer(src: Path, dst: Path) -> None:
    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save(hf_segformer_to_official(state), dst)


_CONVERTERS: dict[str, Callable[[Path, Path], None]] = {
    "": _copy, "safetensors": _from_safetensors, "hf_segformer": _from_hf_segformer,
}
