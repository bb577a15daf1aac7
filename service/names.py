"""How "no adapter" is spelled, for every layer (the engine, adapters, metrics, serving).

"No adapter" is `None` in code (`EngineRequest.adapter`, `Target.adapter`), and `BASE` wherever
it must be a name: the API's `adapter: "base"`, metric labels, guardrails sections, prefix-cache
keys. `PEFT_BASE` is PEFT's own spelling in per-row `adapter_names`, built only where the engine
hands PEFT those names.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE = "base"
PEFT_BASE = "__base__"


@dataclass(frozen=True)
class AdapterKey:
    """An adapter version's identity in the engine: its name and version. A key without a
    version stands for the name's current version (the registry resolves it), or, in a set of
    adapters in use, for every version of the name. Written `name@version` in logs and errors."""

    name: str
    version: str | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @classmethod
    def of(cls, adapter: AdapterKey | str) -> AdapterKey:
        """A key as is, or parsed from its written form (`name` or `name@version`)."""
        if isinstance(adapter, AdapterKey):
            return adapter
        name, _, version = adapter.partition("@")
        return cls(name, version or None)
