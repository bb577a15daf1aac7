"""PII redaction (tier 1): the corpus, Unicode tricks, and streaming that never leaks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.guardrails.base import GuardedOutput, GuardedRequest, Message
from service.guardrails.pii import PIIRedactor
from service.guardrails.pii_detectors import luhn_ok
from tests.service.guardrails.corpus import CORPUS

KNOWN_MISSES = {"write to jane at example dot com", "my ssn is 123456789"}
REDACTOR = PIIRedactor()


@pytest.mark.parametrize(("text", "expected"), CORPUS, ids=[t[:40] for t, _ in CORPUS])
def test_corpus_values_are_found_exactly(text, expected):
    found = sorted((kind, text[a:b]) for kind, a, b in REDACTOR.findings(text))
    if text in KNOWN_MISSES:
        assert found != sorted(expected)  # documented limits; if one starts passing, update docs
        return
    assert found == sorted(expected)


def test_redaction_replaces_the_original_characters_tricks_included():
    text = "mail j\u200bane@ехample.com or card ４１１１ １１１１ １１１１ １１１１ now"
    redacted, counts = REDACTOR.redact(text)
    assert redacted == "mail <EMAIL> or card <CREDIT_CARD> now"
    assert counts == {"EMAIL": 1, "CREDIT_CARD": 1}


def test_luhn():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_kinds_can_be_limited_and_unknown_kinds_refused():
    only_email = PIIRedactor(kinds=["EMAIL"])
    assert only_email.redact("a@example.com 4111 1111 1111 1111")[0] == "<EMAIL> 4111 1111 1111 1111"
    with pytest.raises(ValueError, match="unknown PII kinds"):
        PIIRedactor(kinds=["EMAIL", "DNA"])


def test_pre_hook_redacts_every_message_and_counts():
    request = GuardedRequest(
        "chat",
        "base",
        None,
        messages=(Message("system", "ops: ops@example.com"), Message("user", "SSN 123-45-6789")),
    )
    verdict = REDACTOR.pre(request)
    assert verdict.action == "redact"
    assert [m.content for m in verdict.request.messages] == ["ops: <EMAIL>", "SSN <US_SSN>"]
    assert verdict.details == {"EMAIL": 1, "US_SSN": 1}


def test_block_action_blocks():
    verdict = PIIRedactor(action="block").post(GuardedOutput("a", None, "mail a@example.com"))
    assert verdict.action == "block" and "EMAIL" in verdict.reason


def stream_through(hook, text: str, cuts: list[int]) -> tuple[str, list[str]]:
    """Feed `text` split at `cuts`; returns the joined release and each release."""
    f = hook.stream(GuardedOutput("a", None, ""))
    pieces, last = [], 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(text))) + [len(text)]:
        pieces.append(f.feed(text[last:cut]))
        last = cut
    pieces.append(f.finish())
    return "".join(pieces), pieces


STREAM_TEXTS = [t for t, _ in CORPUS] + [
    "secret sk-proj-abcdefghijklmnopqrstuvwx0123456789 then mail x@example.org.",
    "-----BEGIN EC PRIVATE KEY-----\nabc\ndef\n-----END EC PRIVATE KEY-----\nok 4111 1111 1111 1111",
    # values after long unbroken runs, where the bounded tails (pii.py) start to matter
    "1234567890123456789012345678901234567890 4111 1111 1111 1111 and 123-45-6789",
    "東京タワーからのメールはtaro.yamada@example.jpへ、電話は+81 3 1234 5678です。",
    "x" * 70 + "@example.com is no address but y@example.com is",
    "config: api_key = abcd1234efgh5678 and PASSWORD: hunter2hunter2 then AKIAIOSFODNN7EXAMPLE",
    "route 2001:db8::ff00:42:8329 via 10.0.0.1, token ghp_abcdefghijklmnopqrstuvwxyz0123456789",
]


def test_a_stream_holds_back_only_what_could_still_become_a_value():
    """Text no value can start inside leaves as it comes, whatever the script: the held tail is
    bounded by the longest value still in progress (an e-mail's local part: 64 characters of
    ASCII letters and digits), never the whole run up to the next whitespace; a script no
    value is written in is not held at all."""
    runs = {
        "katakana": "カタカナノテキストガツヅク" * 8,
        "digits": "31415926535897932384626433832795028841971693993751" * 4,
        "emoji": "🚀✨🎉👩\u200d💻 " * 20,
        "code": "def f(x):\n    return [i*i for i in range(x) if i%3==0]  # squares\n" * 3,
        "chinese": "人工智能正在改变世界的每一个角落" * 6,
    }
    for name, text in runs.items():
        f = REDACTOR.stream(GuardedOutput("a", None, ""))
        released = ""
        for i, char in enumerate(text):
            released += f.feed(char)
            held = i + 1 - len(released)
            assert held <= (64 if text.isascii() else 0), (name, i, held)
        assert released + f.finish() == text


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(STREAM_TEXTS), st.lists(st.integers(0, 200), max_size=30))
def test_streamed_redaction_equals_whole_text_redaction(text, cuts):
    joined, _ = stream_through(REDACTOR, text, cuts)
    assert joined == REDACTOR.redact(text)[0]


@pytest.mark.parametrize(
    "value",
    [
        "4111 1111 1111 1111",
        "jane.doe@example.com",
        "+44 20 7946 0958",
        "sk-proj-abcdefghijklmnopqrstuvwx0123456789",
        "DE89 3704 0044 0532 0130 00",
    ],
)
def test_no_part_of_a_value_split_across_chunks_is_released(value):
    text = f"before {value} after"
    for size in (1, 2, 3, 5):
        joined, pieces = stream_through(REDACTOR, text, list(range(size, len(text), size)))
        assert joined == f"before <{REDACTOR.findings(value)[0][0]}> after"
        # Not even a fragment leaves: no release holds four consecutive characters of the value.
        fragments = {value[i : i + 4] for i in range(len(value) - 3)}
        fragments = {f for f in fragments if " " not in f}
        assert not any(f in piece for piece in pieces for f in fragments)


LONG = 20_000


@pytest.mark.parametrize(
    ("start", "body", "after", "expected"),
    [
        ("key sk-", "a" * LONG, " and then the rest", "key <SECRET> and then the rest"),
        ("mail a@", "b" * LONG, " and then the rest", None),  # no e-mail: released as it comes
        ("password=", "c" * LONG, " and then the rest", "password=<SECRET> and then the rest"),
        ("Bearer ", "d" * LONG, " and then the rest", "Bearer <SECRET> and then the rest"),
        (
            "-----BEGIN PRIVATE KEY-----\n",
            "MIIEv" * (LONG // 5),
            "\n-----END PRIVATE KEY-----\nand then the rest",
            "<SECRET>\nand then the rest",
        ),
    ],
    ids=["sk", "email", "password", "bearer", "pem"],
)
def test_a_long_run_after_a_value_prefix_is_bounded_and_linear(start, body, after, expected):
    """Security review H2: after `sk-`, `a@`, `password=` or a PEM header, every later
    character was held back and re-scanned at every delta (quadratic, on the event loop, and
    nothing released until the end). Now the held text is bounded (a detector's `hold`), the
    work is linear in the output (the characters scanned, counted), the run is released or
    redacted while it streams, and the text after it leaves before the stream ends."""
    text = start + body + after
    f = REDACTOR.stream(GuardedOutput("a", None, ""))
    released, most_held = "", 0
    for i in range(0, len(text), 4):
        released += f.feed(text[i : i + 4])
        most_held = max(most_held, min(i + 4, len(text)) - len(released))
    tail = f.finish()
    assert most_held <= 700 or expected is not None  # redacted runs shrink to a placeholder
    assert f.scanned <= 200 * len(text)  # linear: about (held + context) per 4-character delta
    whole = released + tail
    if expected is None:
        assert whole == text and len(tail) < 400  # released as it came, not at the end
    else:
        assert whole == expected == REDACTOR.redact(text)[0]  # as redacting it whole would
        assert "and then the rest"[:8] in released  # before the stream's end


@pytest.mark.parametrize(
    "text",
    [
        "card 4\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 ok",
        "card \u0664\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 ok",
        "card \u096a\u0967\u0967\u0967 \u0967\u0967\u0967\u0967 \u0967\u0967\u0967\u0967 \u0967\u0967\u0967\u0967 ok",
        "card 4111.1111.1111.1111 ok",  # dotted
        "card 4111/1111/1111/1111 ok",
    ],
    ids=["arabic-indic-after-4", "arabic-indic", "devanagari", "dots", "slashes"],
)
def test_cards_in_other_digits_and_separators_are_found(text):
    """Security review M5: Unicode digits broke the Luhn check (ord - 48), and only spaces and
    dashes separated groups."""
    assert REDACTOR.redact(text)[0] == "card <CREDIT_CARD> ok"
    assert luhn_ok("\u0664\u0661\u0661\u0661" + "\u0661" * 12)
