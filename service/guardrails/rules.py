"""Rule hooks: prompt-injection detection, banned terms, prompt length, JSON output schema."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import replace
from typing import Any

from service.guardrails.base import (
    GuardedOutput,
    GuardedRequest,
    HoldbackFilter,
    Hook,
    StreamFilter,
    Verdict,
    apply_post,
)
from service.guardrails.text import is_hidden, skeleton

# Phrasings from published prompt-injection corpora (instruction override, prompt extraction,
# role-play jailbreaks such as "DAN" and "developer mode"). Matched case-blind on the skeleton,
# so homoglyphs and zero-width characters inside the words do not hide them.
_INJECTION = {
    "instruction_override": (
        r"\b(?:ignore|disregard|forget|override|bypass|skip)\b(?:\W+\w+){0,3}?\W+"
        r"(?:previous|prior|above|earlier|preceding|all|any|your|the|system|original)\b(?:\W+\w+){0,2}?\W+"
        r"(?:instructions?|rules|prompts?|directions|guidelines|constraints|policies|context)\b"
    ),
    "prompt_extraction": (
        r"\b(?:reveal|print|show|repeat|output|tell me|display|leak)\b(?:\W+\w+){0,4}?\W+"
        r"(?:system|hidden|initial|secret|original)\W+(?:prompt|instructions|message)\b"
    ),
    "role_play_jailbreak": (
        r"\b(?:you are now|from now on,? you are|act as|pretend (?:to be|you are|that you are)|roleplay as)"
        r"\b(?:\W+\w+){0,4}?\W+(?:dan|unfiltered|uncensored|unrestricted|jailbroken|evil|without (?:any )?"
        r"(?:rules|restrictions|limits|filters|guidelines))\b"
        r"|\bdo anything now\b|\bdeveloper mode\b(?:\W+\w+){0,2}?\W+(?:enabled|on|activated)\b"
        r"|\bjailbreak(?:ed)?\b|\bno (?:ethical|moral) (?:guidelines|restrictions|limits)\b"
    ),
}
_INJECTION_PATTERNS = {k: re.compile(v, re.IGNORECASE) for k, v in _INJECTION.items()}
_EMOJI_NEIGHBOURS = re.compile(r"[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F]")
# Characters that change what a reader sees without being seen: the explicit bidi embeddings,
# overrides and isolates of the Trojan Source attack (CVE-2021-42574: LRE, RLE, PDF, LRO, RLO,
# LRI, RLI, FSI, PDI) and the tag characters, which spell ASCII invisibly. Real prose carries
# neither; an emoji flag's tag sequence (after U+1F3F4) is the one ordinary use of tags.
_HIDING = re.compile("[\u202a-\u202e\u2066-\u2069\U000e0000-\U000e007f]")
_BLACK_FLAG = "\U0001f3f4"


def _invisible(text: str) -> tuple[list[int], list[int]]:
    """Positions of invisible format characters (Unicode category Cf) in `text`, split into
    those that hide text (above: blocked) and the rest: zero-width spaces, word joiners, soft
    hyphens, direction marks, which web text (Wikipedia) is full of and which are safe to strip
    (sanitized). Joiners that are ordinary text stay: ZWJ inside an emoji sequence (👩‍💻), and
    ZWJ / ZWNJ between two letters of a script that uses them (Persian, Arabic, Indic)."""
    hiding, benign = [], []
    flag = False  # inside an emoji flag's tag sequence
    for i, char in enumerate(text):
        if char == _BLACK_FLAG:
            flag = True
            continue
        if not is_hidden(char):
            flag = False
            continue
        if flag and "\U000e0020" <= char <= "\U000e007f":
            continue
        if char in "\u200c\u200d" and 0 < i < len(text) - 1:
            before, after = text[i - 1], text[i + 1]
            if char == "\u200d" and _EMOJI_NEIGHBOURS.match(before) and _EMOJI_NEIGHBOURS.match(after):
                continue
            if _script_letter(before) and _script_letter(after):
                continue
        (hiding if _HIDING.match(char) else benign).append(i)
    return hiding, benign


def _script_letter(char: str) -> bool:
    """A non-ASCII letter or combining mark (a virama before an Indic joiner is a mark)."""
    return not char.isascii() and unicodedata.category(char)[0] in "LM"


def _strip(text: str, positions: list[int]) -> str:
    drop = set(positions)
    return "".join(c for i, c in enumerate(text) if i not in drop)


class InjectionDetector(Hook):
    """Prompt-injection phrasing and hidden text in prompts.

    action: `block` (400), `flag` (let through, list and count it), or `sanitize` (strip the
    hiding characters too, block the phrasing). Whatever the action, harmless invisible
    formatting (zero-width spaces, joiners, soft hyphens, direction marks) is stripped, never
    blocked: counted as `invisible_format`, with `sanitize` as the action.
    """

    name = "injection"

    def __init__(self, action: str = "block", hidden_text: bool = True, categories: list[str] | None = None):
        if action not in ("block", "flag", "sanitize"):
            raise ValueError("action must be 'block', 'flag' or 'sanitize'")
        unknown = set(categories or ()) - set(_INJECTION)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; known: {sorted(_INJECTION)}")
        self.action = action
        self.hidden_text = hidden_text
        self.patterns = {k: p for k, p in _INJECTION_PATTERNS.items() if k in (categories or _INJECTION)}

    def pre(self, request: GuardedRequest) -> Verdict:
        found: dict[str, int] = {}
        drops: list[list[int]] = []  # per text: the positions sanitizing removes
        for text in request.texts():
            view = skeleton(text).text
            for category, pattern in self.patterns.items():
                if pattern.search(view):
                    found[category] = found.get(category, 0) + 1
            hiding, benign = _invisible(text) if self.hidden_text and not text.isascii() else ([], [])
            if hiding:
                found["hidden_text"] = found.get("hidden_text", 0) + len(hiding)
            if benign:
                found["invisible_format"] = found.get("invisible_format", 0) + len(benign)
            drops.append(benign + hiding if self.action == "sanitize" else benign)
        if not found:
            return Verdict.allow()
        threats = sorted(set(found) - {"invisible_format"})
        if self.action == "sanitize":  # hiding characters are stripped with the rest
            threats = [t for t in threats if t != "hidden_text"]
        if threats:
            reason = "possible prompt injection: " + ", ".join(threats)
            return Verdict("flag" if self.action == "flag" else "block", reason, details=found)
        texts = [_strip(t, d) for t, d in zip(request.texts(), drops, strict=True)]
        return Verdict("sanitize", "removed invisible characters", request=request.with_texts(texts), details=found)


class BannedTerms(Hook):
    """Terms that must not appear (whole words, case-blind, through Unicode tricks).

    action: `block` (input: 400; output: `finish_reason: "content_filter"`) or `redact`
    (replace each occurrence with `replacement`).
    """

    name = "banned_terms"

    def __init__(self, terms: list[str], action: str = "block", replacement: str = "<BANNED>"):
        terms = [t.strip() for t in terms if t and t.strip()]
        if not terms:
            raise ValueError("terms must list at least one term")
        if action not in ("block", "redact"):
            raise ValueError("action must be 'block' or 'redact'")
        self.action, self.replacement = action, replacement
        alternatives = "|".join(
            r"\s{1,4}".join(map(re.escape, skeleton(t).text.split())) for t in sorted(terms, key=len, reverse=True)
        )
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        # The longest a match can be: each gap between words may hold up to four spaces.
        self.longest = max(len(skeleton(t).text) + 3 * len(t.split()) for t in terms)

    def apply(self, text: str, *, start: int = 0, upto: int | None = None) -> tuple[str, int, int]:
        """Terms replaced in `text` between skeleton offsets `start` and `upto`.

        Returns (the original text from `start` to `upto` with replacements, the number of
        terms, the original offset of `upto`). Matches must start at or after `start`.
        """
        sk = skeleton(text)
        end = len(sk.text) if upto is None else upto
        cursor = sk.to_original(start) if start < len(sk.text) else len(text)
        out, count = [], 0
        for m in self.pattern.finditer(sk.text, start):
            if m.end() > end:
                break
            start, stop = sk.span(m.start(), m.end())
            out += [text[cursor:start], self.replacement]
            cursor, count = stop, count + 1
        limit = sk.to_original(end) if end < len(sk.text) else len(text)
        out.append(text[cursor:limit])
        return "".join(out), count, limit

    def _verdict(self, count: int, **changed: Any) -> Verdict:
        if not count:
            return Verdict.allow()
        if self.action == "block":
            return Verdict("block", "banned term", details={"terms": count})
        return Verdict("redact", "redacted banned terms", details={"terms": count}, **changed)

    def pre(self, request: GuardedRequest) -> Verdict:
        results = [self.apply(t) for t in request.texts()]
        count = sum(r[1] for r in results)
        return self._verdict(count, request=request.with_texts([r[0] for r in results]))

    def post(self, output: GuardedOutput) -> Verdict:
        text, count, _ = self.apply(output.text)
        return self._verdict(count, text=text)

    def stream(self, output: GuardedOutput) -> StreamFilter:
        return _TermStream(self, output)


class _TermStream(HoldbackFilter):
    """Holds back the last `longest` skeleton characters (and the word in progress)."""

    def _release(self, final: bool) -> str:
        hook: BannedTerms = self.hook
        text = self.context + self.pending
        sk = skeleton(text)
        floor = len(skeleton(self.context).text)
        cut = len(sk.text)
        if not final:
            cut = max(floor, len(sk.text) - hook.longest)
            word = re.search(r"\w*\Z", sk.text[:cut])  # never cut inside a word that a term
            if word and len(sk.text) - word.start() <= 2 * hook.longest:  # could still start in
                cut = max(floor, word.start())
            for m in hook.pattern.finditer(sk.text, floor):
                if m.start() < cut < m.end():  # nor inside a term
                    cut = m.start()
        released, count, limit = hook.apply(text, start=floor, upto=cut)
        self.context = text[:limit][-hook.longest - 1 :]
        self.pending = text[limit:]
        self._record(hook._verdict(count, text=released))
        return released


class MaxPromptLength(Hook):
    """Refuses prompts longer than `max_chars` characters (all prompts or messages together)."""

    name = "max_prompt_length"

    def __init__(self, max_chars: int):
        if not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError("max_chars must be a positive integer")
        self.max_chars = max_chars

    def pre(self, request: GuardedRequest) -> Verdict:
        size = sum(len(t) for t in request.texts())
        if size > self.max_chars:
            return Verdict("block", f"the prompt has {size} characters; the limit is {self.max_chars}")
        return Verdict.allow()


class JsonOutputSchema(Hook):
    """For adapters whose manifest declares JSON output: the output must be one JSON value that
    validates against the manifest's schema (unless the request has tools: its calls, and its
    answer, follow the tool grammar, whose answer branch is that schema). An invalid output is
    retried once greedily, then blocked (`finish_reason: "content_filter"`); other adapters pass
    untouched.

    A stream is not held back for the check: its text leaves as it is generated and the whole
    is validated at the end, where an invalid output ends the choice with "content_filter"
    (what was sent cannot be taken back, so a stream is not retried)."""

    name = "json_schema"

    def __init__(self, retry: bool = True):
        self.retry = bool(retry)

    def post(self, output: GuardedOutput) -> Verdict:
        manifest = output.manifest
        if manifest is None or manifest.output.format != "json" or output.tool_calls:
            return Verdict.allow()
        problem = json_problem(output.text, manifest.output.json_schema or {})
        if problem is None:
            return Verdict.allow()
        reason = f"output is not valid JSON for the adapter's schema: {problem}"
        if self.retry and not output.retried:
            return Verdict("retry", reason)
        return Verdict("block", reason)

    def stream(self, output: GuardedOutput) -> StreamFilter:
        manifest = output.manifest
        if manifest is None or manifest.output.format != "json" or output.tool_calls:
            return _PassThrough(self, output)
        if output.streaming:
            return _ValidatedAtEnd(self, output)
        return StreamFilter(self, output)  # held whole: an invalid output can still be retried


class _PassThrough(StreamFilter):
    def feed(self, delta: str) -> str:
        return delta

    def finish(self) -> str:
        return ""


class _ValidatedAtEnd(StreamFilter):
    """Releases every delta at once and checks the whole output when it ends."""

    def feed(self, delta: str) -> str:
        self._held.append(delta)
        return delta

    def finish(self) -> str:
        output = replace(self.output, text="".join(self._held), retried=True)  # no retry
        apply_post(self.hook, output, self.actions)
        return ""


def json_problem(text: str, schema: dict[str, Any]) -> str | None:
    """Why `text` is not one JSON value valid under `schema`, or None when it is."""
    import jsonschema

    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    try:
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as exc:
        return exc.message
    return None
