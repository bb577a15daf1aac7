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
MAX_GRAMMAR_BYTES = 262_144  # a lark grammar's text (a request's tools, each schema within the above)


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
    """One sequence's position in its grammar, and the budget it must close in.

    The engine calls `mask` (the row's logits), samples, asks `within_budget` which token to
    take, and `accept`s it. `within_budget` is where a structure is closed before the row's
    budget runs out (docs/structured-outputs.md, "Closing within the budget").
    """

    def __init__(self, matcher: Any, vocabulary: int, closer: Closer | None = None):
        self._matcher = matcher
        self._vocabulary = vocabulary
        self._bitmask = None
        self._ready = False  # the bitmask holds the mask of the current position
        self._closer = closer
        self._forced: list[int] = []  # the rest of a closing under way, in order
        self._closing = False  # a closing was forced: the row ends once the grammar accepts
        self._need: int | None = None  # tokens the current state needs to close, when known
        self._peak = 0  # the most any measured state needed: what one token may open again
        self._since = 0  # tokens since `_need` was measured

    def prefetch(self) -> None:
        """Compute the next mask now (llguidance drops the GIL: the engine calls this on another
        thread while the forward pass runs, so `mask` finds it ready)."""
        import llguidance.torch as llg_torch

        if self._forced:
            return
        if self._bitmask is None:
            self._bitmask = llg_torch.allocate_token_bitmask(1, self._vocabulary)
        llg_torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        self._ready = True

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the 1-D `logits` with every token the grammar forbids at -inf."""
        if self._forced:  # closing: one token is possible
            masked = torch.full_like(logits, float("-inf"), dtype=torch.float32)
            masked[self._forced[0]] = logits[self._forced[0]].float()
            return masked
        if not self._ready:
            self.prefetch()
        # Unpacked here: llguidance's own apply is a torch.compile kernel, which would compile
        # (seconds, and a C compiler) on the first request of every process.
        allowed = ((self._bitmask[0].unsqueeze(1) >> _SHIFTS) & 1).flatten()[: self._vocabulary]
        masked = logits.float().clone()
        masked[: self._vocabulary].masked_fill_(allowed.to(masked.device) == 0, float("-inf"))
        masked[self._vocabulary :] = float("-inf")  # ids past the tokenizer's words are no text
        return masked

    def within_budget(self, token: int, remaining: int) -> int:
        """The token to take at a step with `remaining` steps left (this one included): `token`,
        unless taking it would leave more to close than the budget holds. Then the first token
        of the shortest closing of the current state, whose other tokens the next steps force;
        or the end of the sequence where the grammar may already end.

        Measured only near the end of the budget: within what the state needs, plus the most any
        state needed so far (one token can open another call or item as large), plus
        `CLOSING_ZONE`. A sampled token costs one closing search there, nothing before."""
        if self._forced or self._closer is None:
            return token
        self._since += 1
        zone = (self._need or 0) + self._peak + CLOSING_ZONE
        if self._need is not None and remaining > zone and self._since < CLOSING_REFRESH:
            return token
        after = self._matcher.deep_copy()
        need = self._closer.need(after) if after.consume_token(token) else None
        self._since = 0
        if need is not None and need <= remaining - 1:
            self._need, self._peak = need, max(self._peak, need)
            return token
        if self._matcher.is_accepting():  # the output is complete as it stands: end it here
            self._closing = True
            return self._closer.eos
        closing = self._closer.close(self._matcher)
        if closing is None or len(closing) > remaining:  # it cannot close in time: "length"
            return token
        self._forced, self._closing = closing, True
        return closing[0]

    def accept(self, token: int) -> None:
        self._ready = False
        if self._forced and token == self._forced[0]:
            self._forced.pop(0)
        if not self._matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._matcher.get_error()}")
        if self._need is not None:
            self._need = max(self._need - 1, 0)

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end of the sequence may follow (or a
        closing was forced and has reached a valid end)."""
        if self._matcher.is_stopped():
            return True
        return self._closing and not self._forced and self._matcher.is_accepting()


CLOSING_ZONE = 32  # a row measures its closing once its budget is within need + peak + this
CLOSING_REFRESH = 16  # and otherwise every this many tokens, as the structure grows
MAX_CLOSING_BYTES = 512  # the longest closing the search builds before giving up
# The closing search's preference, byte by byte: end a string or a container first, then the
# shortest values (1, null/true/false, "", [] and {}), then anything a pattern may need. 1
# before 0: llguidance's `date` format takes year 0000, which Python's and most checkers refuse.
_PREFERENCE = (
    b'"}],1ntf[{-0.:'
    + bytes(range(ord("2"), ord("9") + 1))
    + bytes(range(ord("a"), ord("z") + 1))
    + bytes(range(ord("A"), ord("Z") + 1))
    + b"_ !#$%&'()*+/;<=>?@^`|~\n\t"
)


class Closer:
    """The shortest way to close a grammar from where a sequence stands, for one tokenizer.

    A greedy search over single bytes on a copy of the matcher: take the bytes the grammar
    forces, else the first allowed byte in `_PREFERENCE` (close the string, close the
    container, then the shortest value), until the grammar accepts. The bytes are then spelled
    in as few tokens as the tokenizer makes of them, checked against the grammar. Not a proof of
    minimality: a `pattern` whose next byte comes late in the order costs more bytes, and one
    the search cannot satisfy within MAX_CLOSING_BYTES gives no closing (the row then ends by
    its budget, "length", as without this)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer  # llguidance's
        self.eos = tokenizer.eos_token
        self._bytes: list[tuple[int, int]] = []  # (byte, its single token), in preference order
        for byte in _PREFERENCE:
            ids = tokenizer.tokenize_bytes(bytes([byte]))
            if len(ids) == 1:
                self._bytes.append((byte, ids[0]))

    def need(self, matcher: Any) -> int | None:
        """Tokens the state of `matcher` needs to close (0 when it accepts); None if unknown."""
        if matcher.is_accepting():
            return 0
        closing = self.close(matcher)
        return None if closing is None else len(closing)

    def close(self, matcher: Any) -> list[int] | None:
        """The tokens that take `matcher` (left as it is) to a state the grammar accepts."""
        search = matcher.deep_copy()
        text = bytearray()
        while not search.is_accepting():
            if len(text) > MAX_CLOSING_BYTES or search.is_stopped():
                return None
            forced = search.compute_ff_bytes()
            if forced:
                ids = self._tokenizer.tokenize_bytes(forced)
                if search.try_consume_tokens(ids) != len(ids):
                    return None
                text += forced
                continue
            for byte, token in self._bytes:
                if search.try_consume_tokens([token]) == 1:
                    text.append(byte)
                    break
            else:
                return None
        tokens = self._tokenizer.tokenize_bytes(bytes(text))
        check = matcher.deep_copy()
        if check.try_consume_tokens(tokens) == len(tokens) and check.is_accepting():
            return tokens
        return [token for byte in text for token in self._tokenizer.tokenize_bytes(bytes([byte]))]


class Grammar:
    """A compiled grammar (immutable, shared): `matcher()` starts a sequence in it."""

    def __init__(self, key: str, template: Any, vocabulary: int, closer: Closer | None = None):
        self.key = key
        self._template = template
        self._vocabulary = vocabulary
        self._closer = closer
        self._lock = threading.Lock()

    def matcher(self) -> GrammarMatcher:
        with self._lock:  # deep_copy of one template from the engine thread and from serving
            return GrammarMatcher(self._template.deep_copy(), self._vocabulary, self._closer)

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
        self._closer: Closer | None = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache (held only briefly: the event loop takes it)
        self._tokenizer_lock = threading.Lock()  # building the llguidance tokenizer (0.5 s)
        self._on_compile, self._on_cache = on_compile, on_cache
        self._executor = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="hotswap-grammar-compile")

    async def compile(self, schema: dict[str, Any]) -> Grammar:
        """The grammar of JSON values valid under `schema`, compiled off the event loop."""
        return await self._compiled(schema_key(schema), self._json_text, schema)

    async def compile_lark(self, text: str) -> Grammar:
        """The grammar of a llguidance lark text (tool calls: service.serving.tools), compiled
        off the event loop; the text is its own cache key."""
        if len(text) > MAX_GRAMMAR_BYTES:
            raise GrammarError(f"the grammar is {len(text)} bytes; at most {MAX_GRAMMAR_BYTES}")
        return await self._compiled("lark:" + text, lambda grammar: grammar, text)

    async def _compiled(self, key: str, to_text: Callable[[Any], str], source: Any) -> Grammar:
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        self._on_cache(cached is not None)
        if cached is not None:
            return cached
        # Compiles run on their own two threads: in the default pool they competed with adapter
        # loads and rescans, and many distinct schemas could take all of it (review L1).
        grammar = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._build(key, to_text(source))
        )
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def compile_now(self, schema: dict[str, Any]) -> Grammar:
        """`compile` on the calling thread (training's evaluation, tests)."""
        return self._build(schema_key(schema), self._json_text(schema))

    def compile_lark_now(self, text: str) -> Grammar:
        """`compile_lark` on the calling thread."""
        return self._build("lark:" + text, text)

    @staticmethod
    def _json_text(schema: dict[str, Any]) -> str:
        import llguidance

        try:
            return llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=_JSON_STYLE)
        except ValueError as exc:
            raise GrammarError(str(exc)) from exc

    def _llg_tokenizer(self):
        import llguidance.hf

        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
                self._closer = Closer(self._tokenizer)
            return self._tokenizer

    def _build(self, key: str, text: str) -> Grammar:
        import llguidance

        started = time.perf_counter()
        tokenizer = self._llg_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        if error:
            raise GrammarError(error)
        template = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        self._on_compile(time.perf_counter() - started)
        return Grammar(key, template, tokenizer.vocab_size, self._closer)
