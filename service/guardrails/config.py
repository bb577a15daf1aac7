"""The guardrails YAML (`HOTSWAP_GUARDRAILS`): which hooks run, in which order, for whom.

    pre:                      # every request, in order
      - hook: max_prompt_length
        max_chars: 32000
      - hook: pii             # the other keys are the hook's options
    post:
      - hook: pii
    adapters:                 # per adapter ("base" for the base model), after the global ones
      schema:
        post:
          - hook: json_schema
        inherit: true         # false: only this adapter's hooks run for it

`hook` is a built-in name (below), an entry point in the group `hotswap.guardrails`, or a dotted
path `package.module:Class` (or `package.module.Class`) to a `Hook` subclass. Optional `name`
relabels it in responses and metrics. Any mistake fails the start with a message that says where.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from service.guardrails.base import Hook
from service.guardrails.pii import PIIRedactor
from service.guardrails.rules import BannedTerms, InjectionDetector, JsonOutputSchema, MaxPromptLength

BUILTIN: dict[str, type[Hook]] = {
    cls.name: cls for cls in (PIIRedactor, InjectionDetector, BannedTerms, MaxPromptLength, JsonOutputSchema)
}
ENTRY_POINT_GROUP = "hotswap.guardrails"
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
STAGES = ("pre", "post")


class GuardrailConfigError(ValueError):
    """The guardrails file is wrong; the message says where."""


@dataclass(frozen=True)
class Chain:
    pre: tuple[Hook, ...] = ()
    post: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class Guardrails:
    """Built hooks: the global chain and each adapter's."""

    default: Chain = field(default_factory=Chain)
    adapters: dict[str, Chain] = field(default_factory=dict)
    source: str = "none"

    def chain(self, adapter: str) -> Chain:
        return self.adapters.get(adapter, self.default)

    @property
    def enabled(self) -> bool:
        return bool(self.default.pre or self.default.post or self.adapters)


def resolve_hook_class(reference: str) -> type[Hook]:
    if reference in BUILTIN:
        return BUILTIN[reference]
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == reference]
    if found:
        target = found[0].load()
    elif "." in reference or ":" in reference:
        module_name, _, attr = reference.partition(":") if ":" in reference else reference.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise GuardrailConfigError(f"cannot import {module_name!r}: {exc}") from exc
        try:
            target = getattr(module, attr)
        except AttributeError as exc:
            raise GuardrailConfigError(f"{module_name!r} has no attribute {attr!r}") from exc
    else:
        known = sorted(BUILTIN) + sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise GuardrailConfigError(
            f"unknown hook {reference!r}; built-in and registered hooks: {known}, "
            "or give a dotted path package.module:Class"
        )
    if not (isinstance(target, type) and issubclass(target, Hook)):
        raise GuardrailConfigError(f"{reference!r} is not a subclass of service.guardrails.Hook")
    return target


def build_hook(spec: Any, stage: str, where: str) -> Hook:
    if not isinstance(spec, dict) or "hook" not in spec:
        raise GuardrailConfigError(f"{where}: each entry needs 'hook: <name>'")
    options = dict(spec)
    reference = options.pop("hook")
    label = options.pop("name", None)
    where = f"{where} ({reference})"
    try:
        cls = resolve_hook_class(str(reference))
    except GuardrailConfigError as exc:
        raise GuardrailConfigError(f"{where}: {exc}") from None
    if not cls.supports(stage):
        raise GuardrailConfigError(f"{where}: this hook has no {stage} stage")
    try:
        hook = cls(**options)
    except (TypeError, ValueError) as exc:
        raise GuardrailConfigError(f"{where}: {exc}") from None
    if label is not None:
        hook.name = str(label)
    return hook


def _chain(section: Any, where: str) -> Chain:
    if section is None:
        return Chain()
    if not isinstance(section, dict):
        raise GuardrailConfigError(f"{where}: expected a mapping with 'pre' and/or 'post'")
    unknown = set(section) - {*STAGES, "inherit"}
    if unknown:
        raise GuardrailConfigError(f"{where}: unknown keys {sorted(unknown)}")
    stages = {}
    for stage in STAGES:
        entries = section.get(stage) or []
        if not isinstance(entries, list):
            raise GuardrailConfigError(f"{where}.{stage}: expected a list of hooks")
        stages[stage] = tuple(build_hook(e, stage, f"{where}.{stage}[{i}]") for i, e in enumerate(entries))
    return Chain(**stages)


def parse(doc: Any, source: str = "<config>") -> Guardrails:
    if doc is None:
        return Guardrails(source=source)
    if not isinstance(doc, dict):
        raise GuardrailConfigError(f"{source}: expected a mapping")
    unknown = set(doc) - {*STAGES, "adapters"}
    if unknown:
        raise GuardrailConfigError(f"{source}: unknown keys {sorted(unknown)}; expected pre, post, adapters")
    default = _chain({k: doc.get(k) for k in STAGES}, source)
    adapters: dict[str, Chain] = {}
    for name, section in (doc.get("adapters") or {}).items():
        own = _chain(section, f"{source}: adapters.{name}")
        inherit = True if section is None else section.get("inherit", True)
        if not isinstance(inherit, bool):
            raise GuardrailConfigError(f"{source}: adapters.{name}.inherit must be true or false")
        adapters[str(name)] = Chain(
            pre=(default.pre if inherit else ()) + own.pre,
            post=(default.post if inherit else ()) + own.post,
        )
    return Guardrails(default=default, adapters=adapters, source=source)


def load(path: str | Path | None) -> Guardrails:
    """The guardrails of `path` ("default": the bundled config; None: no hooks)."""
    if path is None or str(path) == "":
        return Guardrails()
    file = DEFAULT_CONFIG if str(path) == "default" else Path(path).expanduser()
    try:
        text = file.read_text("utf-8")
    except OSError as exc:
        raise GuardrailConfigError(f"cannot read guardrails file {file}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GuardrailConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse(doc, str(file))
