"""Tiny real models for tests: a byte-level BPE tokenizer, a random Llama, random LoRA adapters.

Everything is built from a config in a few lines, on disk in a temporary directory, so tests
exercise the same local-directory loading path as production, with no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Write a short marketing email about a product, with a subject and a call to action.",
    "Instruction: summarize the context. Context: LoRA adapters are small. Response: they are.",
    "Numbers 0123456789, prices $19.99, dates 2024-01-31, émigré café naïve, 東京 😀 ✓",
    '{"subject": "New", "body": "Hello there", "call_to_action": "Buy now"}',
]


def make_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def make_tiny_llama(directory: Path, *, seed: int = 0, vocab_size: int | None = None, positions: int = 256) -> Path:
    """A 2-layer random Llama with its tokenizer, saved as a local HF checkpoint (`positions`:
    its context)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Sharper logits than the default init, so greedy paths differ visibly between adapters.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory


# Tiny configs of real decoder classes (2 layers, hidden 64), one per family PEFT can put LoRA on:
# rotary and learned and ALiBi positions, grouped-query, multi-query and fused-QKV attention,
# Conv1D projections (GPT-2), sliding-window and soft-capped layers (Gemma2).
_SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**_SMALL, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {**_SMALL, "num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**_SMALL, "num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {**_SMALL, "num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**_SMALL, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 16}),
    # A window as long as the context never slides (Mistral-7B-v0.1 with MAX_MODEL_LEN <= 4096):
    # full attention, served as such
    "mistral_window": ("MistralConfig", {**_SMALL, "num_key_value_heads": 2, "sliding_window": 256}),
    "gemma2_window": ("Gemma2Config", {**_SMALL, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 256}),
    "phi3": ("Phi3Config", {**_SMALL, "num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", {**_SMALL}),
    "bloom": ("BloomConfig", {"hidden_size": 64, "n_layer": 2, "n_head": 4}),
    "falcon": ("FalconConfig", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}),
    "falcon_alibi": (
        "FalconConfig",
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "alibi": True,
            "multi_query": False,
            "parallel_attn": False,
            "bias": True,
        },
    ),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "opt": (
        "OPTConfig",
        {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 256,
        },
    ),
}


def make_tiny_family(family: str, directory: Path, *, seed: int = 0) -> Path:
    """A random 2-layer model of `family` (a key of FAMILIES) with the tiny tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(directory)
    config_class, fields = FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper logits than the default init, as make_tiny_llama
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    fingerprint: str,
    base_id: str = "tiny",
    seed: int = 1,
    manifest: dict | None = None,
    rank: int = 4,
    targets: tuple[str, ...] | str = ("q_proj", "v_proj", "o_proj"),
    **lora: Any,
) -> Path:
    """A random LoRA (both A and B random, so it changes outputs) plus its hotswap.json; `lora`
    adds LoraConfig arguments (use_dora=True, ...); `targets="all-linear"` as PEFT means it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=16,
        target_modules=targets if isinstance(targets, str) else list(targets),
        init_lora_weights=False,
        **lora,
    )
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)
    doc = {
        "name": out_dir.name,
        "description": f"random test adapter (seed {seed})",
        "base_model": {"id": base_id, "fingerprint": fingerprint},
        "prompt_template": (
            "Instruction: {{ instruction }}\n{% if context %}Context: {{ context }}\n{% endif %}Response:"
        ),
        "input_fields": [
            {"name": "instruction", "required": True},
            {"name": "context", "required": False},
        ],
        "output": {"format": "text", "stop": ["\n\n"]},
    }
    doc.update(manifest or {})
    (out_dir / "hotswap.json").write_text(json.dumps(doc, indent=2))
    return out_dir


def preload_adapters(runtime, names=("alpha", "beta")):
    """Attach adapters to the base as PEFT adapters under their own names, and serve them so
    (no residency: requests name PEFT adapters directly), for comparisons with PEFT's own
    `generate`. The service's slots are tested through `serve_through_slots`."""
    model = runtime.residency.model
    for name in names:
        model = runtime.registry.load(model, name)
    runtime.engine.runner.lora.model = model
    runtime.engine.residency = None
    return runtime


def serve_through_slots(runtime, names=("alpha", "beta")):
    """Load adapters into the runtime's device slots now (as PRELOAD_ADAPTERS does); returns
    name -> the slot's PEFT adapter name, for references."""
    from service.runtime import preload

    preload(runtime.residency, [], list(names))
    return {name: runtime.residency.slot(name) for name in names}


def make_residency(tiny, cache_dir, tmp_path, max_resident: int, *, quantization: str = "fp32", **options):
    """An AdapterResidency over the tiny base (fp32 unless said) and a copy of its adapters
    (tests may edit them); `options` go to AdapterResidency (max_host, loader, callbacks)."""
    import shutil

    from service.adapters.registry import AdapterRegistry
    from service.base_model import load_base
    from service.engine.residency import AdapterResidency

    adapters = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, adapters)
    base = load_base(str(tiny.base_dir), quantization=quantization, device="cpu", cache_dir=cache_dir)
    registry = AdapterRegistry(adapters, base_id="tiny", base_fingerprint=tiny.fingerprint)
    registry.scan()
    return AdapterResidency(registry, base.model, max_resident, **options)


def tiny_config(**config):
    """An EngineConfig for tiny tests: 4 rows, 256 positions, no EOS; `config` overrides."""
    from service.engine.config import EngineConfig

    return EngineConfig(**{"max_context": 256, "max_batch_size": 4, **config})


def batched_engine(residency, *, prefix_cache=None, on_stats=None, **config):
    """A BatchedEngine over a residency's model (`tiny_config`; `config`: kv_cache,
    max_prefill_tokens...); `on_stats` gets each iteration's EngineStats."""
    from service.engine.batched import BatchedEngine
    from service.engine.runner import ModelRunner

    runner = ModelRunner(residency.lora, "cpu")
    return BatchedEngine(
        runner, tiny_config(**config), residency=residency, prefix_cache=prefix_cache, on_stats=on_stats
    )


def make_engine(runner, cls=None, kv=None, *, on_stats=None, **config):
    """An engine over `runner` (`tiny_config`, but 16 rows); `kv`: "dynamic", "static", or
    "graphs" (the static cache with the CUDA-graph path's buckets, replayed eagerly on CPU)."""
    from service.engine.batched import BatchedEngine

    if kv is not None:
        config["kv_cache"] = "static" if kv == "graphs" else kv
    engine = (cls or BatchedEngine)(runner, tiny_config(**{"max_batch_size": 16, **config}), on_stats=on_stats)
    if kv == "graphs":
        engine.kv_cache.graphs = True
    return engine


def run_engine(engine, body, timeout: float = 300):
    """Start `engine`, await `body(engine)`, stop it; returns what `body` returned. A body still
    waiting after `timeout` seconds fails (an engine that lost a request would hang it)."""
    import asyncio

    async def main():
        await engine.start()
        try:
            return await asyncio.wait_for(body(engine), timeout)
        finally:
            await engine.stop()

    return asyncio.run(main())


def make_client(tiny, tokenizer, *, engine=None, **settings):
    """A TestClient over the app with the tiny world's adapters and `engine` (a ScriptedEngine
    by default); returns (client, engine)."""
    from fastapi.testclient import TestClient

    from service.adapters.registry import AdapterRegistry
    from service.app import build_app
    from service.runtime import Runtime
    from service.settings import Settings
    from tests.service.fakes import ScriptedEngine

    registry = AdapterRegistry(
        tiny.adapter_dir,
        base_id="tiny",
        base_fingerprint=tiny.fingerprint,
        allowed_sources=settings.get("adapter_sources", ()),
    )
    registry.scan()
    engine = engine or ScriptedEngine(tokenizer)
    runtime = Runtime(engine, tokenizer, registry, "tiny", max_context=64)
    return TestClient(build_app(Settings(**settings), runtime=runtime)), engine


def tiny_settings(tiny, cache_dir, **overrides):
    """Settings that serve the tiny fp32 Llama and its adapters on the CPU; `overrides` win."""
    from service.settings import Settings

    fields = {
        "model": str(tiny.base_dir),
        "quantization": "fp32",
        "device": "cpu",
        "adapter_dir": tiny.adapter_dir,
        "cache_dir": cache_dir,
    }
    return Settings(**{**fields, **overrides})


def emulate_bf16_kernel(monkeypatch) -> None:
    """bitsandbytes' 4-bit matmul as CPUs with AVX512-BF16 or AMX run it, on any CPU.

    There bitsandbytes repacks each 4-bit weight at its first eval-mode forward and its fused
    kernel (backends/cpu/ops.py, gemv_4bit) takes bf16 activations and returns bf16; each row's
    result is the same whatever the row count (measured on such a CPU). Here the repack is off
    and the product is computed in float64 from the dequantized weight, so the row count cannot
    change its rounding either; the bf16 roundings in and out are the kernel's."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules

    def matmul_4bit(A, B, quant_state, out=None, bias=None):
        weight = bnb_functional.dequantize_4bit(B, quant_state).double()
        result = A.to(torch.bfloat16).double() @ weight.t()
        if bias is not None:
            result = result + bias.double()
        return result.to(torch.bfloat16).to(A.dtype)

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", lambda weight, state, *a, **k: (weight, state))
    monkeypatch.setattr(bnb, "matmul_4bit", matmul_4bit)
