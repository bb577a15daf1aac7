"""The CPU QLoRA trap: after one eval-mode forward, 4-bit layers must still train correctly."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from training.qlora_cpu import keep_out_of_cpu_packed_path

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 250, 31, 8]] * 2)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def nf4_model(path):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
    )


def eval_forward(model):
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    model.train()


def packed_layers(model) -> int:
    return sum(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def dequantized_reference(quantized, path):
    """An fp32 model whose linear weights are exactly the nf4 weights, dequantized."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                modules[name].weight.copy_(dequantize_4bit(m.weight.data, m.weight.quant_state).float())
    return ref


def lora_grads(base, lora_state=None):
    torch.manual_seed(0)
    model = get_peft_model(base, LORA)
    if lora_state is not None:
        model.load_state_dict(lora_state, strict=False)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    # A packed layer's matmul has no autograd: gradients upstream of it come back as None.
    grads = {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return grads, state


def relative_error(grads, reference) -> float:
    return max(float((grads[n] - reference[n]).norm() / reference[n].norm()) for n in reference)


def cpu_packs(tiny) -> bool:
    model = nf4_model(tiny.base_dir)
    eval_forward(model)
    return packed_layers(model) > 0


def test_guard_unpacks_and_gradients_match_a_dequantized_reference(tiny):
    model = nf4_model(tiny.base_dir)
    eval_forward(model)  # would repack every 4-bit weight on an AVX512-BF16 CPU
    keep_out_of_cpu_packed_path(model)
    assert packed_layers(model) == 0
    eval_forward(model)  # and later eval forwards (sampling during training) cannot repack
    assert packed_layers(model) == 0
    reference = dequantized_reference(model, tiny.base_dir)
    grads, state = lora_grads(model)
    ref_grads, _ = lora_grads(reference, state)
    assert relative_error(grads, ref_grads) < 0.02


def test_without_the_guard_gradients_are_wrong(tiny):
    """The control: shows the reference comparison above can fail, on CPUs that pack."""
    if not cpu_packs(tiny):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model = nf4_model(tiny.base_dir)
    reference = dequantized_reference(model, tiny.base_dir)
    eval_forward(model)
    grads, state = lora_grads(model)
    ref_grads, _ = lora_grads(reference, state)
    assert relative_error(grads, ref_grads) > 0.2
