"""Constrained decoding: grammars that mask each row's logits to the tokens they allow.

The engine is llguidance (docs/structured-outputs.md has the measurement that chose it over
xgrammar: it compiles a new JSON schema in about 1 ms, lazily, where xgrammar takes 5-9 ms, and
its mask costs 12-17 us a token, nothing next to a decode step). Three objects:

- `GrammarCompiler`, one per tokenizer (serving owns it): turns a JSON schema, or "any JSON
  object", into a `Grammar`, in a worker thread (llguidance builds the first matcher with the
  GIL dropped), and caches grammars by their canonical schema text.
- `Grammar`: compiled and immutable, shared by every request with the same schema; it travels
  to the engine in `SamplingParams.grammar`.
- `GrammarMatcher`: one per generated sequence, made on the engine thread by copying the
  grammar's template matcher: `mask` the row's logits, `accept` the sampled token, and
  `finished` once the grammar is complete (the row then ends with finish_reason "stop").

The engine sees only the last two (the `Grammar` protocol in service.engine): no HTTP, no schema.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

JSON_OBJECT = {"type": "object"}  # response_format json_object: any JSON object, as OpenAI's
# json.dumps' separators and no other whitespace: llguidance's default lets whitespace run free,
# and a model can fill its whole budget with it (a random one did, in the tests).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SHIFTS = torch.arange(32, dtype=torch.int32)


_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its `properties`
    and says nothing of others (xgrammar's strict mode, vLLM's default). JSON Schema would
    allow any extra key there, and a small model given that freedom keeps adding keys until its
    budget runs out (seen with instructor's schemas, which leave the keyword out). A schema that
    allows extra keys says so, and keeps them."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {
        key: {name: closed_objects(sub) for name, sub in value.items()}
        if key in _SCHEMA_MAPS and isinstance(value, dict)
        else closed_objects(value)
        for key, value in schema.items()
    }
    if isinstance(closed.get("properties"), dict) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile (the message is the library's reason)."""


COMPILE_THREADS = 2  # grammar compiles at once (GrammarCompiler.compile)
MAX_SCHEMA_DEPTH = 64  # nesting of a schema's objects and arrays
MAX_SCHEMA_BYTES = 65_536  # its canonical JSON (security review L1, L2)


def schema_key(schema: Any) -> str:
    """The schema's canonical JSON (the grammar cache's key), once its nesting and size are
    known to be within bounds: a schema nested 600 deep made the recursive walks below a 500,
    and a 4 MB one was a 4 MB cache key. Walked iteratively; GrammarError past a bound."""
    stack = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(key) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is {len(key)} bytes of JSON; at most {MAX_SCHEMA_BYTES}")
    return key


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, vocabulary: int):
        self._matcher = matcher
        self._vocabulary = vocabulary
        self._bitmask = None
        self._ready = False  # the bitmask holds the mask of the current position

    def prefetch(self) -> None:
        """Compute the next mask now (llguidance drops the GIL: the engine calls this on another
        thread while the forward pass runs, so `mask` finds it ready)."""
        import llguidance.torch as llg_torch

        if self._bitmask is None:
            self._bitmask = llg_torch.allocate_token_bitmask(1, self._vocabulary)
        llg_torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        self._ready = True

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the 1-D `logits` with every token the grammar forbids at -inf."""
        if not self._ready:
            self.prefetch()
        # Unpacked here: llguidance's own apply is a torch.compile kernel, which would compile
        # (seconds, and a C compiler) on the first request of every process.
        allowed = ((self._bitmask[0].unsqueeze(1) >> _SHIFTS) & 1).flatten()[: self._vocabulary]
        masked = logits.float().clone()
        masked[: self._vocabulary].masked_fill_(allowed.to(masked.device) == 0, float("-inf"))
        masked[self._vocabulary :] = float("-inf")  # ids past the tokenizer's words are no text
        return masked

    def accept(self, token: int) -> None:
        self._ready = False
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow."""
        return self._matcher.is_stopped()


class Grammar:
    """A compiled grammar (immutable, shared): `matcher()` starts a sequence in it."""

    def __init__(self, key: str, template: Any, vocabulary: int):
        self.key = key
        self._template = template
        self._vocabulary = vocabulary
        self._lock = threading.Lock()

    def matcher(self) -> GrammarMatcher:
        with self._lock:  # deep_copy of one template from the engine thread and from serving
            return GrammarMatcher(self._template.deep_copy(), self._vocabulary)

    def __repr__(self) -> str:
        return f"Grammar({self.key[:60]!r})"


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        cache_size: int = 256,
        on_compile: Callable[[float], None] = lambda seconds: None,
        on_cache: Callable[[bool], None] = lambda hit: None,
    ):
        self._hf_tokenizer = tokenizer
        self._tokenizer = None  # llguidance's, built on first use (about 0.5 s for 49k words)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache (held only briefly: the event loop takes it)
        self._tokenizer_lock = threading.Lock()  # building the llguidance tokenizer (0.5 s)
        self._on_compile, self._on_cache = on_compile, on_cache
        self._executor = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="hotswap-grammar-compile")

    async def compile(self, schema: dict[str, Any]) -> Grammar:
        """The grammar of JSON values valid under `schema`, compiled off the event loop."""
        key = schema_key(schema)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        self._on_cache(cached is not None)
        if cached is not None:
            return cached
        # Compiles run on their own two threads: in the default pool they competed with adapter
        # loads and rescans, and many distinct schemas could take all of it (review L1).
        grammar = await asyncio.get_running_loop().run_in_executor(self._executor, self._build, key, schema)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def compile_now(self, schema: dict[str, Any]) -> Grammar:
        """`compile` on the calling thread (training's evaluation, tests)."""
        return self._build(schema_key(schema), schema)

    def _llg_tokenizer(self):
        import llguidance.hf

        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
            return self._tokenizer

    def _build(self, key: str, schema: dict[str, Any]) -> Grammar:
        import llguidance

        started = time.perf_counter()
        tokenizer = self._llg_tokenizer()
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=_JSON_STYLE)
        except ValueError as exc:
            raise GrammarError(str(exc)) from exc
        error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        if error:
            raise GrammarError(error)
        template = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        self._on_compile(time.perf_counter() - started)
        return Grammar(key, template, tokenizer.vocab_size)
