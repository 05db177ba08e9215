"""Published numbers carry their protocol (harness/references.py): the schema is validated
when a suite loads (clear error naming the file), and a pure rule decides whether a row's
metric may be compared with a published number. The known cases of issue 12 are tested on
the shipped suite files."""

from __future__ import annotations

import dataclasses

import pytest

from harness.config import load_suite
from harness.errors import ConfigError
from harness.references import REFERENCE_METRICS, comparability, parse_number, parse_references
from methods import load_all

# A row's run params as the report reads them from MLflow (str(value), lists as JSON).
VOC_AFA = {"splits.cam_eval": "train", "splits.val": "val", "method.backbone": "mit_b1", "method.use_lreg": "False"}


def test_bare_number_declares_nothing_and_is_always_comparable():
    number = parse_number("cam_miou", 63.5, "here")
    assert number == {"value": 63.5}
    assert comparability(number, "cam_miou", "adcam", {}) == ""


def test_matching_protocol_is_comparable():
    number = parse_number("val_miou_ms_crf", {"value": 66.0, "split": "val", "scales": "multi", "crf": True,
                                              "config": {"backbone": "mit_b1", "use_lreg": True}}, "here")
    assert comparability(number, "val_miou_ms_crf", "afa", {**VOC_AFA, "method.use_lreg": "True"}) == ""


def test_every_mismatch_is_named_in_order():
    number = parse_number("val_miou_ms", {"value": 1.0, "split": "val", "scales": "single", "crf": True, "irn": True,
                                          "best_epoch": True, "config": {"use_lreg": True, "cam_scales": [1.0, 0.5]}},
                          "here")
    config = {"splits.val": "train", "method.use_lreg": "False"}
    assert comparability(number, "val_miou_ms", "afa", config) == (
        "not comparable: published on split 'val', ours on 'train'; published single-scale, ours multi-scale; "
        "published after dense CRF, ours without; published after IRN, ours without (eval.refine=irn runs it); "
        "published with the best CAM epoch chosen on pixel labels (oracle), ours keeps the last epoch; "
        "published with afa.use_lreg = true, ours False; published with afa.cam_scales = [1.0, 0.5]; the runs do not set it")


def test_irn_numbers_compare_only_with_rows_that_ran_irn():
    # IRN replaces the pseudo masks: it is behind mask and val numbers, never behind CAM numbers.
    irn = parse_number("mask_miou", {"value": 71.7, "irn": True}, "here")
    assert comparability(irn, "mask_miou", "adcam", {"eval.refine": "irn"}) == ""
    assert "ours without" in comparability(irn, "mask_miou", "adcam", {"eval.refine": "none"})
    assert comparability(parse_number("val_miou_ms_crf", {"value": 69.0, "irn": True}, "here"), "val_miou_ms_crf", "adcam",
                         {"eval.refine": "irn"}) == ""
    seed = parse_number("cam_miou", {"value": 63.5, "irn": False}, "here")
    assert comparability(seed, "cam_miou", "adcam", {"eval.refine": "irn"}) == ""
    plain = parse_number("mask_miou", {"value": 1.0, "irn": False}, "here")
    assert comparability(plain, "mask_miou", "adcam", {"eval.refine": "irn"}) == "not comparable: published without IRN, ours after IRN"


def test_unrecorded_split_and_config_values_of_every_type():
    number = parse_number("cam_miou", {"value": 1.0, "split": "train"}, "here")
    assert "do not record their cam_eval split" in comparability(number, "cam_miou", "m", {})
    number = parse_number("cam_miou", {"value": 1.0, "config": {"arch": "deit_small", "lr": 0.0006, "scales": [1.0, 1.2],
                                                               "aaf": True}}, "here")
    params = {"method.arch": "deit_small", "method.lr": "0.0006", "method.scales": "[1.0, 1.2]", "method.aaf": "True"}
    assert comparability(number, "cam_miou", "weaktr", params) == ""
    assert "ours [1.0]" in comparability(number, "cam_miou", "weaktr", {**params, "method.scales": "[1.0]"})
    number = parse_number("cam_miou", {"value": 1.0, "best_epoch": True}, "here")
    assert comparability(number, "cam_miou", "weaktr", {}, oracle_epoch=True) == ""
    assert "oracle" in comparability(number, "cam_miou", "weaktr", {}, oracle_epoch=False)
    last = parse_number("cam_miou", {"value": 1.0, "best_epoch": False}, "here")
    assert comparability(last, "cam_miou", "weaktr", {}, oracle_epoch=True) == \
        "not comparable: published with the last epoch, ours with the oracle best epoch"


@pytest.mark.parametrize(
    ("metric", "raw", "message"),
    [
        ("cam_miou", {"value": 1.0, "splt": "train"}, r"unknown key `splt`. Did you mean \"split\""),
        ("cam_miou", {"split": "train"}, "missing `value`"),
        ("cam_miou", {"value": "66"}, "`value` must be a finite number"),
        ("cam_miou", {"value": 1.0, "crf": "yes"}, "`crf` must be true or false"),
        ("cam_miou", {"value": 1.0, "scales": "multi"}, "`scales` applies to val numbers only"),
        ("val_miou_ms", {"value": 1.0, "scales": "ms"}, "`scales` must be one of single, multi"),
        ("mask_miou", {"value": 1.0, "crf": True}, r"config = \{ pseudo_crf = true \}"),
        ("cam_miou", {"value": 1.0, "config": {"x": {"y": 1}}}, "`config.x` must be"),
        ("cam_miou", "66", "expected a number or a table"),
    ],
)
def test_bad_numbers_get_a_clear_message(metric, raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_number(metric, raw, "Suite file x.toml [reference.m] `k`")


def test_bad_reference_tables_name_the_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[suite]\ndataset = "synthetic"\n[reference.afa.val_miou]\nvalue = 66.0\nlreg = true\n')
    with pytest.raises(ConfigError, match=r"s\.toml \[reference\.afa\] `val_miou`: unknown key `lreg`"):
        load_suite(str(path))
    path.write_text('[suite]\ndataset = "synthetic"\n[reference.afa]\nval_mio = 66.0\n')
    with pytest.raises(ConfigError, match=r"s\.toml \[reference\.afa\]: unknown metric `val_mio`"):
        load_suite(str(path))
    with pytest.raises(ConfigError, match="both name val_miou_ms_crf"):
        parse_references({"afa": {"val_miou": 1.0, "val_miou_ms_crf": 2.0}}, "p.toml")
    with pytest.raises(ConfigError, match="`source` must be a string"):
        parse_references({"afa": {"source": 3}}, "p.toml")


def test_aliases_become_canonical_names():
    refs = parse_references({"afa": {"source": "Paper", "val_miou": 66.0, "mask": 1.0}}, "p.toml")
    assert refs == {"afa": {"source": "Paper", "val_miou_ms_crf": {"value": 66.0}, "mask_miou": {"value": 1.0}}}


def test_shipped_config_requirements_are_fields_of_the_methods():
    """A typo in a `config` requirement would make a row silently 'not comparable'."""
    methods = load_all()
    for name in ("voc", "paper", "coco"):
        for method, table in load_suite(name).reference.items():
            fields = {f.name for f in dataclasses.fields(methods[method].Config)}
            for metric, number in table.items():
                if metric in REFERENCE_METRICS:
                    assert set(number.get("config", {})) <= fields, (name, method, metric)


def _paper_row(method: str, **method_params: str) -> dict[str, str]:
    """The params of a paper.toml run of ``method`` (its splits and recipe), overridden."""
    suite = load_suite("paper")
    params = {f"splits.{k}": v for k, v in suite.splits.items()}
    params.update({f"method.{k}": str(v) for k, v in suite.method_params[method].items()})
    params.update({f"method.{k}": v for k, v in method_params.items()})
    return params


def test_known_cases_of_the_shipped_paper_suite():
    refs = load_suite("paper").reference
    # AD-CAM: the seed number compares; pseudo mask 71.7 and val 69.0 need IRN.
    adcam = _paper_row("adcam")
    assert comparability(refs["adcam"]["cam_miou"], "cam_miou", "adcam", adcam) == ""
    for metric in ("mask_miou", "val_miou_ms_crf"):
        assert "IRN" in comparability(refs["adcam"][metric], metric, "adcam", adcam)
    # AFA: 66.0 / 63.8 include L_reg (the recipe follows the authors' code: use_lreg = false).
    afa = _paper_row("afa")
    for metric in ("val_miou_ms", "val_miou_ms_crf"):
        assert comparability(refs["afa"][metric], metric, "afa", afa) == \
            "not comparable: published with afa.use_lreg = true, ours False"
        assert comparability(refs["afa"][metric], metric, "afa", _paper_row("afa", use_lreg="True")) == ""
    # AFA's pseudo-label number is compared with the ignore-255 mask mIoU.
    assert "mask_miou_ignore255" in refs["afa"] and "mask_miou" not in refs["afa"]
    assert comparability(refs["afa"]["mask_miou_ignore255"], "mask_miou_ignore255", "afa", afa) == ""
    # WeakTr: every number used the oracle best epoch; val 74.0 is Tab. 2.
    weaktr = _paper_row("weaktr")
    assert "oracle" in comparability(refs["weaktr"]["cam_miou"], "cam_miou", "weaktr", weaktr)
    # with the oracle epoch choice (runs that logged cam_selected_epoch) it compares
    assert comparability(refs["weaktr"]["cam_miou"], "cam_miou", "weaktr", weaktr, oracle_epoch=True) == ""
    assert refs["weaktr"]["val_miou_ms_crf"]["source"] == "Tab. 2"


def test_weaktr_readme_coco_number_is_a_crf_pseudo_label_number():
    refs = load_suite("coco").reference["weaktr"]
    assert "cam_miou" not in refs  # 42.6 is not raw CAM
    assert refs["mask_miou"]["value"] == 42.6 and refs["mask_miou"]["config"]["pseudo_crf"] is True
    # Declared as raw CAM with CRF, it could never be compared with our cam_miou:
    as_cam = parse_number("cam_miou", {"value": 42.6, "crf": True}, "here")
    assert comparability(as_cam, "cam_miou", "weaktr", {}) == "not comparable: published after dense CRF, ours without"
