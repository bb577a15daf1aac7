"""`LoRAModel`: the one owner of the served model and what is patched into it.

The base model becomes a PEFT model at its first adapter; `AdapterResidency` changes its
adapters (device slots), and `ModelRunner`, the KV caches and the CUDA-graph steps run it. All of
them hold the same `LoRAModel`, so none keeps a copy of the model that could go stale, and the
fused LoRA (service/engine/lora.py), whose patched layers consult one `FusedMixedLoRA`, belongs
to it rather than to whoever ran a batch first.
"""

from __future__ import annotations

import weakref
from typing import Any

from service.engine.lora import FusedMixedLoRA

# torch model -> its owner: two runners over one model must share the owner, because the
# fused LoRA's patches in the model's layers are bound to one FusedMixedLoRA.
_OWNERS: weakref.WeakKeyDictionary[Any, LoRAModel] = weakref.WeakKeyDictionary()


class LoRAModel:
    def __init__(self, model: Any):
        self._model = model
        self.fused = FusedMixedLoRA()
        _OWNERS[model] = self

    @classmethod
    def of(cls, model: Any) -> LoRAModel:
        """The owner of `model` (a new one if it has none yet)."""
        owner = _OWNERS.get(model)
        return owner if owner is not None else cls(model)

    @property
    def model(self) -> Any:
        """The model to run: the base, or the PEFT model over it from the first adapter on."""
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        """The model changed (wrapped by PEFT at the first adapter, or a test's own)."""
        self._model = model
        _OWNERS[model] = self

    @property
    def peft(self) -> bool:
        """Whether adapters can be attached by name (it is a PEFT model)."""
        return hasattr(self._model, "peft_config")

    def fused_layers(self) -> FusedMixedLoRA | None:
        """The fused LoRA, its layers patched for the adapters loaded now (None before the
        first adapter): the one place that installs it."""
        if not self.peft:
            return None
        self.fused.install(self._model)
        return self.fused

    def reserve(self, slots: int) -> None:
        """Size the adapter pool for `slots` adapters from the start (CUDA graphs: loading one
        must never change the pool's shape, which the graphs captured)."""
        self.fused.pool_slots = max(self.fused.pool_slots, slots)
