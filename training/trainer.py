"""SFTTrainer with the loss computed where it counts, and batches of like lengths in random order.

Loss: the LM head projects only the labelled positions.

Our examples mask the prompt (-100), so about half of the positions carry no loss. trl's fused
LM head scores only the labelled positions on Triton devices; elsewhere (this CPU) it projects
every position through the 49k-word head and computes its extra metrics there too. Projecting the
labelled positions alone gives the same loss and gradients for less work (docs/training.md has
the figures).

Loss weighting: with batches of like lengths, a batch of one-line answers holds a few dozen
labelled tokens and a batch of essays a few thousand; transformers' per-batch mean gives both the
same weight, so a short answer's tokens count many times more than an essay's, while held-out
per-token loss counts every token once. `tokens_per_step` divides by a constant instead.

Batches: transformers' `group_by_length` sorts each window of 50 batches from the longest to the
shortest, so training sweeps long -> short every 50 steps. At a high learning rate the adapter
follows the sweep: measured on Dolly, held-out loss at the end of a sweep (after ten batches of
one-line answers) was back near the base model's (2.88 against 2.89), while mid-sweep it was 2.5.
`LengthBuckets` keeps the little padding of length grouping and draws the batches in random order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from trl import SFTTrainer

BUCKET_WINDOW = 64  # batches sorted together: the larger, the less padding and the less variety


class LengthBuckets(torch.utils.data.Sampler[int]):
    """Indices such that each run of `batch_size` holds examples of like length, runs in random order.

    Shuffle, sort each window of `BUCKET_WINDOW` batches by length, cut it into batches, then
    shuffle all the batches. Deterministic for a (seed, epoch), so resuming skips the same batches.
    The one short batch (the end of the last window) comes last: the data loader cuts the index
    stream into steps by count, so a short batch mid-epoch would shift every later step across
    two runs (mixed lengths, more padding: on the dolly run 36% more tokens a step after it).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        window = self.batch_size * BUCKET_WINDOW
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return sorted(shuffled, key=lambda b: len(b) < self.batch_size)  # stable: the short one last

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


def keep_adapter_fp32(model: Any) -> None:
    """Trainable weights back to fp32 after trl's SFTTrainer cast them to bf16.

    trl (1.x) casts every trainable weight of a model on a quantized base to bf16 when it builds
    the trainer, so AdamW then updates bf16 weights: an update smaller than half a bf16 step of the
    weight (2^-9 to 2^-8 of it) is lost; for a LoRA A weight of 0.04, any update below 1.2e-4,
    which with Adam's steps of about the learning rate is the tail of a cosine schedule from 1e-3.
    fp32 weights keep every update; under bf16 autocast the products are still computed in bf16,
    so this costs no speed.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


class ResponseOnlyTrainer(SFTTrainer):
    """`tokens_per_step`: when given, a training batch's summed loss is divided by this constant
    (the expected labelled tokens of one optimiser step on one device) instead of by the batch's
    own token count, so every labelled token of the run weighs the same ("token" loss weighting).
    """

    def __init__(self, *args: Any, tokens_per_step: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keep_adapter_fp32(self.model)
        self.tokens_per_step = tokens_per_step
        if tokens_per_step is not None:
            self.loss_is_scaled_for_ga = True  # the constant spans the accumulated micro-batches

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "length" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        # One run of like lengths per optimiser step over all ranks: accelerate deals consecutive
        # batches to the ranks in turn, so the ranks of a step get like lengths (none waits long
        # for another) and the step holds the same sequences as on one process.
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthBuckets(dataset["length"], size, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        targets = labels[:, 1:]
        mask = targets != -100
        # Position t predicts token t + 1: keep the positions whose next token is labelled, and let
        # the model project only those through its LM head (transformers' boolean logits_to_keep).
        # The call goes through the model as wrapped (DDP under torch.distributed.run): DDP syncs the
        # gradients only of what ran through its own forward.
        keep = torch.nn.functional.pad(mask, (0, 1), value=False)
        model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits.float()
        picked = targets[mask]
        nll = torch.nn.functional.cross_entropy(logits, picked, reduction="sum")
        count = mask.sum()
        if model.training and self.tokens_per_step is not None:
            loss = nll / self.tokens_per_step  # DDP's mean over ranks keeps the per-token weight
        else:
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


def loraplus_optimizer(model: Any, args: Any, ratio: float) -> Any:
    """LoRA+ (Hayou et al. 2024): B matrices learn `ratio` times faster than A; PEFT builds it."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    lr = kwargs.pop("lr", args.learning_rate)
    return create_loraplus_optimizer(
        model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio, weight_decay=args.weight_decay, **kwargs
    )
