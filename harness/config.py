"""Suites, overrides and resolved trial specifications.

A *suite* (``benchmarks/<name>.toml``) names a dataset, its options and split roles, the
seeds, the evaluation settings, per-method hyper-parameters and published reference
numbers. A *trial* is (suite, method, resolved method config, dataset, seed, eval settings);
its id is a hash of that resolved configuration, so it is independent of the order in
which methods, seeds or overrides were given, and any change of value gives a new trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, suggest, unknown
from harness.references import parse_references

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@dataclass
class EvalConfig:
    """Evaluation settings shared by every method of a suite."""

    convention: str = "present"  # mIoU averaging: "present" (GT or prediction) or "gt"
    threshold_start: float = 0.0  # CAM background-threshold sweep, inclusive
    threshold_stop: float = 0.60
    threshold_step: float = 0.01
    # CAM sweep: threshold_stop is where the range starts from; it widens (to 1.0 at most,
    # harness.evaluation.extend_until_interior) while the best threshold is its upper end.
    fixed_threshold: float = 0.40  # non-oracle CAM number, for methods that declare no threshold
    crf: bool = True  # also report val mIoU with multi-scale + flip + dense CRF
    multiscale: bool = True  # also report val mIoU with the method's multi-scale + flip
    crf_workers: int = 2
    batch_size: int = 8  # images per cams()/segment() call when sizes agree
    gallery_size: int = 4  # fixed images whose CAM / mask / prediction are saved
    max_cam_eval: int = 0  # 0 = every image of the cam-eval split
    max_val: int = 0  # 0 = every image of the val split
    # Train the harness's shared segmentation recipe (harness/common_seg.py) on the pseudo
    # masks instead of the method's own segmenter: true, or a table of its fields.
    common_segmentation: bool | dict = False
    # Pseudo-mask refinement for every method (harness/refine.py): "none" (the method's own
    # pseudo_masks) or "irn" (IRN trained on the method's CAMs); `irn` holds IRN's settings.
    refine: str = "none"
    irn: dict | str = field(default_factory=dict)


def check_eval_config(config: EvalConfig, where: str) -> EvalConfig:
    """ConfigError (naming ``where``, the key, the value and what was expected) unless the
    convention is known and the CAM thresholds satisfy 0 <= start <= stop <= 1, step > 0,
    0 <= fixed_threshold <= 1 (CAMs lie in [0, 1])."""
    if config.convention not in ("present", "gt"):
        raise ConfigError(f"{where}: `convention` must be \"present\" or \"gt\", got {config.convention!r}.")
    if not 0.0 <= config.threshold_start <= config.threshold_stop <= 1.0:
        raise ConfigError(f"{where}: need 0 <= threshold_start <= threshold_stop <= 1 (CAMs lie in [0, 1]), got "
                          f"threshold_start = {config.threshold_start}, threshold_stop = {config.threshold_stop}.")
    if not 0.0 < config.threshold_step <= 1.0:
        raise ConfigError(f"{where}: `threshold_step` must be in (0, 1], got {config.threshold_step}.")
    if not 0.0 <= config.fixed_threshold <= 1.0:
        raise ConfigError(f"{where}: `fixed_threshold` must be in [0, 1], got {config.fixed_threshold}.")
    return config


@dataclass
class Suite:
    name: str
    dataset: str
    description: str = ""
    data_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)  # role -> split name
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=list)  # default method list
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    # method -> {"source": str, metric: {"value": float, protocol...}} (harness/references.py)
    reference: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: str | None = None


SUITE_KEYS = {"suite", "dataset", "splits", "eval", "methods", "reference"}


def list_suites() -> dict[str, Path]:
    """Suites shipped in ``benchmarks/``, by name."""
    return {p.stem: p for p in sorted(BENCHMARKS_DIR.glob("*.toml"))}


def load_suite(name_or_path: str) -> Suite:
    """Load a suite by name (``benchmarks/<name>.toml``) or path, validating its tables."""
    path = Path(name_or_path)
    if not path.suffix == ".toml":
        suites = list_suites()
        if name_or_path not in suites:
            raise unknown("suite", name_or_path, suites)
        path = suites[name_or_path]
    if not path.is_file():
        raise ConfigError(f"Suite file {path} does not exist. Pass a suite name ({', '.join(list_suites())}) or a path to a .toml file.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Suite file {path} is not valid TOML: {exc}.") from None
    return _suite_from_dict(raw, path)


def _suite_from_dict(raw: dict[str, Any], path: Path) -> Suite:
    for key in raw:
        if key not in SUITE_KEYS:
            raise ConfigError(f"Suite file {path}: unknown table [{key}].{suggest(key, SUITE_KEYS)} Expected tables: {', '.join(sorted(SUITE_KEYS))}.")
    head = raw.get("suite", {})
    if "dataset" not in head:
        raise ConfigError(f"Suite file {path}: [suite] must set `dataset` (e.g. dataset = \"synthetic\").")
    dataset_table = dict(raw.get("dataset", {}))
    data_root = dataset_table.pop("root", None)
    if data_root is not None:
        data_root = expand_data_root(str(data_root), path.parent)
    suite = Suite(
        name=head.get("name", path.stem),
        dataset=head["dataset"],
        description=head.get("description", ""),
        data_root=data_root,
        dataset_options=dataset_table,
        splits=dict(raw.get("splits", {})),
        seeds=[int(s) for s in head.get("seeds", [0])],
        methods=list(head.get("methods", [])),
        eval=check_eval_config(_build_dataclass(EvalConfig, raw.get("eval", {}), f"{path} [eval]"), f"Suite file {path} [eval]"),
        method_params={k: dict(v) for k, v in raw.get("methods", {}).items()},
        reference=parse_references(raw.get("reference", {}), str(path)),
        path=str(path),
    )
    return suite


def expand_data_root(text: str | None, base: Path | None = None) -> str | None:
    """A data root as the user wrote it -> an absolute path; the one place where ``~`` is
    expanded (``--data-root=~/x`` reaches us unexpanded; so does a suite's ``root``).
    Relative paths are taken from ``base`` (a suite file's folder), else the working
    directory. ``None`` stays ``None``. The dataset later resolves it to its canonical root."""
    if text is None:
        return None
    root = Path(text).expanduser()
    return str((root if root.is_absolute() else (base or Path.cwd()) / root).resolve())


def default_suite(dataset: str) -> Suite:
    """The shipped suite named like the dataset, else a bare one with defaults."""
    suites = list_suites()
    if dataset in suites:
        return load_suite(dataset)
    return Suite(name=dataset, dataset=dataset)


# -- typed values -----------------------------------------------------------------------------

def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` (from TOML or a ``key=value`` string) to the field's type."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # dataclass string annotations
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot use {value!r}.")
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            items = [v for v in (t.strip() for t in text.split(",")) if v]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        inner = args[0] if args else str
        converted = [coerce(v, inner, where) for v in items]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}.")
    if annotation in (int, float):
        try:
            number = annotation(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (annotation is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected {'an integer' if annotation is int else 'a number'}, got {value!r}.")
        return number
    if annotation is str:
        return str(value)
    return value


def _build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key `{key}`.{suggest(key, fields)} Valid keys: {', '.join(fields)}.")
        kwargs[key] = coerce(value, fields[key].type, f"{where} `{key}`")
    return cls(**kwargs)


def build_method_config(config_cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a method's Config dataclass from suite values and overrides."""
    return _build_dataclass(config_cls, values, where)


# -- overrides --------------------------------------------------------------------------------

@dataclass
class Overrides:
    """``key=value`` overrides from the command line, sorted into their targets.

    ``method.key=value`` targets one method, ``dataset.key=value`` the dataset options,
    ``eval.key=value`` the evaluation, and a bare ``key=value`` every selected method that
    has that field (an error if none has it).
    """

    methods: dict[str, dict[str, str]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    dataset: dict[str, str] = field(default_factory=dict)
    eval: dict[str, str] = field(default_factory=dict)


def parse_overrides(items: list[str]) -> Overrides:
    out = Overrides()
    for item in items:
        if "=" not in item:
            raise ConfigError(f"Override `{item}` is not of the form key=value (e.g. epochs=3, weaktr.aaf=false, dataset.num_train=64).")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"Override `{item}` has an empty key.")
        scope, _, name = key.rpartition(".")
        if not scope:
            out.shared[name] = value
        elif scope == "dataset":
            out.dataset[name] = value
        elif scope == "eval":
            out.eval[name] = value
        else:
            out.methods.setdefault(scope, {})[name] = value
    return out


# -- trials -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialSpec:
    """Everything that determines a trial's results. Its id is a hash of this."""

    suite: str
    method: str
    method_config: dict[str, Any]
    dataset: str
    data_root: str | None
    dataset_options: dict[str, Any]
    splits: dict[str, str]
    eval: dict[str, Any]
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def trial_id(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        return f"{self.method}/{self.dataset}/seed{self.seed}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialSpec":
        return cls(**data)
