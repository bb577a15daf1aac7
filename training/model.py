"""The model under training: the service's base-model loader, plus LoRA on top."""

from __future__ import annotations

from typing import Any

from service.base_model import ModelSource, pick_device, quantization_kwargs, quiet_int8_cast_warning, resolve_source
from training.config import LoraSettings, ModelConfig
from training.qlora_cpu import keep_out_of_cpu_packed_path


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


def add_lora(model: Any, settings: LoraSettings) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings))


def load_trained(config: ModelConfig, adapter_dir: Any) -> tuple[Any, Any, ModelSource, str]:
    """Base plus an existing adapter package, for --eval-only."""
    from peft import PeftModel

    model, tokenizer, source, device = load_base_for_training(config)
    return PeftModel.from_pretrained(model, str(adapter_dir)), tokenizer, source, device
