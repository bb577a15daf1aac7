"""How "no adapter" is spelled, for every layer (the engine, adapters, metrics, serving).

"No adapter" is `None` in code (`EngineRequest.adapter`, `Target.adapter`), and `BASE` wherever
it must be a name: the API's `adapter: "base"`, metric labels, guardrails sections, prefix-cache
keys. `PEFT_BASE` is PEFT's own spelling in per-row `adapter_names`, built only where the engine
hands PEFT those names.
"""

BASE = "base"
PEFT_BASE = "__base__"
