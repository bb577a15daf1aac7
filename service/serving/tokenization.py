"""vLLM's tokenizer endpoints: `/tokenize`, `/detokenize` and `/tokenizer_info`.

Clients that count or build tokens themselves use them instead of downloading the tokenizer:
lm-evaluation-harness (`tokenizer_backend=remote`) reads `/tokenizer_info` for the special tokens
and the chat template, then encodes with `/tokenize` and decodes with `/detokenize`. Adapters
share the base's tokenizer, so `model` (optional, as in vLLM) only has to name a served model.
"""

from __future__ import annotations

from typing import Any

from service.errors import InvalidRequestError
from service.protocol_vllm import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.serving.chat import render_chat
from service.serving.context import ServingContext, resolve_target


class TokenizerServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def _check_model(self, model: str | None) -> None:
        if model is not None:
            resolve_target(model, None, self.ctx)  # 404 naming `model` when it is not served

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_model(request.model)
        tokenizer = self.ctx.tokenizer
        if request.prompt is not None:
            text, special = request.prompt, request.add_special_tokens is not False
        else:
            if not tokenizer.chat_template:
                raise InvalidRequestError("the model has no chat template; send `prompt`", param="messages")
            contents = [self.ctx.specials.escape(m.text) for m in request.messages]
            mode = "auto" if request.tools else None
            add = request.add_generation_prompt
            text = render_chat(self.ctx, request.messages, contents, request.tools, mode, add_generation_prompt=add)
            special = bool(request.add_special_tokens)  # the template wrote them already
        ids = tokenizer(text, add_special_tokens=special).input_ids
        strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.ctx.max_context, tokens=ids, token_strs=strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(request.model)
        vocabulary = len(self.ctx.tokenizer)
        for i, token in enumerate(request.tokens):
            if token >= vocabulary:
                raise InvalidRequestError(
                    f"tokens.{i}: {token} is not a token id of this model (vocabulary of {vocabulary})",
                    param=f"tokens.{i}",
                )
        return DetokenizeResponse(prompt=self.ctx.tokenizer.decode(request.tokens))

    def info(self) -> dict[str, Any]:
        """The tokenizer's configuration, as vLLM's `/tokenizer_info` gives it."""
        tokenizer = self.ctx.tokenizer
        special = {
            name: str(getattr(tokenizer, name)) if getattr(tokenizer, name, None) is not None else None
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return {
            "tokenizer_class": type(tokenizer).__name__,
            **special,
            "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
            "model_max_length": self.ctx.max_context,
            "vocab_size": len(tokenizer),
        }
