"""Published reference numbers and their protocol: the ``[reference.<method>]`` tables of a
suite file, validated when the suite loads, and the rule deciding whether one of our report
rows may be compared with a published number.

Schema (every key but ``value`` optional)::

    [reference.afa]
    source = "AFA (Ru et al., CVPR 2022)"          # citation of the table (a string)

    [reference.afa.val_miou]                       # one published number: a metric name
    value = 66.0                                   # the number, mIoU %
    source = "Tab. 2"                              # where it is printed
    split = "val"                                  # the dataset split it is measured on
    scales = "multi"                               # val only: "single" | "multi" (+ flip)
    crf = true                                     # cam / val only: after dense CRF
    irn = false                                    # after IRN (ours: eval.refine = "irn")
    best_epoch = false                             # oracle checkpoint choice (see below)
    config = { use_lreg = true, backbone = "mit_b1" }   # method fields the number needs

A bare number (``cam_miou = 63.5``) declares no protocol and is always compared. Metric
names are :data:`REFERENCE_METRICS` or an alias of :data:`REFERENCE_ALIASES` (``val_miou``
is a paper's headline val number, multi-scale + flip + CRF). What our metrics are is fixed
by the harness (:data:`METRIC_FACTS`): ``crf`` / ``scales`` are checked against it, so they
may only be declared where the metric fixes them; a pseudo mask's CRF is a method choice and
goes in ``config`` (e.g. ``config = { pseudo_crf = true }``), as do L_reg (``use_lreg``) and
the backbone (``arch`` / ``backbone``). ``split`` is checked against the run's recorded
split of the metric's role (``cam_eval`` for cam / mask numbers, ``val`` for val numbers;
suites with references set them in ``[splits]``). ``best_epoch = true``: the published
checkpoint is the epoch with the best CAM mIoU on pixel labels (WeakTr's code); a row matches
when its runs made that oracle choice, which a method records as the run metric
:data:`ORACLE_EPOCH_METRIC` (WeakTr with ``cam_epoch_selection = "oracle"``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from harness.errors import ConfigError, suggest

REFERENCE_METRICS: tuple[str, ...] = (
    "cam_miou", "cam_miou_fixed", "mask_miou", "mask_miou_ignore255", "val_miou_ss", "val_miou_ms", "val_miou_ms_crf")
REFERENCE_ALIASES: dict[str, str] = {"val_miou": "val_miou_ms_crf", "cam": "cam_miou", "mask": "mask_miou"}

# What each of our metrics is, by construction: the split role it is scored on and the facts
# the harness fixes (absent key: a method choice, declared through `config`).
METRIC_FACTS: dict[str, dict[str, Any]] = {
    "cam_miou": {"role": "cam_eval", "crf": False, "irn": False},
    "cam_miou_fixed": {"role": "cam_eval", "crf": False, "irn": False},
    "mask_miou": {"role": "cam_eval", "irn": False},
    "mask_miou_ignore255": {"role": "cam_eval", "irn": False},
    "val_miou_ss": {"role": "val", "scales": "single", "crf": False, "irn": False},
    "val_miou_ms": {"role": "val", "scales": "multi", "crf": False, "irn": False},
    "val_miou_ms_crf": {"role": "val", "scales": "multi", "crf": True, "irn": False},
}
PROTOCOL_KEYS: dict[str, type | tuple[type, ...]] = {
    "value": (int, float), "source": str, "split": str, "scales": str, "crf": bool, "irn": bool,
    "best_epoch": bool, "config": dict,
}
SCALES = ("single", "multi")
# A run that chose its CAM checkpoint by CAM mIoU on pixel labels logs the chosen epoch here.
ORACLE_EPOCH_METRIC = "cam_selected_epoch"


def canonical_metric(name: str) -> str:
    """A reference key's metric name with aliases resolved (``val_miou`` -> ``val_miou_ms_crf``)."""
    return REFERENCE_ALIASES.get(name, name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    if expected == (int, float):
        return _is_number(value) and math.isfinite(value)
    return isinstance(value, expected)


def _check_config(values: dict, where: str) -> dict[str, Any]:
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, bool, int, float)) for v in items):
            raise ConfigError(f"{where}: `config.{key}` must be a string, number, boolean or a list of them, got {value!r}.")
    return dict(values)


def parse_number(metric: str, raw: Any, where: str) -> dict[str, Any]:
    """One published number (a bare number or a table) -> ``{"value": float, ...protocol}``.

    ConfigError (naming ``where``, the key and what was expected) for an unknown key, a wrong
    type, a missing value, ``scales`` outside :data:`SCALES`, or a fact our metric does not
    fix (``scales`` on a non-val number, ``crf`` on a mask number)."""
    if _is_number(raw):
        return {"value": float(raw)}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a number or a table with `value` and its protocol, got {raw!r}.")
    for key, value in raw.items():
        if key not in PROTOCOL_KEYS:
            raise ConfigError(f"{where}: unknown key `{key}`.{suggest(key, PROTOCOL_KEYS)} Valid keys: {', '.join(PROTOCOL_KEYS)}.")
        if not _type_ok(value, PROTOCOL_KEYS[key]):
            kind = {"value": "a finite number", "config": "a table"}.get(key, "true or false" if PROTOCOL_KEYS[key] is bool else "a string")
            raise ConfigError(f"{where}: `{key}` must be {kind}, got {value!r}.")
    if "value" not in raw:
        raise ConfigError(f"{where}: missing `value` (the published number, mIoU %).")
    facts = METRIC_FACTS[metric]
    if "scales" in raw:
        if raw["scales"] not in SCALES:
            raise ConfigError(f"{where}: `scales` must be one of {', '.join(SCALES)}, got {raw['scales']!r}.")
        if "scales" not in facts:
            raise ConfigError(f"{where}: `scales` applies to val numbers only; a {metric} number's scales are a method "
                              "choice: declare them in `config` (e.g. config = {{ cam_scales = [1.0, 0.5, 1.5] }}).")
    if "crf" in raw and "crf" not in facts:
        raise ConfigError(f"{where}: `crf` cannot be checked on a {metric} number (pseudo-mask CRF is a method choice); "
                          "declare the method field in `config` instead (e.g. config = { pseudo_crf = true }).")
    out = {k: v for k, v in raw.items() if k != "config"}
    out["value"] = float(raw["value"])
    if "config" in raw:
        out["config"] = _check_config(raw["config"], where)
    return out


def parse_references(raw: Any, path: str) -> dict[str, dict[str, Any]]:
    """Validate a suite's ``reference`` table -> method -> {``source``: str, metric: number
    table (see :func:`parse_number`)}, metric names canonical. ConfigError naming the file
    and table for anything else."""
    if not isinstance(raw, dict):
        raise ConfigError(f"Suite file {path}: [reference] must hold one table per method, got {raw!r}.")
    known = REFERENCE_METRICS + tuple(REFERENCE_ALIASES)
    out: dict[str, dict[str, Any]] = {}
    for method, table in raw.items():
        where = f"Suite file {path} [reference.{method}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table of published numbers, got {table!r}.")
        entries: dict[str, Any] = {}
        for key, value in table.items():
            if key == "source":
                if not isinstance(value, str):
                    raise ConfigError(f"{where}: `source` must be a string (the citation), got {value!r}.")
                entries["source"] = value
                continue
            if key not in known:
                raise ConfigError(f"{where}: unknown metric `{key}`.{suggest(key, known)} Valid: source, {', '.join(known)}.")
            metric = canonical_metric(key)
            if metric in entries:
                raise ConfigError(f"{where}: `{key}` and another key both name {metric}; give it once.")
            entries[metric] = parse_number(metric, value, f"{where} `{key}`")
        out[method] = entries
    return out


# -- comparability ----------------------------------------------------------------------------


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _same(expected: Any, text: str) -> bool:
    """Does a run param (MLflow string: str(value), lists as JSON) equal a reference value?"""
    if isinstance(expected, bool):
        return _truthy(text)
    try:
        if _is_number(expected):
            return math.isclose(float(text), float(expected), rel_tol=1e-9, abs_tol=1e-12)
        if isinstance(expected, list):
            got = json.loads(text)
            return isinstance(got, list) and len(got) == len(expected) and all(
                _same(e, json.dumps(g) if not isinstance(g, str) else g) for e, g in zip(expected, got))
    except (ValueError, TypeError):
        return False
    return text == str(expected)


def comparability(
    published: Mapping[str, Any], metric: str, method: str, config: Mapping[str, str], oracle_epoch: bool = False
) -> str:
    """Why our ``metric`` of a row may not be compared with ``published``, or '' when it may.

    ``published``: one parsed number (:func:`parse_number`); ``metric``: one of
    :data:`REFERENCE_METRICS`; ``config``: the row's run params (``method.<field>``,
    ``splits.<role>``, as the report reads them from MLflow); ``oracle_epoch``: the row's
    runs logged :data:`ORACLE_EPOCH_METRIC` (an oracle checkpoint choice). Returns
    ``"not comparable: <reason>; <reason>"`` listing every mismatch, in the order split,
    scales, crf, irn, best_epoch, config. Pure: no I/O.
    """
    facts = METRIC_FACTS[canonical_metric(metric)]
    reasons: list[str] = []
    if "split" in published:
        role = facts["role"]
        ours = config.get(f"splits.{role}")
        if ours is None:
            reasons.append(f"published on split '{published['split']}'; the runs do not record their {role} split "
                           "(set it in the suite's [splits])")
        elif ours != published["split"]:
            reasons.append(f"published on split '{published['split']}', ours on '{ours}'")
    if "scales" in published and published["scales"] != facts["scales"]:
        reasons.append(f"published {published['scales']}-scale, ours {facts['scales']}-scale")
    if "crf" in published and published["crf"] != facts["crf"]:
        reasons.append("published after dense CRF, ours without" if published["crf"] else "published without CRF, ours with")
    # IRN (eval.refine = "irn") replaces the pseudo masks, so it is behind mask and val numbers.
    ours_irn = config.get("eval.refine") == "irn" and (
        facts["role"] == "val" or facts["role"] == "cam_eval" and "mask" in canonical_metric(metric))
    if "irn" in published and published["irn"] != ours_irn:
        reasons.append("published after IRN, ours without (eval.refine=irn runs it)" if published["irn"]
                       else "published without IRN, ours after IRN")
    if "best_epoch" in published:
        if published["best_epoch"] != oracle_epoch:
            reasons.append("published with the best CAM epoch chosen on pixel labels (oracle), ours keeps the last epoch"
                           if published["best_epoch"] else "published with the last epoch, ours with the oracle best epoch")
    for key, expected in published.get("config", {}).items():
        ours = config.get(f"method.{key}")
        if ours is None:
            reasons.append(f"published with {method}.{key} = {json.dumps(expected)}; the runs do not set it")
        elif not _same(expected, ours):
            reasons.append(f"published with {method}.{key} = {json.dumps(expected)}, ours {ours}")
    return "not comparable: " + "; ".join(reasons) if reasons else ""
