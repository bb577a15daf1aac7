"""SFTTrainer with the loss computed where it counts: the LM head only at labelled positions.

Our examples mask the prompt (-100), so about half of the positions carry no loss. trl's fused
LM head scores only the labelled positions on Triton devices; elsewhere (this CPU) it projects
every position through the 49k-word head and computes its extra metrics there too. Projecting the
labelled positions alone gives the same loss and gradients for less work (docs/training.md has
the figures).
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer


class ResponseOnlyTrainer(SFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        backbone_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        causal_lm = _causal_lm(model)
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        hidden = backbone(**backbone_inputs, use_cache=False).last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        mask = targets != -100
        logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
        picked = targets[mask]
        nll = torch.nn.functional.cross_entropy(logits, picked, reduction="sum")
        count = mask.sum()
        loss = nll / (count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages; the count spans all ranks

        mode = "train" if model.training else "eval"
        with torch.no_grad():
            correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == picked).sum()).sum()
            valid = self.accelerator.gather_for_metrics(count).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, {"loss": loss}) if return_outputs else loss


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM under PEFT and accelerate wrappers."""
    while hasattr(model, "module"):  # DDP
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loraplus_optimizer(model: Any, args: Any, ratio: float) -> Any:
    """LoRA+ (Hayou et al. 2024): B matrices learn `ratio` times faster than A; PEFT builds it."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    lr = kwargs.pop("lr", args.learning_rate)
    return create_loraplus_optimizer(
        model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio, weight_decay=args.weight_decay, **kwargs
    )
