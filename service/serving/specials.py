"""Control tokens only where a template puts them (security review M4).

A chat prompt is the tokenizer's chat template rendered over the messages, then tokenized as one
string with its special tokens parsed: the template's `<|im_start|>` must become the control
token. But the same spelling typed inside a message became a control token too, and a user
could close their turn and open a `system` one. Message contents and an adapter's input
values are therefore escaped before rendering: every spelling of a special or added token in
them gets a zero-width space (U+200B) after its first character, which the tokenizer encodes
as text. The model sees the characters the user typed, never the control token; the templates'
own tokens are untouched. Raw completions prompts are the caller's own token stream and are not
escaped (lm-evaluation-harness and raw prompting rely on that).
"""

from __future__ import annotations

import re
from typing import Any

BREAK = "\u200b"


class SpecialText:
    """The tokenizer's special and added token spellings, and how to defuse them in text."""

    def __init__(self, tokenizer: Any):
        spellings = set(getattr(tokenizer, "all_special_tokens", None) or ())
        for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            spellings.add(getattr(token, "content", str(token)))
        spellings = sorted((s for s in spellings if len(s) >= 2), key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, spellings))) if spellings else None

    def escape(self, text: str) -> str:
        """`text` with no spelling of a control token left in it."""
        if self.pattern is None or not text:
            return text
        return self.pattern.sub(lambda m: m.group(0)[0] + BREAK + m.group(0)[1:], text)

    def escape_deep(self, value: Any) -> Any:
        """`value` (JSON: mappings, lists, strings) with every string and key escaped: tools'
        descriptions and schemas, and calls' arguments, reach a template through `tojson`."""
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, dict):
            return {self.escape(k) if isinstance(k, str) else k: self.escape_deep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.escape_deep(v) for v in value]
        return value

    def escape_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """An adapter's input values, their strings escaped."""
        return {k: self.escape(v) if isinstance(v, str) else v for k, v in values.items()}
