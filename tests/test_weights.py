"""The weights registry (methods/common/weights.py) and its harness checks.

Downloads go through the real code paths (huggingface_hub's hf_hub_download, torch.hub's
download_url_to_file) against an HTTP server the test starts on 127.0.0.1, which serves tiny
checkpoints of our own backbone classes in each source's real format: the Hugging Face hub
layout (``/{repo}/resolve/{revision}/{file}``, with the ``X-Repo-Commit`` / ``ETag`` /
``X-Linked-Size`` headers the hub client reads from a HEAD request) reached through
``HF_ENDPOINT``, and a plain URL. No other network is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import threading
from pathlib import Path

import pytest
import torch

from methods.common import weights
from methods.common.mit import create_mit, load_mit_checkpoint
from methods.common.vit import create_vit

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex commit id, as the hub sends


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` ({path: bytes}); hub paths get the hub's metadata headers.
    ``server.etags`` overrides the ETag of a path (to fake a corrupted download)."""

    def _send(self, body: bool) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append((self.command, path))
        key = path
        if "/resolve/" in path:  # any revision: /{repo}/resolve/{rev}/{file} -> /{repo}/resolve/{file}
            repo, rest = path.split("/resolve/", 1)
            key = f"{repo}/resolve/{rest.split('/', 1)[1]}"
        data = self.server.files.get(key)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        if "/resolve/" in path:
            etag = self.server.etags.get(key, hashlib.sha256(data).hexdigest())
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')  # LFS files: the sha256
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._send(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._send(body=True)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A 127.0.0.1 HTTP server; the weights cache, HF_ENDPOINT and HF_HOME point at tmp_path."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.etags, httpd.requests = {}, {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("WSSS_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    for var in ("WSSS_OFFLINE", "HF_HUB_OFFLINE", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    httpd.url = url
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _official_to_hf_segformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the registry's conversion, written out independently: our (official)
    MiT names -> transformers' SegformerForImageClassification names."""
    out = {}
    leaf_map = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query", "attn.sr": "attention.self.sr",
                "attn.norm": "attention.self.layer_norm", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1",
                "mlp.fc2": "mlp.dense2", "mlp.dwconv.dwconv": "mlp.dwconv.dwconv"}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        if key.startswith("patch_embed"):
            stage, sub = int(head[len("patch_embed")]), head.split(".")[1]
            out[f"segformer.encoder.patch_embeddings.{stage - 1}.{'proj' if sub == 'proj' else 'layer_norm'}.{leaf}"] = value
        elif key.startswith("norm"):
            out[f"segformer.encoder.layer_norm.{int(head[4:]) - 1}.{leaf}"] = value
        elif key.startswith("block"):
            stage, index, module = int(head[5]), head.split(".")[1], ".".join(head.split(".")[2:])
            base = f"segformer.encoder.block.{stage - 1}.{index}."
            if module == "attn.kv":
                half = value.shape[0] // 2
                out[base + f"attention.self.key.{leaf}"] = value[:half]
                out[base + f"attention.self.value.{leaf}"] = value[half:]
            else:
                out[base + f"{leaf_map[module]}.{leaf}"] = value
        else:
            raise AssertionError(key)
    out["classifier.weight"] = torch.zeros(1000, state["norm4.weight"].shape[0])
    out["classifier.bias"] = torch.zeros(1000)
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_segformer_key_conversion_by_hand():
    # key rows [[1, 1], [1, 1]] and value rows [[2, 2], [2, 2]] concatenate (key first, as the
    # official attn.kv splits them) into a (4, 2) kv weight; stage 0 -> 1, head -> classifier.
    state = {
        "segformer.encoder.block.0.1.attention.self.key.weight": torch.ones(2, 2),
        "segformer.encoder.block.0.1.attention.self.value.weight": torch.full((2, 2), 2.0),
        "segformer.encoder.patch_embeddings.3.layer_norm.bias": torch.zeros(2),
        "segformer.encoder.layer_norm.2.weight": torch.ones(2),
        "classifier.bias": torch.zeros(3),
    }
    out = weights.hf_segformer_to_official(state)
    assert sorted(out) == ["block1.1.attn.kv.weight", "head.bias", "norm3.weight", "patch_embed4.norm.bias"]
    assert out["block1.1.attn.kv.weight"].tolist() == [[1, 1], [1, 1], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="unexpected SegFormer key"):
        weights.hf_segformer_to_official({"segformer.decoder.x": torch.zeros(1)})


def test_hub_download_converts_segformer_and_reuses_cache(server, tmp_path):
    torch.manual_seed(0)
    model = create_mit("mit_synth")
    server.files["/nvidia/mit-b0/resolve/pytorch_model.bin"] = _bytes(_official_to_hf_segformer(model.state_dict()))
    path = weights.fetch(weights.SOURCES["mit_b0"])
    assert path == tmp_path / "cache" / "mit_b0.pth"
    fresh = create_mit("mit_synth")
    load_mit_checkpoint(fresh, path)  # strict: every key converted
    _same(fresh.state_dict(), model.state_dict())
    manifest = (tmp_path / "cache" / "mit_b0.pth.json").read_text()
    assert COMMIT in manifest and "hf_segformer" in manifest
    count = len(server.requests)
    assert count >= 2 and all(p.startswith("/nvidia/mit-b0/resolve/") for _, p in server.requests)
    assert weights.fetch(weights.SOURCES["mit_b0"]) == path
    assert len(server.requests) == count  # cached: no request at all
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["mit_b0.pth", "mit_b0.pth.json"]  # no temporaries


def test_hub_safetensors_and_auto_resolution(server, monkeypatch):
    from safetensors.torch import save

    torch.manual_seed(1)
    model = create_vit("vit_synth", 96)
    server.files["/timm/vit_small_patch16_224.augreg_in21k_ft_in1k/resolve/model.safetensors"] = save(model.state_dict())
    monkeypatch.setitem(weights.ARCH_WEIGHTS, "vit_synth", "vit_small")  # tiny model under the real entry
    loaded = create_vit("vit_synth", 96, pretrained="auto")
    _same(loaded.state_dict(), model.state_dict())


def test_hub_checksum_mismatch_discards_the_download(server, tmp_path):
    data = _bytes(_official_to_hf_segformer(create_mit("mit_synth").state_dict()))
    server.files["/nvidia/mit-b1/resolve/pytorch_model.bin"] = data
    server.etags["/nvidia/mit-b1/resolve/pytorch_model.bin"] = hashlib.sha256(b"other bytes").hexdigest()
    with pytest.raises(weights.WeightsError, match="Checksum mismatch for checkpoint mit_b1") as err:
        weights.fetch(weights.SOURCES["mit_b1"])
    assert hashlib.sha256(data).hexdigest() in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing cached, no temporary left


def test_url_download_prefix_checksum_and_cache_reuse(server, tmp_path, monkeypatch):
    torch.manual_seed(2)
    model = create_vit("vit_synth", 96)
    data = _bytes({"model": model.state_dict()})  # the DeiT release format: {"model": state dict}
    server.files["/deit/tiny.pth"] = data
    source = dataclasses.replace(weights.SOURCES["deit_small"], url=server.url + "/deit/tiny.pth",
                                 sha256=hashlib.sha256(data).hexdigest()[:8])
    monkeypatch.setitem(weights.SOURCES, "deit_small", source)
    monkeypatch.setitem(weights.ARCH_WEIGHTS, "vit_synth", "deit_small")
    loaded = create_vit("vit_synth", 96, pretrained="deit_small")  # by registry name
    _same(loaded.state_dict(), model.state_dict())
    assert server.requests == [("GET", "/deit/tiny.pth")]
    assert weights.describe("auto", "vit_synth") == (f"deit_small ({source.url})", "cached")
    create_vit("vit_synth", 96, pretrained="auto")
    assert server.requests == [("GET", "/deit/tiny.pth")]  # reused from the cache


def test_url_checksum_mismatch_against_the_published_prefix(server, tmp_path, monkeypatch):
    server.files["/deit/tiny.pth"] = _bytes({"model": create_vit("vit_synth", 96).state_dict()})
    real = weights.SOURCES["deit_small"]
    source = dataclasses.replace(real, url=server.url + "/deit/tiny.pth")  # keeps the published cd65a155
    with pytest.raises(weights.WeightsError, match=r"Checksum mismatch .* expected cd65a155\.\.\."):
        weights.fetch(source)
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_error_names_file_and_place(server, tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_OFFLINE", "1")
    with pytest.raises(weights.WeightsError) as err:
        weights.resolve("auto", "deeplab_v2_r101")
    text = str(err.value)
    assert "resnet101-63fe2227.pth" in text and str(tmp_path / "cache") in text
    assert "wsss-bench weights fetch resnet101" in text
    assert server.requests == []


def test_unreachable_server_is_a_clear_error(server, tmp_path):
    source = dataclasses.replace(weights.SOURCES["resnet101"], url=server.url + "/missing.pth")
    with pytest.raises(weights.WeightsError, match="Could not download checkpoint resnet101") as err:
        weights.fetch(source)
    assert "resnet101-63fe2227.pth" in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_manual_source_error_then_hand_placed_file(server, tmp_path):
    source = weights.SOURCES["conformer_s"]
    with pytest.raises(weights.WeightsError) as err:
        weights.fetch(source)
    text = str(err.value)
    assert "https://github.com/pengzhiliang/Conformer" in text and "Conformer_small_patch16.pth" in text
    assert "no checksum published" in text
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "Conformer_small_patch16.pth").write_bytes(b"abc")
    assert weights.fetch(source) == tmp_path / "cache" / "Conformer_small_patch16.pth"
    # sha256("abc"), the FIPS 180-2 test vector, recorded since no checksum is published
    assert "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" in (tmp_path / "cache" / "Conformer_small_patch16.pth.json").read_text()
    assert server.requests == []


def test_spec_values():
    assert weights.resolve(None, "deit_small") is None
    assert weights.resolve("none", "deit_small") is None
    assert weights.resolve("/x/y.pth", "deit_small") == Path("/x/y.pth")
    assert weights.source_for("hub", "deit_small").name == "deit_small"  # the old WeakTr spelling
    assert weights.source_for("auto", "mit_b1_s32").name == "mit_b1"
    with pytest.raises(weights.WeightsError, match="no ImageNet checkpoint is registered for architecture 'vit_synth'"):
        weights.source_for("auto", "vit_synth")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("WSSS_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert weights.cache_dir() == tmp_path / "wsss-bench" / "weights"
    monkeypatch.setenv("WSSS_WEIGHTS", str(tmp_path / "w"))
    assert weights.cache_dir() == tmp_path / "w"


def test_real_data_needs_explicit_random_init():
    from harness.config import Suite, parse_overrides
    from harness.errors import ConfigError
    from harness.weights import check_sweep_weights
    from methods import load_all

    cls = load_all()["cam"]
    config = cls.Config(backbone="deit_tiny", seg_backbone="deit_tiny").to_dict()
    suite = Suite(name="s", dataset="voc", method_params={"cam": {"backbone": "deit_tiny"}})
    with pytest.raises(ConfigError, match=r"cam\.pretrained \(deit_tiny\), cam\.seg_pretrained \(deit_tiny\) have no pretrained"):
        check_sweep_weights(suite, parse_overrides([]), {"cam": cls}, {"cam": config}, real_data=True)
    check_sweep_weights(suite, parse_overrides(["pretrained=none", "cam.seg_pretrained=none"]), {"cam": cls}, {"cam": config}, real_data=True)
    check_sweep_weights(suite, parse_overrides([]), {"cam": cls}, {"cam": config}, real_data=False)  # synthetic: fine
    config["pretrained"] = "deit_smal"  # a typo: neither a registry name nor a file
    with pytest.raises(ConfigError, match='cam.pretrained=\'deit_smal\' is neither .* Did you mean "deit_small"'):
        check_sweep_weights(suite, parse_overrides([]), {"cam": cls}, {"cam": config}, real_data=False)
    config["pretrained"] = "auto"
    config["backbone"] = "vit_synth"
    with pytest.raises(ConfigError, match="cam.pretrained: pretrained='auto': no ImageNet checkpoint"):
        check_sweep_weights(suite, parse_overrides(["seg_pretrained=none"]), {"cam": cls}, {"cam": config}, real_data=True)


def test_cli_weights(server, tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.setenv("WSSS_OFFLINE", "1")
    assert main(["weights", "list"]) == 0
    assert "conformer_s" in capsys.readouterr().out
    assert main(["weights", "fetch", "resnet10"]) == 2  # unknown name: bad input
    assert 'Did you mean "resnet101"' in capsys.readouterr().out
    assert main(["weights", "fetch", "conformer_s"]) == 1  # manual download: says where from
    assert "pengzhiliang/Conformer" in capsys.readouterr().out


def test_report_marks_random_init_rows_on_real_data():
    from types import SimpleNamespace

    import pandas as pd

    from harness import report

    def run(data_root: str, pretrained: str) -> SimpleNamespace:
        params = {"data_root": data_root, "method.pretrained": pretrained, "method.seg_pretrained": "auto", "seed": "0"}
        tags = {"wsss.status": "finished", "wsss.method": "cam", "wsss.suite": "s", "wsss.dataset": "voc"}
        return SimpleNamespace(data=SimpleNamespace(tags=tags, params=params, metrics={"val_miou_ss": 1.0}),
                               info=SimpleNamespace(run_id="r", status="FINISHED", start_time=0, end_time=0))

    assert report._run_row(run("/data/VOC2012", "None"), "wsss-bench/s")["random_init"] is True
    assert report._run_row(run("/data/VOC2012", "auto"), "wsss-bench/s")["random_init"] is False
    assert report._run_row(run("None", "None"), "wsss-bench/s")["random_init"] is False  # synthetic: no data root
    rows = pd.DataFrame([report._run_row(run("/data/VOC2012", "None"), "wsss-bench/s")])
    board = report.build_leaderboard(rows.assign(code_version="abc"))
    assert report._flag(board.table.iloc[0]) == " (random init)"


@pytest.mark.slow  # ~20 s: two MLflow stores are created
def test_cli_run_on_real_data_resolves_weights_before_any_trial(shared_data, tmp_path, monkeypatch, capsys):
    """voc files: --dry-run shows each trial's checkpoints; offline with a checkpoint not
    cached, `run` stops with exit 2 before any trial; unset weights are an error too."""
    from harness.cli import main

    root = shared_data / "voc-mini" / "VOC2012"
    if not root.is_dir():
        pytest.skip(f"voc-mini not found at {root} (../shared/data is not part of a clone)")
    monkeypatch.setenv("WSSS_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.setenv("WSSS_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    head = f'[suite]\ndataset = "voc"\nseeds = [0]\nmethods = ["cam"]\n[dataset]\nroot = "{root}"\n[methods.cam]\nbackbone = "deit_tiny"\n'
    suite = tmp_path / "real.toml"
    suite.write_text(head + 'pretrained = "auto"\nseg_pretrained = "none"\n')
    args = ["run", "--suite", str(suite), "--methods", "cam", "--results", str(tmp_path / "results")]
    assert main(args + ["--dry-run"]) == 0
    assert "pretrained=deit_tiny [missing]; seg_pretrained=random init [-]" in capsys.readouterr().out
    assert main(args) == 2
    out = capsys.readouterr().out
    assert "deit_tiny_patch16_224-a1311bcf.pth" in out and str(tmp_path / "cache") in out
    assert not (tmp_path / "results" / "trials").exists()  # no trial started
    suite.write_text(head)
    assert main(args) == 2
    assert "cam.pretrained (vit_synth), cam.seg_pretrained (vit_synth)" not in (out := capsys.readouterr().out)
    assert "cam.pretrained (deit_tiny), cam.seg_pretrained (vit_synth) have no pretrained weights set" in " ".join(out.split())


def test_irn_backbone_auto_fetches_the_registry_checkpoint(server, monkeypatch):
    """IRN's ``pretrained="auto"`` goes through the registry like a method's backbone: the
    served ResNet's weights end up in IRN's backbone (and the dry-run / preflight see it)."""
    from methods.common.irn import IRNConfig, build_model
    from methods.common.irn.model import IRNet

    torch.manual_seed(3)
    served = IRNet("tiny").backbone.state_dict()
    data = _bytes(served)
    server.files["/r50.pth"] = data
    source = dataclasses.replace(weights.SOURCES["resnet50"], url=server.url + "/r50.pth", sha256=hashlib.sha256(data).hexdigest()[:8])
    monkeypatch.setitem(weights.SOURCES, "resnet50", source)
    monkeypatch.setitem(weights.ARCH_WEIGHTS, "tiny", "resnet50")  # the tiny test ResNet stands in for ResNet-50
    model = build_model(IRNConfig(arch="tiny", pretrained="auto"), seed=0)
    _same(model.backbone.state_dict(), served)
    assert server.requests == [("GET", "/r50.pth")]


def test_irn_weights_in_the_sweep_checks():
    """``eval.refine = "irn"`` adds ``irn.pretrained`` to a trial's checkpoints: real data needs
    it set (the fix names the override that works), ``auto`` needs a registered arch, and
    per-method IRN settings merge over the suite's key by key."""
    from harness.config import Suite, parse_overrides
    from harness.errors import ConfigError
    from harness.refine import irn_config, merge_irn
    from harness.weights import check_sweep_weights, eval_weight_uses
    from methods import load_all

    cls = load_all()["cam"]
    config = cls.Config(pretrained="auto", seg_pretrained="auto", backbone="deit_tiny", seg_backbone="deit_tiny").to_dict()
    suite = Suite(name="s", dataset="voc", method_params={"cam": {"refine": "irn"}})
    irn = {"refine": "irn", "irn": "arch=resnet50"}
    assert eval_weight_uses(irn) == [("irn.pretrained", "resnet50", None)]
    assert eval_weight_uses({"refine": "none", "irn": "arch=resnet50"}) == []
    with pytest.raises(ConfigError, match=r"cam\.irn\.pretrained \(resnet50\) has no pretrained .* `cam\.irn=pretrained=none`, "
                                          r"or `cam\.irn=arch=resnet50,pretrained=auto`"):
        check_sweep_weights(suite, parse_overrides([]), {"cam": cls}, {"cam": config}, real_data=True, evals={"cam": irn})
    spelled = {"refine": "irn", "irn": merge_irn("arch=resnet50", "pretrained=none")}
    assert spelled["irn"] == {"arch": "resnet50", "pretrained": "none"}
    check_sweep_weights(suite, parse_overrides([]), {"cam": cls}, {"cam": config}, real_data=True, evals={"cam": spelled})
    with pytest.raises(ConfigError, match=r"arch='tiny' .* has none\. Set arch=resnet50 .*`adcam\.irn=arch=resnet50,pretrained=auto`"):
        irn_config({"irn": "pretrained=auto"})
    assert irn_config({"irn": {"arch": "resnet50", "pretrained": "auto"}}).pretrained == "auto"
