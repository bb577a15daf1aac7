"""One training run: data -> tokenized examples -> SFTTrainer -> evaluation -> adapter package."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.adapters.manifest import AdapterManifest, parse_adapter_name
from training.config import RunConfig, TrainSettings
from training.data import Example, load_records, sha256_of, split, tokenize_example
from training.evaluation import compare_losses, schema_rates
from training.model import add_lora, init_adapter, load_base_for_training, load_lora_weights, load_trained
from training.package import draft_manifest, library_versions, save_adapter, write_package
from training.recipes import TASKS

log = logging.getLogger(__name__)

DEFAULT_SOURCES = {"dolly": "databricks/databricks-dolly-15k", "schema": "data/schema/marketmail.jsonl"}
EVAL_DURING_TRAINING = 64  # held-out examples scored at each logging point for the loss plot


def tokenize_all(tokenizer, manifest: AdapterManifest, task, records, max_length: int) -> list[Example]:
    examples = []
    for record in records:
        inputs, target = task.to_example(record)
        example = tokenize_example(tokenizer, manifest, inputs, target, max_length)
        if example is not None:
            examples.append(example)
    dropped = len(records) - len(examples)
    if dropped:
        log.info("dropped %d of %d records whose prompt exceeds %d tokens", dropped, len(records), max_length)
    return examples


def _dataset(examples: list[Example]):
    from datasets import Dataset

    return Dataset.from_list(
        [{"input_ids": e.input_ids, "labels": e.labels, "length": len(e.input_ids)} for e in examples]
    )


def _trainer_args(config: RunConfig, device: str, has_eval: bool) -> Any:
    import torch
    from trl import SFTConfig

    from training.model import training_dtype

    t = config.train
    per_device = per_device_batch(t.batch_size, _world_size())
    dtype = training_dtype(config.model, device)
    bf16 = dtype == torch.bfloat16 or (dtype is None and device == "cuda" and torch.cuda.is_bf16_supported())
    return SFTConfig(
        output_dir=str(config.checkpoint_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=per_device,
        # Each rank evaluates whole batches of `batch_size`, so the in-training held-out loss (a
        # mean over batches) is the same figure for any number of processes.
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs=t.scheduler_kwargs,
        warmup_steps=t.warmup_steps,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.eval_steps or t.save_steps) if has_eval else None,
        report_to=["tensorboard"] if t.tensorboard else [],
        bf16=bf16,  # autocast; LoRA weights and optimizer state stay fp32
        neftune_noise_alpha=t.neftune_alpha,
        use_cpu=device == "cpu",
        max_length=t.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        # Every LoRA weight takes part in every forward, so DDP need not walk the autograd graph
        # each step looking for unused ones (transformers' default without gradient checkpointing).
        ddp_find_unused_parameters=False,
    )


def run(
    config: RunConfig,
    *,
    resume: bool = False,
    eval_only: bool = False,
    publish: str | None = None,
    serve_quantization: str = "nf4",
) -> dict[str, Any]:
    """Train (or with `eval_only` evaluate) the package in `config.output_dir`; with `publish`,
    add the evaluation record on the base as the service loads it (`serve_quantization`) and
    upload the package there (training.publish)."""
    name = parse_adapter_name(config.output_dir.name)
    task = TASKS[config.task]
    processes = _world_size()
    per_device_batch(config.train.batch_size, processes)  # refuse a bad split before loading anything
    source_id = config.data.source or DEFAULT_SOURCES[config.task]
    records = load_records(source_id, task.required_record_fields)
    train_records, held = split(records, config.data.eval_size, config.data.split_seed)
    if config.data.max_train_records:
        train_records = train_records[: config.data.max_train_records]

    if eval_only and publish is not None:
        # A package evaluated already: what publishing adds is the evaluation on the base as the
        # service loads it (the run's own figures in `metrics` stay as they are).
        evaluation = _evaluate_as_served(config, serve_quantization, held)
        return {
            "published": _publish(config.output_dir, evaluation, publish),
            "evaluation": evaluation.model_dump(exclude={"golden"}),
        }
    if eval_only:
        adapter = config.output_dir
        model, tokenizer, source, device = load_trained(config.model, adapter)
        manifest = AdapterManifest.read(config.output_dir)
        history = None
    else:
        base, tokenizer, source, device = load_base_for_training(
            config.model, gradient_checkpointing=config.train.gradient_checkpointing
        )
        manifest = draft_manifest(task, name, source)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hotswap-init-") as work:
            init = None
            if config.lora.init is not None:  # a warm start: the package's weights and shape
                init, shape = init_adapter(config.lora.init, source, config.lora, Path(work))
                config = dataclasses.replace(config, lora=shape)
            model, history = _train(config, base, tokenizer, manifest, task, train_records, held, device, resume, init)
        train_seconds = round(time.perf_counter() - started, 1)
        if not _process_state().is_main_process:
            # Under `accelerate launch`, rank 0 alone evaluates and writes the package. Leave the
            # process group first: exiting with it alive can abort ("terminate called without an
            # active exception") while rank 0 is still evaluating.
            _process_state().destroy_process_group()
            return {}
        if processes > 1 and device == "cpu":
            _take_all_cores()  # the other ranks have left; evaluation runs on rank 0 alone
        # Evaluate what ships: the adapter as saved, on a base loaded afresh the way --eval-only
        # and the service load it, not the training model object (the schema run's greedy
        # outputs differed between the two: docs/training.md).
        adapter = save_adapter(model, config.checkpoint_dir / "final")
        del model, base  # `base` is the same model (LoRA wraps it in place): free both names
        gc.collect()
        model, tokenizer, source, device = load_trained(config.model, adapter)

    evaluating = time.perf_counter()
    held_examples = tokenize_all(tokenizer, manifest, task, held, config.train.max_length)
    metrics = compare_losses(model, held_examples, tokenizer.pad_token_id)
    if config.task == "schema":
        shots = [task.to_example(r) for r in train_records[:2]]
        metrics.update(schema_rates(model, tokenizer, manifest, held, shots))
    metrics["eval_seconds"] = round(time.perf_counter() - evaluating, 1)

    training = (
        dict(manifest.training)
        if eval_only
        else {
            "recipe": f"{config.task} ({'QLoRA' if config.model.quantization == 'nf4' else 'LoRA'}, "
            f"{config.model.quantization} base)",
            "dataset": source_id,
            "dataset_sha256": sha256_of(source_id),
            "train_records": len(train_records),
            "eval_records": len(held),
            "split_seed": config.data.split_seed,
            "steps": config.train.max_steps,
            "hyperparameters": {"lora": asdict(config.lora), "train": asdict(config.train)},
            "base_quantization": config.model.quantization,
            "compute_dtype": config.model.compute_dtype,
            "attention": config.model.attention,
            "device": device,
            "processes": processes,
            "train_seconds": train_seconds,
            "libraries": library_versions(),
        }
    )
    if eval_only and config.model.quantization != training.get("base_quantization"):
        # Evaluating on another quantization of the base (e.g. the nf4 the service defaults
        # to): keep the run's own figures and add these beside them.
        metrics = {**manifest.metrics, f"on_{config.model.quantization}": metrics}
    write_package(manifest, config.output_dir, adapter=adapter, training=training, metrics=metrics, log_history=history)
    if publish is not None:
        del model
        gc.collect()
        evaluation = _evaluate_as_served(config, serve_quantization, held)
        metrics["published"] = _publish(config.output_dir, evaluation, publish)
        metrics["evaluation"] = evaluation.model_dump(exclude={"golden"})
    return metrics


def _evaluate_as_served(config: RunConfig, quantization: str, held: list[dict[str, Any]]) -> Any:
    """The evaluation record, on the base loaded by the service's own loader."""
    from peft import PeftModel

    from service.base_model import load_base
    from training.publish import evaluate

    base = load_base(
        config.model.base, quantization=quantization, device=config.model.device, cache_dir=config.model.cache_dir
    )
    model = PeftModel.from_pretrained(base.model, str(config.output_dir))
    manifest = AdapterManifest.read(config.output_dir)
    examples = tokenize_all(base.tokenizer, manifest, TASKS[config.task], held, config.train.max_length)
    return evaluate(model, base.tokenizer, manifest, config.task, held, examples, quantization)


def _publish(package: Path, evaluation: Any, dest: str) -> str:
    from training.publish import upload

    manifest = AdapterManifest.read(package)
    manifest.model_copy(update={"evaluation": evaluation}).write(package)
    return upload(package, dest)


def _train(config, base, tokenizer, manifest, task, train_records, held, device, resume, init=None):
    from transformers import set_seed

    from training.trainer import ResponseOnlyTrainer, loraplus_optimizer

    train_examples = tokenize_all(tokenizer, manifest, task, train_records, config.train.max_length)
    eval_examples = tokenize_all(tokenizer, manifest, task, held[:EVAL_DURING_TRAINING], config.train.max_length)
    # The Trainer seeds only once it is built; the adapter's initial A matrices are drawn before.
    set_seed(config.train.seed)
    model = add_lora(base, config.lora, init)
    args = _trainer_args(config, device, has_eval=bool(eval_examples))
    ratio = config.train.loraplus_ratio
    trainer = ResponseOnlyTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(train_examples),
        eval_dataset=_dataset(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        optimizers=(loraplus_optimizer(model, args, ratio) if ratio else None, None),
        tokens_per_step=_tokens_per_step(train_examples, config.train, _world_size())
        if config.train.loss_weighting == "token"
        else None,
    )
    if init is not None:  # trl's bf16 cast (undone by keep_adapter_fp32) rounded the package's weights
        load_lora_weights(trainer.model, init)
    checkpoint = _latest_checkpoint(config.checkpoint_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", config.checkpoint_dir)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return trainer.model, trainer.state.log_history


def per_device_batch(batch_size: int, processes: int) -> int:
    """`train.batch_size` counts the sequences of one forward pass over all processes, so a recipe
    trains on the same batches whatever the number of ranks; each rank takes an equal share."""
    if batch_size % processes:
        raise ValueError(
            f"train.batch_size ({batch_size}) must be a multiple of the number of processes ({processes}): "
            "it is the batch summed over all of them"
        )
    return batch_size // processes


def _tokens_per_step(examples: list[Example], t: TrainSettings, processes: int) -> float:
    """Expected labelled tokens of one optimiser step on one device (the first token is never a target)."""
    labelled = sum(sum(label != -100 for label in e.labels[1:]) for e in examples)
    return labelled / max(len(examples), 1) * per_device_batch(t.batch_size, processes) * t.grad_accum


def _take_all_cores() -> None:
    """torch.distributed.run starts each rank with one thread (OMP_NUM_THREADS=1)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))


def _world_size() -> int:
    """Processes in this run, as torch.distributed.run / accelerate launch announce them. (Before the
    Trainer sets up the process group, accelerate's PartialState reports one process on CPU.)"""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _process_state() -> Any:
    """accelerate's view of this process (rank, world size), also outside `accelerate launch`."""
    from accelerate import PartialState

    return PartialState()


def _latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return checkpoints[-1] if checkpoints else None
