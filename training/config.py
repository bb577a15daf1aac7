"""Training configuration: one dataclass per concern; preset -> YAML file -> command-line flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from service.settings import DEFAULT_MODEL
from training.presets import preset

# The allowed values of the constrained settings, one source for the dataclasses, the command
# line's choices and validate() (a YAML file bypasses argparse).
Quantization = Literal["nf4", "int8", "bf16", "fp32"]
Attention = Literal["auto", "sdpa", "eager"]
LossWeighting = Literal["batch", "token"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)


@dataclass
class DataConfig:
    source: str | None = None  # hub id or local JSONL; None: the task's default
    eval_size: int = 200  # held-out records (seeded split), never trained on
    max_train_records: int | None = None
    split_seed: int = 0


@dataclass
class ModelConfig:
    base: str = DEFAULT_MODEL
    quantization: Quantization = "nf4"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Compute dtype of the quantized layers: "auto" is the service's rule (bf16 on GPU, fp32 on
    # CPU); "bf16" on a CPU with AVX512-BF16 trains about 1.7x faster (docs/training.md).
    compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # Attention kernel for training: "auto" is transformers' choice (SDPA). "eager" was faster on
    # single CPU batches but not inside a real run here (docs/training.md). Serving is unaffected.
    attention: Attention = "auto"
    cache_dir: Path = Path("~/.cache/hotswap")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    rslora: bool = False  # rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r
    # Start from this package's LoRA weights instead of PEFT's fresh ones (--init-adapter): a
    # directory, hf://, s3:// or gs://. Its shape (r, alpha, targets, rsLoRA) replaces the above.
    init: str | None = None


@dataclass
class TrainSettings:
    max_steps: int = 100
    batch_size: int = 8  # sequences per forward pass, summed over all processes (see per_device_batch)
    grad_accum: int = 1
    learning_rate: float = 2e-4
    scheduler: str = "cosine"
    # The schedule's own arguments (transformers' `lr_scheduler_kwargs`), e.g. for
    # warmup_stable_decay: {num_decay_steps: 60, min_lr_ratio: 0.1}.
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 10
    max_length: int = 384
    max_grad_norm: float = 1.0
    optimizer: str = "adamw_torch"
    loraplus_ratio: float | None = None  # LoRA+: B's learning rate over A's (None: plain LoRA)
    neftune_alpha: float | None = None  # NEFTune: uniform noise on the input embeddings while training
    # "batch": each batch's loss is the mean over its own labelled tokens, so every batch weighs
    # the same (transformers' rule). "token": every labelled token of the run weighs the same: a
    # batch's summed loss is divided by the training set's mean labelled tokens per batch. With
    # length-grouped batches the difference is large (docs/training.md).
    loss_weighting: LossWeighting = "batch"
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 50
    eval_steps: int | None = None  # held-out loss during training every N steps (None: save_steps)
    tensorboard: bool = False


@dataclass
class RunConfig:
    task: Literal["dolly", "schema"]
    output_dir: Path
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir.parent / f".{self.output_dir.name}-checkpoints"


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "lora": LoraSettings, "train": TrainSettings}


def merge(target: dict[str, dict[str, Any]], layer: dict[str, Any], origin: str) -> None:
    """Fold one layer of {section: {key: value}} into `target`, refusing unknown keys."""
    for section, values in layer.items():
        if section not in _SECTIONS:
            raise ValueError(f"{origin}: unknown section {section!r}; known: {sorted(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: section {section!r} must be a mapping")
        known = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"{origin}: unknown key {section}.{key}; known: {sorted(known)}")
            target.setdefault(section, {})[key] = value


def build_config(
    task: str,
    output_dir: Path,
    *,
    preset_name: str = "default",
    config_file: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> RunConfig:
    layers: dict[str, dict[str, Any]] = {}
    merge(layers, preset(preset_name, task), f"preset {preset_name}")
    if config_file is not None:
        doc = yaml.safe_load(config_file.read_text("utf-8")) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{config_file}: expected a mapping of sections")
        merge(layers, doc, str(config_file))
    merge(layers, overrides or {}, "command line")
    sections = {name: cls(**layers.get(name, {})) for name, cls in _SECTIONS.items()}
    sections["model"].cache_dir = Path(sections["model"].cache_dir).expanduser()
    config = RunConfig(task=task, output_dir=output_dir, **sections)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    t, lora = config.train, config.lora
    checks = [
        (t.max_steps > 0, "train.max_steps must be positive"),
        (t.batch_size > 0 and t.grad_accum > 0, "train.batch_size and grad_accum must be positive"),
        (t.learning_rate > 0, "train.learning_rate must be positive"),
        (t.save_steps > 0, "train.save_steps must be positive"),
        (t.eval_steps is None or t.eval_steps > 0, "train.eval_steps must be positive"),
        (t.max_length >= 32, "train.max_length must be at least 32"),
        (lora.r > 0 and lora.alpha > 0, "lora.r and lora.alpha must be positive"),
        (0 <= lora.dropout < 1, "lora.dropout must lie in [0, 1)"),
        (bool(lora.targets), "lora.targets must name at least one module"),
        (
            lora.init is None or (isinstance(lora.init, str) and bool(lora.init.strip())),
            "lora.init must name a package (a directory, hf://, s3:// or gs://)",
        ),
        (config.data.eval_size > 0, "data.eval_size must be positive"),
        (config.model.quantization in QUANTIZATIONS, "unknown model.quantization"),
        (config.model.attention in ATTENTIONS, "model.attention must be auto, sdpa or eager"),
        (t.loss_weighting in LOSS_WEIGHTINGS, "train.loss_weighting must be 'batch' or 'token'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_schedule(t)


def check_schedule(t: TrainSettings) -> None:
    """Build the schedule once on a throwaway optimizer, so an unknown name or a missing or wrong
    argument fails here, naming the setting, rather than after the model has loaded."""
    import torch
    from transformers import get_scheduler

    if not isinstance(t.scheduler_kwargs, dict):
        raise ValueError("train.scheduler_kwargs must be a mapping of the schedule's arguments")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    try:
        get_scheduler(
            t.scheduler,
            optimizer,
            num_warmup_steps=t.warmup_steps,
            num_training_steps=t.max_steps,
            scheduler_specific_kwargs=t.scheduler_kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"train.scheduler {t.scheduler!r} with train.scheduler_kwargs {t.scheduler_kwargs}: {exc}"
        ) from None
