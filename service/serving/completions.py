"""`POST /v1/completions`: prompts (text, token ids, or adapter `input`) to completions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from service.engine import TokenLogprob
from service.errors import InvalidRequestError
from service.protocol import CompletionRequest
from service.protocol_objects import CompletionChoice, CompletionLogprobs, CompletionResponse
from service.serving.context import Target, check_token_ids
from service.serving.generation import ChoiceEvent, guard_request
from service.serving.response import EndpointServing, Prompts, ResponseRun


class LogprobsBuilder:
    """Accumulates OpenAI's completion `logprobs` object (tokens, logprobs, tops, offsets).

    Token texts come from `texts` (ServingContext.token_texts: cached, decoded in batches): echo
    with logprobs of 64 prompts of 8K tokens was millions of one-token decodes on the event
    loop (security review M1)."""

    def __init__(self, texts: Callable[[list[int]], list[str]]):
        self.texts = texts
        self.value = CompletionLogprobs()
        self._offset = 0

    def add(self, token_ids: list[int], entries: Sequence[TokenLogprob | None]) -> None:
        tops = [i for entry in entries if entry is not None for i, _ in entry.top]
        texts = self.texts(list(token_ids) + tops)
        top_texts = iter(texts[len(token_ids) :])
        for text, entry in zip(texts, entries, strict=False):
            self.value.tokens.append(text)
            self.value.text_offset.append(self._offset)
            self._offset += len(text)
            if entry is None:
                self.value.token_logprobs.append(None)
                self.value.top_logprobs.append(None)
                continue
            self.value.token_logprobs.append(entry.logprob)
            self.value.top_logprobs.append({next(top_texts): lp for _, lp in entry.top})

    def take(self) -> CompletionLogprobs:
        """Return what was added since the last call (the streaming delta)."""
        value, self.value = self.value, CompletionLogprobs()
        return value


class _CompletionRun(ResponseRun):
    id_prefix = "cmpl"
    response_type = CompletionResponse
    chunk_type = CompletionResponse

    def __init__(self, *args):
        super().__init__(*args)
        self.builders = {s.index: LogprobsBuilder(self.ctx.token_texts) for s in self.specs}
        self.by_index = {s.index: s for s in self.specs}
        self.started: set[int] = set()

    def _apply(self, event: ChoiceEvent) -> CompletionChoice:
        """Turn one event into a choice (delta), echoing the prompt on the choice's first event."""
        spec = self.by_index[event.index]
        text = event.text
        builder = self.builders[event.index]
        if event.index not in self.started:
            self.started.add(event.index)
            if self.request.echo:
                text = self.ctx.tokenizer.decode(spec.prompt_ids, skip_special_tokens=True) + text
                if self.request.logprobs is not None:
                    builder.add(list(spec.prompt_ids), event.prompt_logprobs or (None,) * len(spec.prompt_ids))
        builder.add([entry.token_id for entry in event.logprobs], event.logprobs)
        logprobs = builder.take() if self.request.logprobs is not None else None
        return CompletionChoice(index=event.index, text=text, logprobs=logprobs, finish_reason=event.finish_reason)

    def choice(self, index: int, events: list[ChoiceEvent]) -> CompletionChoice:
        return _join([self._apply(event) for event in events])

    def delta(self, event: ChoiceEvent) -> tuple[CompletionChoice, bool]:
        choice = self._apply(event)
        return choice, bool(choice.text or choice.finish_reason or (choice.logprobs and choice.logprobs.tokens))


class CompletionServing(EndpointServing):
    run_type = _CompletionRun

    def prompts(self, request: CompletionRequest, target: Target) -> Prompts:
        """Token ids of each prompt, after the pre hooks, and what the hooks did."""
        tokenizer = self.ctx.tokenizer
        ids: list[list[int]] | None = None
        if request.input is not None:
            if target.manifest is None:
                raise InvalidRequestError(
                    "`input` needs an adapter with a prompt template; the base takes `prompt`",
                    param="input",
                )
            texts = [target.manifest.render_prompt(self.ctx.specials.escape_values(request.input))]
        elif isinstance(request.prompt, str):
            texts = [request.prompt]
        elif isinstance(request.prompt[0], str):
            texts = list(request.prompt)
        else:
            ids = [list(request.prompt)] if isinstance(request.prompt[0], int) else [list(p) for p in request.prompt]
            for p in ids:  # before anything decodes them: out-of-range ids overflow the tokenizer
                check_token_ids(p, self.ctx, param="prompt")
            texts = [tokenizer.decode(p) for p in ids] if self.ctx.guardrails.chain(target.label).pre else []
        param = "input" if request.input is not None else "prompt"
        params = request.model_dump(exclude={"prompt", "input"}, exclude_none=True)
        guarded, actions = guard_request(self.ctx, target, "completions", prompts=texts, params=params, param=param)
        if ids is not None and guarded.prompts == tuple(texts):
            return Prompts(ids, actions, param)  # token ids the hooks left alone go to the model as they came
        return Prompts([tokenizer(text).input_ids for text in guarded.prompts], actions, param)


def _join(parts: list[CompletionChoice]) -> CompletionChoice:
    """Concatenate the deltas of one choice (text offsets are already absolute)."""
    logprobs = None
    if parts[0].logprobs is not None:
        logprobs = CompletionLogprobs()
        for part in parts:
            logprobs.tokens += part.logprobs.tokens
            logprobs.token_logprobs += part.logprobs.token_logprobs
            logprobs.top_logprobs += part.logprobs.top_logprobs
            logprobs.text_offset += part.logprobs.text_offset
    return CompletionChoice(
        index=parts[-1].index,
        text="".join(p.text for p in parts),
        logprobs=logprobs,
        finish_reason=parts[-1].finish_reason,
    )
