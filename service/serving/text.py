"""Token ids to text for streams: incremental detokenization and stop strings (pure, no model)."""

from __future__ import annotations

from typing import Any

# Leading prompt tokens the decoder keeps as context, so word-initial spaces of the first
# generated tokens decode as they would in the full text (SentencePiece drops them otherwise).
_CONTEXT_TOKENS = 5


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Each step decodes a short window (the tokens since the last emitted text plus a little
    context) and emits only the new suffix, holding it back while it ends in an incomplete
    byte sequence (decoded as U+FFFD). Same technique as vLLM's detokenizer.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: list[int] | tuple[int, ...]) -> str:
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character, if any)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :].rstrip("\ufffd")


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where to cut `text` for the stop string that completes first, as token-by-token generation
    meets them (ties: the one that starts first); None when none occurs.

    The stop that *starts* first is not the answer: in "#aa" with stops "a" and "#aa", generation
    ends at "#a", when "a" completes, so the output is "#" however the text arrives.
    """
    hits = [(i + len(s), i) for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits)[1] if hits else None


class StopMatcher:
    """Finds stop strings in streamed text, even when one spans several deltas.

    Text that could still be the start of a stop string is held back until it is clear that it
    is not, so a stream never shows part of a stop string.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.after = ""  # once a stop string is found: it, and what came after it in that text

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return delta, False
        text = self.held + delta
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.held, self.after = "", text[cut:]
            return text[:cut], True
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
