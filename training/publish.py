"""`--publish DEST`: evaluate a trained package on the base as the service loads it, write the
evaluation record into its manifest, and upload it where the service reads adapters from.

The record (`hotswap.json`'s `evaluation`, service.adapters.manifest.Evaluation):
- `held_out`: the held-out per-token loss of the base and of the adapter, and the reduction;
- `task`: the task's metric (schema: the share of outputs that are valid JSON of the schema,
  `valid_rate`, and of those that also name the product, `named_rate`, decoded under the
  grammar the service enforces);
- `golden`: a few held-out prompts with the greedy output the adapter gave and each output
  token's log-probability (teacher-forced, as the gate scores them). The service's load gate
  (service.adapters.gate) checks that they reproduce before the version takes traffic.

DEST is a source the service reads (service.adapters.sources): a directory (absolute or
starting with `.`), `hf://org/repo[@revision]`, `s3://bucket/prefix` or `gs://bucket/prefix`,
written through the same libraries (huggingface_hub, fsspec) with the same credentials.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from service.adapters.manifest import AdapterManifest, Evaluation, GoldenPrompt
from service.adapters.sources import CONFIG_FILE, PACKAGE_FILES, WEIGHTS_FILE, content_version, parse_source
from training.data import Example
from training.evaluation import compare_losses, greedy, marketmail_verdict

log = logging.getLogger(__name__)

GOLDEN_PROMPTS = 4
GOLDEN_TOKENS = 48


def golden_prompts(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = GOLDEN_TOKENS
) -> list[GoldenPrompt]:
    """Each prompt's greedy output and its tokens' log-probabilities, scored in one forward pass
    over prompt and output (as the gate scores them), one prompt at a time (no padding)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    golden = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt).input_ids
        ids = torch.tensor([prompt_ids], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            output_ids = out[0, len(prompt_ids) :].tolist()
            if not output_ids:
                continue
            logits = model(input_ids=out[:, : len(prompt_ids) + len(output_ids)]).logits.float()
            logprobs = torch.log_softmax(logits[0, len(prompt_ids) - 1 : -1], dim=-1)
            chosen = logprobs.gather(-1, torch.tensor(output_ids, device=device)[:, None])[:, 0].tolist()
        golden.append(
            GoldenPrompt(
                prompt=prompt,
                output=tokenizer.decode(output_ids, skip_special_tokens=True),
                prompt_ids=prompt_ids,
                output_ids=output_ids,
                logprobs=[round(x, 5) for x in chosen],
            )
        )
    return golden


def marketmail_rates(outputs: list[str], held: list[dict[str, Any]], schema: dict[str, Any]) -> dict[str, float]:
    """`valid_rate`: outputs that are one JSON object of the schema; `named_rate`: those that
    also name the product in the subject or body."""
    valid = named = 0
    for text, record in zip(outputs, held, strict=True):
        ok, why = marketmail_verdict(text, record["product"], schema)
        named += ok
        valid += ok or why.startswith("product not named")
    return {"valid_rate": round(valid / len(held), 4), "named_rate": round(named / len(held), 4)}


def evaluate(
    model: Any,
    tokenizer: Any,
    manifest: AdapterManifest,
    task_name: str,
    held: list[dict[str, Any]],
    held_examples: list[Example],
    quantization: str,
) -> Evaluation:
    """The evaluation record of `model` (a PeftModel on the base as the service loads it)."""
    losses = compare_losses(model, held_examples, tokenizer.pad_token_id)
    task: dict[str, float] = {}
    if task_name == "schema":
        from service.grammar import GrammarCompiler

        grammar = GrammarCompiler(tokenizer).compile_now(manifest.output.json_schema)  # what the service enforces
        prompts = [manifest.render_prompt({"product": r["product"], "description": r["description"]}) for r in held]
        task = marketmail_rates(
            greedy(model, tokenizer, prompts, 256, grammar=grammar), held, manifest.output.json_schema
        )
    from training.recipes import TASKS

    prompts = [manifest.render_prompt(TASKS[task_name].to_example(r)[0]) for r in held[:GOLDEN_PROMPTS]]
    return Evaluation(
        quantization=quantization,
        held_out={
            "records": losses["eval_examples"],
            "loss_base": losses["eval_loss_base"],
            "loss_adapter": losses["eval_loss_adapter"],
            "reduction": losses["loss_reduction"],
        },
        task=task,
        golden=golden_prompts(model, tokenizer, prompts),
    )


def upload(package: Path, dest: str) -> str:
    """Copy the package's three files to `dest` (a source the service reads); returns the
    source as the load API takes it. The manifest goes last: a reader that sees it sees the
    rest (publish each release to a prefix of its own, e.g. s3://bucket/dolly/<version>)."""
    source = parse_source(dest)
    order = (CONFIG_FILE, WEIGHTS_FILE, *[n for n in PACKAGE_FILES if n not in (CONFIG_FILE, WEIGHTS_FILE)])
    if source.kind == "local":
        target = Path(source.location)
        if target.resolve() != package.resolve():
            target.mkdir(parents=True, exist_ok=True)
            for name in order:
                shutil.copyfile(package / name, target / name)
    elif source.kind == "hub":
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        api.create_repo(source.location, exist_ok=True)
        api.create_commit(
            source.location,
            [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(package / n)) for n in order],
            commit_message=f"hotswap: publish {package.name} version {content_version(package)}",
            revision=source.revision,
        )
    else:
        import fsspec

        # A new client: fsspec's instance cache would keep an endpoint or credentials of before.
        fs, root = fsspec.core.url_to_fs(source.location, skip_instance_cache=True)
        fs.makedirs(root, exist_ok=True)
        for name in order:
            fs.put_file(str(package / name), f"{root}/{name}")
    log.info("published %s (version %s) to %s", package, content_version(package), source)
    return str(source)
