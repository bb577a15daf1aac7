"""The text detectors read: a "skeleton" of the original with an offset map back to it.

Detectors must see through Unicode tricks that leave text looking the same to a reader:
full-width or other compatibility forms (`４１１１`, `＠`), invisible format characters inside a
value (zero-width space/joiner, soft hyphen, bidi controls, tag characters) and Latin homoglyphs
from Cyrillic or Greek (`раypal` with a Cyrillic `р`). The skeleton applies NFKC per character,
drops format characters (Unicode category Cf) and maps the confusables below to ASCII; every
skeleton character remembers which original character it came from, so a match found in the
skeleton redacts exactly the original characters it covers, tricks included.

ASCII text, the common case, is its own skeleton and costs nothing.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

# Latin look-alikes that NFKC keeps distinct (after Unicode's confusables.txt, the subset that
# can hide an e-mail address, a key or a keyword). Case is kept: detectors match case-blind.
_CONFUSABLES = {
    # Cyrillic
    "а": "a",
    "в": "B",
    "е": "e",
    "ё": "e",
    "к": "k",
    "м": "M",
    "н": "H",
    "о": "o",
    "р": "p",
    "с": "c",
    "т": "T",
    "у": "y",
    "х": "x",
    "ѕ": "s",
    "і": "i",
    "ї": "i",
    "ј": "j",
    "ԁ": "d",
    "ɡ": "g",
    "һ": "h",
    "ӏ": "l",
    "ԛ": "q",
    "ԝ": "w",
    "А": "A",
    "В": "B",
    "Е": "E",
    "К": "K",
    "М": "M",
    "Н": "H",
    "О": "O",
    "Р": "P",
    "С": "C",
    "Т": "T",
    "Х": "X",
    "У": "Y",
    "Ѕ": "S",
    "І": "I",
    "Ј": "J",
    # Greek
    "α": "a",
    "ο": "o",
    "ρ": "p",
    "ν": "v",
    "τ": "t",
    "υ": "u",
    "ι": "i",
    "κ": "k",
    "χ": "x",
    "Α": "A",
    "Β": "B",
    "Ε": "E",
    "Ζ": "Z",
    "Η": "H",
    "Ι": "I",
    "Κ": "K",
    "Μ": "M",
    "Ν": "N",
    "Ο": "O",
    "Ρ": "P",
    "Τ": "T",
    "Υ": "Y",
    "Χ": "X",
    # Latin letters and punctuation NFKC leaves alone
    "ı": "i",
    "ℓ": "l",
    "‐": "-",
    "‑": "-",
    "‒": "-",
    "–": "-",
    "—": "-",
    "−": "-",
    "·": ".",
    "•": ".",
    "‚": ",",
    "\u00a0": " ",
    "\u202f": " ",
    "\u2009": " ",
}

_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


@lru_cache(maxsize=4096)
def _fold(char: str) -> str:
    """What one non-ASCII character becomes in the skeleton ("" when it is invisible)."""
    if unicodedata.category(char) == "Cf":
        return ""
    if char in _CONFUSABLES:
        return _CONFUSABLES[char]
    folded = unicodedata.normalize("NFKC", char)
    # Decimal digits of every script are digits to the detectors: NFKC leaves Arabic-Indic and
    # Devanagari digits as they are, and a card written in them passed (security review M5).
    return "".join(_CONFUSABLES.get(c, str(unicodedata.decimal(c, "")) or c) for c in folded)


@dataclass(frozen=True)
class Skeleton:
    """`text` as detectors see it; `to_original` maps its offsets back to the original's."""

    original: str
    text: str
    # Breakpoints (skeleton offset, original offset): from each breakpoint on, offsets advance
    # together until the next one. Empty means identity (ASCII input).
    _starts: tuple[int, ...] = ()
    _origins: tuple[int, ...] = ()

    def to_original(self, offset: int) -> int:
        """The original offset of skeleton offset `offset` (its end, for offset == len(text))."""
        if not self._starts:
            return offset
        if offset >= len(self.text):
            return len(self.original)
        i = bisect_right(self._starts, offset) - 1
        return self._origins[i] + (offset - self._starts[i])

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original characters that skeleton characters [start, end) came from."""
        if start >= end:
            point = self.to_original(start)
            return point, point
        return self.to_original(start), self.to_original(end - 1) + 1


def skeleton(text: str) -> Skeleton:
    if text.isascii():
        return Skeleton(text, text)
    parts: list[str] = []
    starts: list[int] = []
    origins: list[int] = []
    out = 0  # length of the skeleton so far
    last = 0
    for run in _NON_ASCII.finditer(text):
        if run.start() > last:  # an ASCII stretch: one breakpoint, offsets move together
            starts.append(out)
            origins.append(last)
            parts.append(text[last : run.start()])
            out += run.start() - last
        for i in range(run.start(), run.end()):
            folded = _fold(text[i])
            for _ in folded:  # every character of a fold points at its source character
                starts.append(out)
                origins.append(i)
                out += 1
            parts.append(folded)
        last = run.end()
    if last < len(text):
        starts.append(out)
        origins.append(last)
        parts.append(text[last:])
    # A multi-character fold maps each character to the same origin with step 0, which the
    # (start, origin) breakpoints above express one per character.
    return Skeleton(text, "".join(parts), tuple(starts), tuple(origins))


def is_hidden(char: str) -> bool:
    """Invisible characters that can hide text from a reader (zero-width, bidi, tags)."""
    return unicodedata.category(char) == "Cf"
