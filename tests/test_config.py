"""Suites, overrides, trial ids and the error messages users see for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import Overrides, TrialSpec, build_method_config, load_suite, parse_overrides
from methods import load_all
from harness.errors import ConfigError
from harness.sweep import plan_trials

TINY = {"num_train": "8", "num_val": "4", "image_size": "64"}


def _plan(tmp_path: Path, methods=("cam",), seeds=(0,), **overrides_kw):
    suite = load_suite("synthetic")
    overrides = overrides_kw.get("overrides") or Overrides(dataset=dict(TINY))
    return plan_trials(suite, list(methods), list(seeds), overrides, None, tmp_path / "cache")


def test_overrides_are_sorted_into_scopes():
    o = parse_overrides(["epochs=3", "cam.lr=0.1", "dataset.num_train=5", "eval.crf=false"])
    assert o.shared == {"epochs": "3"}
    assert o.methods == {"cam": {"lr": "0.1"}}
    assert o.dataset == {"num_train": "5"}
    assert o.eval == {"crf": "false"}


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_trial_id_is_order_free_and_value_sensitive(tmp_path):
    a = _plan(tmp_path, seeds=(0, 1))
    b = _plan(tmp_path, seeds=(1, 0))
    assert sorted(s.trial_id for s in a) == sorted(s.trial_id for s in b)
    c = _plan(tmp_path, overrides=Overrides(dataset=dict(TINY), shared={"epochs": "3"}))
    assert c[0].trial_id not in {s.trial_id for s in a}
    assert TrialSpec.from_dict(a[0].to_dict()).trial_id == a[0].trial_id


def test_override_values_are_typed(tmp_path):
    spec = _plan(tmp_path, overrides=Overrides(dataset=dict(TINY), shared={"epochs": "3", "cam_scales": "1.0,0.5", "pseudo_crf": "true"}))[0]
    assert spec.method_config["epochs"] == 3
    assert spec.method_config["cam_scales"] == (1.0, 0.5)
    assert spec.method_config["pseudo_crf"] is True
    assert spec.dataset_options["num_train"] == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=("cma",)), 'Unknown method "cma". Did you mean "cam"?'),
        (dict(overrides=Overrides(dataset=dict(TINY), shared={"epoch": "3"})), 'Did you mean "epochs"?'),
        (dict(overrides=Overrides(dataset={"num_trian": "3"})), 'Did you mean "num_train"?'),
        (dict(overrides=Overrides(dataset=dict(TINY), eval={"crff": "1"})), 'Did you mean "crf"?'),
        (dict(overrides=Overrides(dataset=dict(TINY), shared={"epochs": "three"})), "expected an integer, got 'three'"),
        # a bare key that is a dataset / eval option: the prefixed override it meant
        (dict(overrides=Overrides(dataset=dict(TINY), shared={"max_val": "3"})), "Did you mean `eval.max_val=3`?"),
        (dict(overrides=Overrides(dataset=dict(TINY), shared={"num_trian": "3"})), 'Did you mean "dataset.num_train"?'),
        (dict(overrides=Overrides(dataset=dict(TINY), methods={"afx": {"lr": "1"}})), "Override scope `afx.`"),
    ],
)
def test_bad_names_and_values_get_a_clear_message(tmp_path, kwargs, message):
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, **kwargs)
    assert message in str(info.value)


def test_bare_unknown_override_suggests_no_option_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, overrides=Overrides(dataset=dict(TINY), shared={"foo": "1"}))
    assert "Did you mean" not in str(info.value) and "dataset.foo" not in str(info.value)


def test_a_bare_override_of_an_unselected_methods_field_names_its_owners(tmp_path):
    """`seg_pretrained` exists (cam, weaktr, adcam) but not for afa alone: the message says whose
    field it is instead of suggesting the near `pretrained` the user may have set already."""
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, methods=("afa",), overrides=Overrides(dataset=dict(TINY), shared={"seg_pretrained": "synthetic"}))
    message = str(info.value)  # (other tests may have registered more methods with that field)
    owners = message.split("It is a field of ", 1)[1].split(" (not selected)")[0].split(", ")
    assert {"adcam", "cam", "weaktr"} <= set(owners) and "afa" not in owners
    assert "Did you mean" not in message


def test_unknown_suite_and_bad_suite_file(tmp_path):
    with pytest.raises(ConfigError, match='Did you mean "synthetic"'):
        load_suite("synthetc")
    bad = tmp_path / "bad.toml"
    bad.write_text("[suite]\ndataset = 'synthetic'\n[methodz.cam]\n")
    with pytest.raises(ConfigError, match=r"unknown table \[methodz\]"):
        load_suite(str(bad))
    bad.write_text("[suite\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_suite(str(bad))


@pytest.mark.parametrize(
    "table, message",
    [
        ("threshold_stop = 1.2", "need 0 <= threshold_start <= threshold_stop <= 1"),
        ("threshold_start = 0.5\nthreshold_stop = 0.4", "threshold_start = 0.5, threshold_stop = 0.4"),
        ("threshold_step = 0", "`threshold_step` must be in (0, 1], got 0.0"),
        ("fixed_threshold = -0.1", "`fixed_threshold` must be in [0, 1], got -0.1"),
        ('convention = "mean"', '`convention` must be "present" or "gt", got \'mean\''),
    ],
)
def test_bad_eval_values_name_the_suite_file(tmp_path, table, message):
    path = tmp_path / "ev.toml"
    path.write_text(f"[suite]\ndataset = 'synthetic'\n[eval]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_suite(str(path))
    assert f"{path} [eval]" in str(info.value) and message in str(info.value)


def test_bad_eval_override_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"eval options: `fixed_threshold` must be in \[0, 1\], got 1.5"):
        _plan(tmp_path, overrides=Overrides(dataset=dict(TINY), eval={"fixed_threshold": "1.5"}))

def test_every_shipped_suite_loads_and_plans(tmp_path):
    from harness.config import list_suites
    from harness.refine import check_refine
    from harness.sweep import PER_METHOD_EVAL

    for name, path in list_suites().items():
        suite = load_suite(str(path))
        assert suite.dataset in ("synthetic", "voc", "coco"), name
        assert suite.methods, f"suite {name} lists no methods"
        registry = load_all()
        for method, values in suite.method_params.items():
            # refine / irn are the method's trials' eval settings, not hyper-parameters
            hyper = {k: v for k, v in values.items() if k not in PER_METHOD_EVAL}
            build_method_config(registry[method].Config, hyper, f"{name} [methods.{method}]")
            check_refine({k: v for k, v in values.items() if k in PER_METHOD_EVAL})


def test_data_root_is_expanded_once_where_it_enters(tmp_path, monkeypatch):
    """``--data-root=~/x`` reaches us unexpanded (the shell leaves ``~`` after ``=``): it
    becomes $HOME/x, never <cwd>/~/x; relative roots are taken from the working directory,
    a suite's from its file's folder."""
    from harness.config import expand_data_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert expand_data_root(None) is None
    assert expand_data_root("~/data/VOC2012") == str(tmp_path / "home" / "data" / "VOC2012")
    assert expand_data_root("data/VOC2012") == str(tmp_path / "data" / "VOC2012")
    assert expand_data_root("data", tmp_path / "benchmarks") == str(tmp_path / "benchmarks" / "data")
    suite = tmp_path / "suites" / "s.toml"
    suite.parent.mkdir()
    suite.write_text('[suite]\ndataset = "voc"\n[dataset]\nroot = "~/VOC2012"\n')
    assert load_suite(str(suite)).data_root == str(tmp_path / "home" / "VOC2012")
    suite.write_text('[suite]\ndataset = "voc"\n[dataset]\nroot = "../VOC2012"\n')
    assert load_suite(str(suite)).data_root == str(tmp_path / "VOC2012")


def test_refine_can_be_chosen_per_method(tmp_path):
    # `cam.refine=irn`: IRN for cam's pseudo masks only; the other method keeps its own.
    overrides = Overrides(dataset=dict(TINY), methods={"cam": {"refine": "irn", "irn": "epochs=1"}})
    specs = {s.method: s for s in _plan(tmp_path, methods=("cam", "weaktr"), overrides=overrides)}
    assert specs["cam"].eval["refine"] == "irn" and specs["cam"].eval["irn"] == "epochs=1"
    assert specs["weaktr"].eval["refine"] == "none"
    assert "refine" not in specs["cam"].method_config  # an eval setting, not a hyper-parameter
    plain = {s.method: s for s in _plan(tmp_path, methods=("cam", "weaktr"))}
    assert specs["weaktr"].trial_id == plain["weaktr"].trial_id != plain["cam"].trial_id != specs["cam"].trial_id
    suite_file = tmp_path / "suite.toml"  # the same from a suite's method table
    suite_file.write_text('[suite]\ndataset = "synthetic"\n[methods.cam]\nrefine = "irn"\n')
    spec = plan_trials(load_suite(str(suite_file)), ["cam"], [0], Overrides(dataset=dict(TINY)), None, tmp_path / "cache")[0]
    assert spec.eval["refine"] == "irn"


def test_per_method_refine_is_checked_and_no_method_field_shadows_it(tmp_path):
    with pytest.raises(ConfigError, match='Did you mean "irn"'):
        _plan(tmp_path, overrides=Overrides(dataset=dict(TINY), methods={"cam": {"refine": "irm"}}))
    from harness.sweep import PER_METHOD_EVAL
    import dataclasses

    for name, cls in load_all().items():
        assert not {f.name for f in dataclasses.fields(cls.Config)} & set(PER_METHOD_EVAL), name


def test_a_bare_override_only_some_methods_have_is_announced():
    from harness.sweep import partial_shared_overrides

    notices = partial_shared_overrides(Overrides(shared={"epochs": "2", "crop": "64"}), ["weaktr", "afa", "adcam"])
    assert notices == ["`epochs=2` sets `epochs` of adcam; weaktr, afa have no such field and are left as they are "
                       "(use `<method>.epochs=` to aim at one method).",
                       "`crop=64` sets `crop` of afa, adcam; weaktr has no such field and is left as it is "
                       "(use `<method>.crop=` to aim at one method)."]
    assert partial_shared_overrides(Overrides(shared={"epochs": "2"}), ["adcam"]) == []
