"""An adapter version's weights in host memory (`HostCopy`): its tensors as saved and, for a plain
LoRA, its layers as (A, B, scaling), the form a device slot copies in place
(`service.engine.residency`). An adapter that needs more than that (DoRA, a LoRA bias,
embeddings, `modules_to_save`) has no layers: PEFT loads it into a slot of its own."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from service.names import AdapterKey

PREFIX = "base_model.model."  # a LoRA layer's module path in a PeftModel starts so
_FAST_CONFIG = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False}


@dataclass
class HostCopy:
    """One adapter version's weights in host memory, ready to copy into a slot."""

    key: AdapterKey
    config: dict[str, Any]  # adapter_config.json
    tensors: dict[str, torch.Tensor]  # its state dict, as saved
    # Per LoRA layer (its module path in the PeftModel, without "base_model.model."): A [r, in],
    # B [out, r] and the scaling PEFT would give it. None when PEFT must load it itself.
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None
    rank: int
    nbytes: int
    fresh: bool = True  # just read from disk: its first swap-in counts as one from disk

    @classmethod
    def parse(cls, key: AdapterKey, config: dict[str, Any], tensors: dict[str, torch.Tensor], pin: bool) -> HostCopy:
        if pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        layers = _linear_layers(config, tensors)
        rank = max((a.shape[0] for a, _, _ in (layers or {}).values()), default=int(config.get("r", 8)))
        return cls(key, config, tensors, layers, rank, nbytes)


def _linear_layers(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict | None:
    """The adapter as plain (A, B, scaling) per layer, or None if it needs more than that."""
    from peft.utils.other import get_pattern_key

    if any(config.get(k, v) != v for k, v in _FAST_CONFIG.items()) or config.get("modules_to_save"):
        return None
    if config.get("alora_invocation_tokens") or config.get("peft_type", "LORA") != "LORA":
        return None
    names: dict[str, list[str]] = {}
    for key in tensors:
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if key.endswith(suffix) and key.startswith(PREFIX):
                names.setdefault(key[len(PREFIX) : -len(suffix)], []).append(suffix)
                break
        else:
            return None  # embeddings, biases, extra parameters: PEFT's own loading
    layers = {}
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module, parts in names.items():
        if len(parts) != 2:
            return None
        a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            return None
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        layers[module] = (a, b, scaling)
    return layers


def lora_layers(model: Any) -> dict[str, Any]:
    """The PeftModel's LoRA layers by module path (without the PeftModel's prefix)."""
    from peft.tuners.lora import LoraLayer

    return {
        name[len(PREFIX) :]: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and name.startswith(PREFIX)
    }
