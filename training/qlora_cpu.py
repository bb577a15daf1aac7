"""Keeps 4-bit layers trainable on CPU (bitsandbytes >= 0.49 on CPUs with AVX512-BF16).

`bnb.nn.Linear4bit.forward` repacks its weight into a CPU inference layout the first time it
runs in eval mode on such a CPU (`_convert_weight_packed_for_cpu`), and from then on every
matmul goes through `gemv_4bit`, which has no autograd: LoRA gradients become silently wrong and
the loss barely moves. Evaluating the base before training, or sampling during training, is
enough to trigger it. We switch the repacking off for every 4-bit layer of a training model and
undo it where it already happened. Serving keeps the packed layout: it is the fast inference
path there.
"""

from __future__ import annotations

from typing import Any


def keep_out_of_cpu_packed_path(model: Any) -> int:
    """Disable CPU weight repacking on every Linear4bit of `model`; return how many were unpacked."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    unpacked = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            unpacked += 1
    return unpacked
