"""The pretrained weights of a sweep: which checkpoint each trial's backbones load, the rule
that real data never trains from random initialisation by accident, and fetching every
checkpoint before the first trial starts.

A method's config marks its checkpoint fields with ``methods.common.weights.weights_field``
(which names the architecture field each one is for); the harness reads only that metadata,
so it has no method-specific code. A sweep is on *real data* when its dataset reads files
from a data root (``synthetic`` generates its data and has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from harness.config import Overrides, Suite, TrialSpec
from harness.environment import cpu_count
from harness.errors import ConfigError, suggest
from harness.pretrain import build_missing as build_missing_pretrained
from harness.pretrain import family_of
from harness.pretrain import install as install_pretraining
from harness.refine import irn_config, irn_settings, refine_name
from methods.common import weights as registry


def weight_uses(method_cls: type, config: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``[(field, architecture, value)]`` of the checkpoint fields of one method config."""
    fields = registry.config_weight_fields(method_cls.Config)
    return [(name, str(config[arch_field]), config[name]) for name, arch_field in fields.items()]


def eval_weight_uses(eval_settings: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``[(field, architecture, value)]`` of the checkpoints a trial's harness stages load:
    IRN's backbone (``irn.pretrained``) when ``eval.refine = "irn"``, else none."""
    if refine_name(eval_settings) != "irn":
        return []
    config = irn_config(eval_settings)
    return [(f"irn.{name}", str(getattr(config, arch)), getattr(config, name))
            for name, arch in registry.config_weight_fields(type(config)).items()]


def trial_weight_uses(spec: TrialSpec, methods: dict[str, type]) -> list[tuple[str, str, Any]]:
    """Every checkpoint field one trial resolves: its method's, then its harness stages'."""
    return weight_uses(methods[spec.method], spec.method_config) + eval_weight_uses(spec.eval)


def _spelled_out(field: str, method: str, suite: Suite, overrides: Overrides, eval_settings: dict[str, Any]) -> bool:
    """Whether the user set checkpoint field ``field`` of ``method``'s trials (a suite table or
    an override) rather than leaving the default. IRN's settings come only from the user."""
    if field.startswith("irn."):
        return field[4:] in irn_settings(eval_settings.get("irn"))
    given = set(suite.method_params.get(method, {})) | set(overrides.shared) | set(overrides.methods.get(method, {}))
    return field in given


def _random_init_fix(method: str, field: str) -> str:
    """The override(s) that set checkpoint field ``field``, in backticks: random init on
    purpose, and for IRN (whose default arch is the tiny ResNet) the ImageNet ResNet-50 too."""
    if field.startswith("irn."):
        return (f"`{method}.irn={field[4:]}=none`, or `{method}.irn=arch=resnet50,{field[4:]}=auto` for the ImageNet "
                f"ResNet-50 of the IRN paper")
    return f"`{method}.{field}=none`"


def check_sweep_weights(suite: Suite, overrides: Overrides, methods: dict[str, type], configs: dict[str, dict[str, Any]], real_data: bool,
                        evals: dict[str, dict[str, Any]] | None = None) -> None:
    """Fail before any trial when a checkpoint value cannot be resolved (``auto`` for an
    architecture without registered weights, an unknown name), or when a real-data sweep
    would train a backbone from random init without ``<field> = "none"`` spelled out in the
    suite or an override. ``evals``: each method's trial eval settings (IRN's backbone when
    ``refine = "irn"``). Errors: ConfigError naming the fields and the fix."""
    unset, bad = [], []
    for name, cls in methods.items():
        eval_settings = (evals or {}).get(name, {})
        for field, arch, value in weight_uses(cls, configs[name]) + eval_weight_uses(eval_settings):
            try:
                source = registry.source_for(value, arch)
                if registry.synthetic_seed(value) is not None:
                    family_of(arch)  # an architecture the synthetic pretraining knows
                    continue
            except registry.WeightsError as exc:
                bad.append(f"{name}.{field}: {exc}")
                continue
            if source is None and not registry.is_random_init(value) and not Path(str(value)).expanduser().is_file():
                bad.append(f"{name}.{field}={value!r} is neither a registered checkpoint (`wsss-bench weights list`: "
                           f"{', '.join(registry.SOURCES)}) nor an existing file.{suggest(str(value), registry.SOURCES)}")
            if real_data and registry.is_random_init(value) and not _spelled_out(field, name, suite, overrides, eval_settings):
                unset.append((f"{name}.{field} ({arch})", _random_init_fix(name, field)))
    if bad:
        raise ConfigError("Pretrained weights of suite " + repr(suite.name) + " cannot be resolved. " + " ".join(bad))
    if unset:
        labels = [label for label, _ in unset]
        raise ConfigError(
            f"Suite {suite.name!r} trains on real data ({suite.dataset}), but {', '.join(labels)} "
            f"{'has' if len(unset) == 1 else 'have'} no pretrained weights set, so {'it' if len(unset) == 1 else 'they'} "
            f"would start from random initialisation. Set each to \"auto\" (the ImageNet checkpoint of the weights "
            f"registry, `wsss-bench weights list`), a checkpoint path, or \"none\" to train from random init on purpose "
            f"(in the suite's [methods.<name>] table or as an override, e.g. {unset[0][1]}); "
            f"the report marks random-init rows."
        )


def trial_sources(spec: TrialSpec, methods: dict[str, type]) -> list[registry.WeightSource]:
    """The registry checkpoints one trial loads (local paths and random init excluded)."""
    out = []
    for field, arch, value in trial_weight_uses(spec, methods):
        source = registry.source_for(value, arch)
        if source is not None and source not in out:
            out.append(source)
    return out


def describe_trial(spec: TrialSpec, methods: dict[str, type]) -> str:
    """One ``--dry-run`` cell: ``field=source [state]`` per checkpoint field of the trial."""
    parts = []
    for field, arch, value in trial_weight_uses(spec, methods):
        text, state = registry.describe(value, arch)
        parts.append(f"{field}={text.split(' (')[0] if state != 'error' else value} [{state}]")
    return "; ".join(parts) or "-"


def fetch_sweep_weights(specs: list[TrialSpec], methods: dict[str, type], log: Callable[[str], None] = print,
                        pretrain_cache: Path | None = None) -> None:
    """Download every registry checkpoint the trials need that is not cached yet, before the
    first trial (workers on offline compute nodes then find them in the shared cache). With
    ``pretrain_cache`` (the results cache), also build every ``"synthetic"`` pretrained
    checkpoint the trials need (``harness.pretrain``; cached, so only on first use).
    Errors: ConfigError with the registry's message (offline, manual source, checksum)."""
    if pretrain_cache is not None:
        install_pretraining(pretrain_cache, log=log)
        uses = [(arch, registry.synthetic_seed(value)) for spec in specs for _, arch, value in trial_weight_uses(spec, methods)]
        wanted = [(arch, seed) for arch, seed in uses if seed is not None]  # (architecture, pretraining seed); repeats built once
        try:
            build_missing_pretrained(wanted, pretrain_cache, workers=cpu_count(), log=log)
        except registry.WeightsError as exc:
            raise ConfigError(str(exc)) from None
    seen: list[registry.WeightSource] = []
    for spec in specs:
        seen += [s for s in trial_sources(spec, methods) if s not in seen]
    for source in seen:
        if not registry.is_cached(source) and not registry.offline():  # offline: fetch() says what is missing
            log(f"fetching pretrained weights {source.name} from {source.location} -> {registry.cached_path(source)}")
        try:
            registry.fetch(source)
        except registry.WeightsError as exc:
            raise ConfigError(str(exc)) from None
