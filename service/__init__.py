"""hotswap: one quantized base LLM, many LoRA adapters hot-swapped per request, OpenAI API."""

__version__ = "0.1.0"
