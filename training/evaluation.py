"""Evaluation of an adapter against its base on held-out data (same template, same tokens)."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from training.data import Example

log = logging.getLogger(__name__)


@torch.no_grad()
def response_loss(model: Any, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean per-token negative log-likelihood of the labelled (response + EOS) tokens."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            mask[row, : len(e.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            shifted.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(nll)
        count += int((shifted != -100).sum())
    return total / max(count, 1)


def compare_losses(peft_model: Any, examples: list[Example], pad_id: int) -> dict[str, float]:
    with peft_model.disable_adapter():
        base = response_loss(peft_model, examples, pad_id)
    adapter = response_loss(peft_model, examples, pad_id)
    return {
        "eval_loss_base": round(base, 4),
        "eval_loss_adapter": round(adapter, 4),
        "loss_reduction": round(1 - adapter / base, 4),
        "eval_examples": len(examples),
    }


class _GrammarLogits:
    """A transformers logits processor: each row's scores masked by its own grammar matcher,
    as the service's engine masks them (service/grammar.py)."""

    def __init__(self, grammar: Any, rows: int, prompt_width: int, eos: int):
        self.matchers = [grammar.matcher() for _ in range(rows)]
        self.prompt_width, self.eos = prompt_width, eos
        self.done = [False] * rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, matcher in enumerate(self.matchers):
            if input_ids.shape[1] > self.prompt_width and not self.done[row]:
                matcher.accept(int(input_ids[row, -1]))
                self.done[row] = matcher.finished
            if self.done[row]:  # complete: only the end of the sequence may follow
                scores[row] = float("-inf")
                scores[row, self.eos] = 0.0
            else:
                scores[row] = matcher.mask(scores[row])
        return scores


@torch.no_grad()
def greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 10,
    grammar: Any = None,
) -> list[str]:
    """Greedy completions, batched with left padding; under `grammar` (a service.grammar
    Grammar) each row decodes as the service enforces a JSON adapter's schema."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    outputs = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        processors = None
        if grammar is not None:
            processors = [_GrammarLogits(grammar, *enc.input_ids.shape, tokenizer.eos_token_id)]
        generated = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=processors,
        )
        for row in generated[:, enc.input_ids.shape[1] :]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    tokenizer.padding_side = "right"
    return outputs


def marketmail_verdict(text: str, product: str, schema: dict[str, Any]) -> tuple[bool, str]:
    """Valid when the whole output is one JSON object matching the schema that names the product."""
    import jsonschema

    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        return False, f"not JSON: {exc.msg}"
    try:
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as exc:
        return False, f"schema: {exc.message}"
    name = product.lower()
    if name not in value["subject"].lower() and name not in value["body"].lower():
        return False, "product not named in subject or body"
    return True, "ok"


def schema_rates(
    peft_model: Any,
    tokenizer: Any,
    manifest: Any,
    held: list[dict[str, Any]],
    shots: list[tuple[dict[str, str], str]],
    max_new_tokens: int = 256,
) -> dict[str, Any]:
    """Share of held-out inputs whose greedy output is valid: the adapter zero-shot without and
    with the grammar the service enforces (`valid_rate_adapter_grammar`), and the base few-shot."""
    schema = manifest.output.json_schema
    plain = [manifest.render_prompt({"product": r["product"], "description": r["description"]}) for r in held]
    prefix = "".join(manifest.render_prompt(i) + t + "\n\n" for i, t in shots)
    from service.grammar import GrammarCompiler

    grammar = GrammarCompiler(tokenizer).compile_now(schema)  # what the service enforces
    adapter_out = greedy(peft_model, tokenizer, plain, max_new_tokens)
    grammar_out = greedy(peft_model, tokenizer, plain, max_new_tokens, grammar=grammar)
    with peft_model.disable_adapter():
        base_out = greedy(peft_model, tokenizer, [prefix + p for p in plain], max_new_tokens)
    result: dict[str, Any] = {"held_out": len(held)}
    for label, outs in (("adapter", adapter_out), ("adapter_grammar", grammar_out), ("base_few_shot", base_out)):
        verdicts = [
            marketmail_verdict(o.split("\n\n")[0] if label == "base_few_shot" else o, r["product"], schema)
            for o, r in zip(outs, held, strict=True)
        ]
        result[f"valid_rate_{label}"] = round(sum(v for v, _ in verdicts) / len(held), 4)
        failures = [f"{r['product']}: {why}" for (v, why), r in zip(verdicts, held, strict=True) if not v]
        result[f"failures_{label}"] = failures[:10]
    result["base_shots"] = len(shots)
    return result
