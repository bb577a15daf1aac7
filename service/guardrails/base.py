"""The guardrail hook interface: what a hook sees, what it may answer, and how streams pass it.

A **pre hook** (`Hook.pre`) sees the resolved request before tokenization: the adapter, its
manifest, the prompt texts (completions, or an adapter's rendered prompt) or the chat messages
(the base model's chat), and the sampling parameters. A **post hook** (`Hook.post`) sees one
choice's generated text and the adapter's manifest. Each answers a `Verdict`: allow, modify
(return the new text or request: redaction), or block with a reason; a post hook may also ask
for one greedy retry (the JSON-schema hook does).

Streams: `Hook.stream` returns a `StreamFilter` that receives text deltas and releases text once
the hook's decision on it can no longer change. The default holds the whole output back and
calls `post` on it at the end (always correct, never incremental); the PII and banned-term hooks
hold back only what a match in progress can span.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from service.adapters.manifest import AdapterManifest

# What a hook did, as responses and metrics name it. "modify", "redact" and "sanitize" change
# the text (the verdict carries the new text or request); the others leave it as it is.
Action = Literal["allow", "modify", "redact", "sanitize", "block", "retry", "flag"]
MODIFYING: frozenset[str] = frozenset({"modify", "redact", "sanitize"})


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class GuardedRequest:
    """A resolved request as pre hooks see it. Exactly one of `prompts` / `messages` is set."""

    endpoint: str  # "completions" or "chat"
    adapter: str  # adapter name, or "base"
    manifest: AdapterManifest | None
    prompts: tuple[str, ...] | None = None
    messages: tuple[Message, ...] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def texts(self) -> list[str]:
        if self.prompts is not None:
            return list(self.prompts)
        return [m.content for m in self.messages or ()]

    def with_texts(self, texts: list[str]) -> GuardedRequest:
        """The same request with its texts replaced, in `texts()` order."""
        if self.prompts is not None:
            return replace(self, prompts=tuple(texts))
        messages = tuple(Message(m.role, text) for m, text in zip(self.messages or (), texts, strict=True))
        return replace(self, messages=messages)


@dataclass(frozen=True)
class GuardedOutput:
    """One choice's output as post hooks see it."""

    adapter: str
    manifest: AdapterManifest | None
    text: str
    retried: bool = False  # this is already the greedy retry of an output a hook rejected
    streaming: bool = False  # the client reads a stream (released text cannot be retried)
    # The request has tools: the output may be tool calls, each valid by its grammar, which an
    # adapter's JSON contract does not describe.
    tool_calls: bool = False


@dataclass(frozen=True)
class Verdict:
    action: Action = "allow"
    reason: str = ""
    text: str | None = None  # post hooks: the modified output
    request: GuardedRequest | None = None  # pre hooks: the modified request
    details: dict[str, int] = field(default_factory=dict)  # e.g. {"EMAIL": 2}

    @property
    def modifies(self) -> bool:
        return self.action in MODIFYING

    @classmethod
    def allow(cls) -> Verdict:
        return _ALLOW


_ALLOW = Verdict()


@dataclass(frozen=True)
class ActionRecord:
    """One thing a hook did, as listed in the response's `guardrails` field."""

    stage: Literal["pre", "post"]
    hook: str
    action: str
    reason: str = ""
    details: dict[str, int] = field(default_factory=dict)
    index: int | None = None  # the choice a post action applies to

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"stage": self.stage, "hook": self.hook, "action": self.action}
        if self.reason:
            body["reason"] = self.reason
        if self.details:
            body["details"] = dict(self.details)
        if self.index is not None:
            body["index"] = self.index
        return body


class Blocked(Exception):
    """A post hook refused the output (raised by stream filters)."""

    def __init__(self, hook: str, reason: str):
        super().__init__(reason)
        self.hook, self.reason = hook, reason


class RetryRequested(Exception):
    """A post hook asks to regenerate the output greedily, once."""

    def __init__(self, hook: str, reason: str):
        super().__init__(reason)
        self.hook, self.reason = hook, reason


class StreamFilter:
    """Receives one choice's text deltas; returns the text that may leave the server now.

    `feed` and `finish` return released text, record what they did in `actions`, and raise
    `Blocked` or `RetryRequested`. This default holds everything until `finish`.
    """

    def __init__(self, hook: Hook, output: GuardedOutput):
        self.hook, self.output = hook, output
        self.actions: list[Verdict] = []
        self._held: list[str] = []
        # Text the model wrote after the output's end, which never leaves: the stop string that
        # cut it and what came with it. A value cut by it (`stop: [".com"]` on an e-mail) is
        # still found, and redacted up to the cut (security review M5).
        self.lookahead = ""

    def feed(self, delta: str) -> str:
        self._held.append(delta)
        return ""

    def close(self, delta: str, lookahead: str = "") -> str:
        """`feed(delta)` then `finish()`, in one pass where a filter can."""
        self.lookahead = lookahead
        return self.feed(delta) + self.finish()

    def finish(self) -> str:
        text = "".join(self._held)
        return apply_post(self.hook, replace(self.output, text=text), self.actions)


class HoldbackFilter(StreamFilter):
    """A filter that releases text as soon as its hook's decision on it is final.

    Subclasses implement `_release(final)`: decide on `context + pending` (`context`: the end
    of what was released, kept for look-behind boundaries), release a prefix, and keep the rest
    pending; `_record` turns what the hook found into an action or a block.
    """

    def __init__(self, hook: Hook, output: GuardedOutput):
        super().__init__(hook, output)
        self.context = ""
        self.pending = ""

    def _release(self, final: bool) -> str:
        raise NotImplementedError

    def _record(self, verdict: Verdict) -> None:
        if verdict.action == "block":
            raise Blocked(self.hook.name, verdict.reason)
        if verdict.action != "allow":
            self.actions.append(verdict)

    def feed(self, delta: str) -> str:
        self.pending += delta
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def close(self, delta: str, lookahead: str = "") -> str:
        self.pending += delta
        self.lookahead = lookahead
        return self._release(final=True)


def apply_post(hook: Hook, output: GuardedOutput, actions: list[Verdict]) -> str:
    """Run `hook.post` on a whole output: the released text, or Blocked / RetryRequested."""
    verdict = hook.post(output)
    if verdict.action == "block":
        raise Blocked(hook.name, verdict.reason)
    if verdict.action == "retry":
        raise RetryRequested(hook.name, verdict.reason)
    if verdict.action != "allow":
        actions.append(verdict)
    return verdict.text if verdict.modifies and verdict.text is not None else output.text


class Hook:
    """Base class of guardrail hooks. Subclasses set `name` and implement `pre` and/or `post`.

    Hooks are built once at start from their YAML options (keyword arguments; raise ValueError
    or TypeError for bad ones) and must be safe to call from many requests at once.
    """

    name: ClassVar[str] = "hook"

    def pre(self, request: GuardedRequest) -> Verdict:
        raise NotImplementedError

    def post(self, output: GuardedOutput) -> Verdict:
        raise NotImplementedError

    def stream(self, output: GuardedOutput) -> StreamFilter:
        return StreamFilter(self, output)

    @classmethod
    def supports(cls, stage: str) -> bool:
        own = getattr(cls, stage)
        return own is not getattr(Hook, stage)
