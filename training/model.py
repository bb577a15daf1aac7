"""The model under training: the service's base-model loader, plus LoRA on top."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from service.base_model import ModelSource, pick_device, quantization_kwargs, quiet_int8_cast_warning, resolve_source
from training.config import LoraSettings, ModelConfig
from training.qlora_cpu import keep_out_of_cpu_packed_path

log = logging.getLogger(__name__)

MAX_INIT_BYTES = 2 << 30  # the service's default MAX_ADAPTER_BYTES


def training_dtype(config: ModelConfig, device: str) -> Any:
    """The compute dtype for a training run: None keeps the service's rule for the device."""
    import torch

    if config.compute_dtype == "bf16":
        return torch.bfloat16
    if config.compute_dtype == "fp32":
        return torch.float32
    return None


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    targets: Any = settings.targets
    if targets == ["all-linear"]:
        targets = "all-linear"  # PEFT: every linear layer except the output head
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_rslora=settings.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_base_for_training(config: ModelConfig, *, gradient_checkpointing: bool = False):
    """Load the base exactly as the service does (same source, fingerprint, quantization)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source: ModelSource = resolve_source(config.base, config.cache_dir)
    device = pick_device(config.device)
    quiet_int8_cast_warning()
    attention = {} if config.attention == "auto" else {"attn_implementation": config.attention}
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        device_map={"": device},
        trust_remote_code=False,
        **attention,
        **quantization_kwargs(config.quantization, device, training_dtype(config, device)),
    )
    if config.quantization in ("nf4", "int8"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    keep_out_of_cpu_packed_path(model)
    tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source, device


def add_lora(model: Any, settings: LoraSettings, init: Path | None = None) -> Any:
    """Fresh LoRA weights on `model` (B zero), or with `init` the package's, trainable (the run's
    dropout applies; its shape is the package's, see `init_adapter`)."""
    from peft import LoraConfig, get_peft_model

    if init is None:
        return get_peft_model(model, lora_config(settings))
    config = LoraConfig.from_pretrained(str(init))
    config.lora_dropout = settings.dropout
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    load_lora_weights(peft_model, init)
    return peft_model


def load_lora_weights(peft_model: Any, init: Path) -> None:
    """The package's LoRA weights, exactly, into `peft_model`'s (fp32) ones. Not through
    PeftModel.from_pretrained, which loads them into LoRA layers of the base's dtype first (bf16
    on a 4-bit base), rounding each by up to 2^-8 of itself; the trainer calls this again after
    trl's SFTTrainer has cast the trainable weights to bf16 and back (`keep_adapter_fp32`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(init / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"--init-adapter {init}: its weights do not fit its adapter_config.json: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


def init_adapter(spec: str, source: ModelSource, settings: LoraSettings, work: Path) -> tuple[Path, LoraSettings]:
    """The package `spec` names (--init-adapter: a directory, hf://, s3://, gs://), fetched into
    `work` when remote and checked like a load (the package contract, this base's fingerprint);
    and the run's LoRA settings with the package's shape, so the run records what it trains.

    Raises SourceError naming the flag when the package cannot be read or is not for this base."""
    from service.adapters import sources
    from service.adapters.package import AdapterRejected, validate_package

    try:
        where = sources.parse_source(spec)
        path = Path(where.location)
        if where.remote:
            path = work / "init-adapter"
            path.mkdir(parents=True)
            sources.fetch(where, path, max_bytes=MAX_INIT_BYTES)
        # named: the package's own name does not matter here (the run's output is named by its
        # directory), as a load through the API may serve a package under another name
        validate_package(path, base_fingerprint=source.fingerprint, base_id=source.served_id, name="init")
    except (sources.SourceError, AdapterRejected, OSError) as exc:
        raise sources.SourceError(f"--init-adapter {spec}: {exc}") from exc
    peft = json.loads((path / sources.CONFIG_FILE).read_text("utf-8"))
    targets = peft["target_modules"]
    shape = dataclasses.replace(
        settings,
        r=int(peft["r"]),
        alpha=int(peft["lora_alpha"]),
        targets=sorted(targets) if isinstance(targets, list) else [targets],
        rslora=bool(peft.get("use_rslora", False)),
    )
    if shape != settings:
        log.info(
            "--init-adapter: the package's LoRA shape (r %d, alpha %d, targets %s, rsLoRA %s) replaces the recipe's",
            shape.r,
            shape.alpha,
            shape.targets,
            shape.rslora,
        )
    return path, shape


def load_trained(config: ModelConfig, adapter_dir: Any) -> tuple[Any, Any, ModelSource, str]:
    """Base plus an existing adapter package, for --eval-only."""
    from peft import PeftModel

    model, tokenizer, source, device = load_base_for_training(config)
    return PeftModel.from_pretrained(model, str(adapter_dir)), tokenizer, source, device
