"""Forward passes of one base model with per-row PEFT adapters and a growing KV cache."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from service.engine import BASE_ADAPTER


class ModelRunner:
    """Runs prefill and decode steps; the model must not change while a step runs."""

    def __init__(self, model: Any, device: str):
        self.model = model
        self.device = torch.device(device)

    def _adapter_kwargs(self, adapters: list[str | None]) -> dict[str, Any]:
        # PEFT's mixed-batch LoRA: each row of the batch runs through its own adapter.
        if not hasattr(self.model, "peft_config"):
            if any(a is not None for a in adapters):
                raise ValueError("no adapters are loaded on this model")
            return {}
        return {"adapter_names": [a or BASE_ADAPTER for a in adapters]}

    @torch.inference_mode()
    def prefill(
        self, prompt_ids: list[int], adapter: str | None, *, all_logits: bool = False
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Run the prompt; return fp32 logits (last position, or every position) and the cache."""
        cache = DynamicCache()
        ids = torch.tensor([prompt_ids], device=self.device)
        out = self.model(
            input_ids=ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **self._adapter_kwargs([adapter]),
        )
        logits = out.logits[0].float()
        return (logits if all_logits else logits[-1]), cache

    @torch.inference_mode()
    def decode(self, token_id: int, cache: DynamicCache, adapter: str | None) -> torch.Tensor:
        """Feed one token; return the fp32 logits of the next position."""
        ids = torch.tensor([[token_id]], device=self.device)
        out = self.model(
            input_ids=ids, cache=cache, use_cache=True, **self._adapter_kwargs([adapter])
        )
        return out.logits[0, -1].float()
