"""PII and secret detectors: where each kind of value lies in a text, for the redaction hooks of
`service.guardrails.pii` (typed placeholders, `<EMAIL>` ...).

Why not presidio-analyzer: its package imports spaCy (and thinc, blis ...) even when only its
pattern recognizers are used, its e-mail recognizer validates TLDs through tldextract (whose
default fetches the public-suffix list over the network), and its recognizers score candidates
for a threshold rather than redact exactly. We take its approach (a candidate pattern, then a
checksum or parser that confirms it, as in its CreditCardRecognizer, IbanRecognizer and
PhoneRecognizer) and Google's libphonenumber (the `phonenumbers` package) for telephone numbers
in international forms, and write the patterns here, so that each can also say how much of a
stream's tail a match in progress may still claim (`tail`), which streaming redaction needs.

Detectors run on the text's skeleton (`service.guardrails.text`): full-width digits, zero-width
characters inside a value and Cyrillic/Greek homoglyphs do not hide it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import phonenumbers

from service.guardrails.text import Skeleton

Validator = Callable[[str], bool]


@dataclass(frozen=True)
class Detector:
    kind: str  # placeholder name: EMAIL -> "<EMAIL>"
    pattern: re.Pattern[str]
    # The end of the text that a match could still grow into: streams hold it back.
    tail: re.Pattern[str]
    validate: Validator | None = None
    group: str | None = None  # redact only this named group (a secret's value, not its key)
    priority: int = 0  # wins overlaps against lower priorities
    # A stream holds back at most `hold` characters of a value in progress (security review
    # H2). A longer run is either no value of this kind (`overflow="release"`: an e-mail of
    # more than 254 + 64 characters), or a secret (`"redact"`): its placeholder goes out at
    # once, and the run's further characters (`run`) are dropped as they come, up to the first
    # one that cannot continue it, or, for a PEM block, up to its END line (`end`).
    hold: int = 64
    overflow: str = "release"
    run: re.Pattern[str] | None = None
    end: re.Pattern[str] | None = None


@dataclass(frozen=True, order=True)
class Match:
    start: int
    end: int
    kind: str = field(compare=False)
    priority: int = field(compare=False, default=0)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)  # any script's decimal digit (Arabic-Indic ones once passed as 0x660 - 48)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _iban_ok(text: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to 10..35, mod 97 == 1."""
    compact = re.sub(r"\s", "", text).upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


# Number shapes that are not telephone numbers: ISO dates, d.m.y / m/d/y dates, times.
_NOT_PHONE = re.compile(r"\d{4}-\d\d-\d\d|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}|\d{1,2}:\d\d(?::\d\d)?")


def _phone_ok(text: str) -> bool:
    candidate = text.strip()
    if _NOT_PHONE.fullmatch(candidate):
        return False
    if candidate.startswith("00"):  # the international call prefix most of the world dials
        candidate = "+" + candidate[2:]
    digits = re.sub(r"\D", "", candidate)
    if not 7 <= len(digits) <= 15:  # E.164 allows at most 15 digits
        return False
    try:
        number = phonenumbers.parse(candidate, "US")
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(number)


def _ip_ok(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    # 0.0.0.0/8 is "this network" (RFC 6890): no host has such an address, while release
    # numbers look exactly like one ("since the 0.11.0.0 release", in Dolly).
    return not (address.version == 4 and text.startswith("0."))


def _p(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _growing(prefixes: Iterable[str], body: str) -> str:
    """A tail that is still becoming a value that starts with one of `prefixes`: a proper
    prefix of one of them, or one of them followed by `body` characters. Tails are bounded so
    that a stream holds back only what could still become a match: an unbroken run of text
    (CJK, digits, code) that no value can start inside is released as it comes."""
    prefixes = sorted(set(prefixes), key=len, reverse=True)
    partial = sorted({p[:i] for p in prefixes for i in range(1, len(p))}, key=len, reverse=True)
    return "(?:" + "|".join([re.escape(p) + body for p in prefixes] + [re.escape(p) for p in partial]) + ")"


_PROVIDER_PREFIXES = (
    "sk-",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "rk_test_",
    "pk_live_",
    "pk_test_",
    "AKIA",
    "ASIA",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "xoxa-",
    "xoxb-",
    "xoxp-",
    "xoxr-",
    "xoxs-",
    "AIza",
    "hf_",
    "eyJ",
)
_SECRET_NAMES = tuple(
    f"{a}{sep}{b}"
    for a, b in (("api", "key"), ("secret", "key"), ("access", "token"), ("auth", "token"))
    for sep in ("_", "-", "")
) + ("secret", "password", "passwd")


# Boundaries: a value does not continue a longer word or number on either side.
_NB = r"(?<![\w@.+-])"  # no value character before
_NA = r"(?![\w@])"  # no word character after

DETECTORS: tuple[Detector, ...] = (
    Detector(
        "SECRET",  # PEM private keys; an unterminated block is redacted to the end
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|.*\Z)",
            re.DOTALL,
        ),
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:(?!-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----).)*\Z"
            r"|-----(?:B(?:E(?:G(?:I(?:N(?: [A-Z0-9 ]*(?:-{1,5})?)?)?)?)?)?)?\Z|-{1,4}\Z",
            re.DOTALL,
        ),
        priority=9,
        hold=96,  # the header, then the block is a secret to its END line
        overflow="redact",
        end=re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    ),
    Detector(
        "SECRET",  # bearer tokens in any header-like text
        _p(r"(?<![\w])bearer\s+(?P<value>[A-Za-z0-9\-._~+/]{12,}=*)"),
        _p(r"(?<![\w])b(?:e(?:a(?:r(?:e(?:r(?:\s+[A-Za-z0-9\-._~+/]*=*)?)?)?)?)?)?\Z"),
        group="value",
        priority=8,
        hold=512,
        overflow="redact",
        run=re.compile(r"[A-Za-z0-9\-._~+/=]*"),
    ),
    Detector(
        "SECRET",  # provider keys with a recognisable prefix, and JWTs
        re.compile(
            r"(?<![\w-])(?:sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
            r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}|xox[abprs]-[A-Za-z0-9-]{10,}"
            r"|AIza[0-9A-Za-z_\-]{35}|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}|hf_[A-Za-z0-9]{30,}"
            r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})(?![\w-])"
        ),
        re.compile(r"(?<![\w-])" + _growing(_PROVIDER_PREFIXES, r"[A-Za-z0-9_\-.]*") + r"\Z"),
        priority=8,
        hold=256,
        overflow="redact",
        run=re.compile(r"[A-Za-z0-9_\-.]*"),
    ),
    Detector(
        "SECRET",  # key = value assignments of things named like secrets
        _p(
            r"(?<![\w])(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)"
            r"\s*[:=]\s*[\"']?(?P<value>[^\s\"']{8,})"
        ),
        _p(r"(?<![\w])" + _growing(_SECRET_NAMES, r"(?:\s*[:=]\s*[\"']?[^\s\"']*|\s*)") + r"\Z"),
        group="value",
        priority=7,
        hold=512,
        overflow="redact",
        run=re.compile(r"[^\s\"']*"),
    ),
    Detector(
        "EMAIL",
        _p(
            _NB
            + r"[a-z0-9](?:[a-z0-9._%+-]{0,63})@[a-z0-9](?:[a-z0-9-]{0,62})"
            + r"(?:\.[a-z0-9-]{1,63})*\.[a-z]{2,24}(?![a-z0-9-])"
        ),
        _p(_NB + r"[a-z0-9][a-z0-9._%+-]{0,63}(?:@[a-z0-9.-]*)?\Z"),  # local parts have <= 64
        priority=6,
        hold=64 + 1 + 254,  # a local part, @, a domain (RFC 5321's lengths)
    ),
    Detector(
        "CREDIT_CARD",  # 4-4-4-4(-3), Amex 4-6-5, or 13-19 digits run together; Luhn-checked
        re.compile(
            r"(?<![\d./-])(?:[2-6]\d{3}[ ./-]?\d{4}[ ./-]?\d{4}[ ./-]?\d{1,4}(?:[ ./-]?\d{3})?"
            r"|3[47]\d{2}[ ./-]?\d{6}[ ./-]?\d{5}|[2-6]\d{12,18})(?![\d])"
        ),
        re.compile(r"(?<![\d./-])[2-6][\d ./-]{0,22}\Z"),  # at most 23 characters; dots, slashes too
        validate=_card_ok,
        priority=5,
    ),
    Detector(
        "IBAN",
        _p(r"(?<![\w])[a-z]{2}\d{2}(?: ?[a-z0-9]{4}){2,7}(?: ?[a-z0-9]{1,3})?(?![\w])"),
        _p(r"(?<![\w])(?:[a-z]{1,2}|[a-z]{2}\d{1,2}(?: ?[a-z0-9]){0,30} ?)\Z"),
        validate=_iban_ok,
        priority=4,
        hold=80,
    ),
    Detector(
        "US_SSN",  # dashed or spaced; not 000/666/9xx areas, 00 groups or 0000 serials
        re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}(?P<s>[- ])(?!00)\d{2}(?P=s)(?!0000)\d{4}(?![\d-])"),
        re.compile(r"(?<![\d-])\d[\d -]{0,10}\Z"),  # 11 characters
        priority=3,
    ),
    Detector(
        "PHONE",  # candidates, confirmed by libphonenumber (international forms, 00 prefix)
        re.compile(r"(?<![\w+(])(?:\+|00)?\(?\d[\d ().\-]{5,20}\d(?![\w])"),
        re.compile(r"(?<![\w+(])(?:\+|00)?\(?(?:\d[\d ().\-]{0,22})?\Z"),  # at most 25 characters
        validate=_phone_ok,
        priority=1,
    ),
    Detector(
        "IP_ADDRESS",
        re.compile(
            r"(?<![\w.:])(?<!version )(?<!release )"
            r"(?:\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)|[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?!\w|[.:][0-9a-f]))",
            re.IGNORECASE,
        ),
        re.compile(r"(?<![\w.:])(?:[\d.]{0,15}|[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){0,7})\Z", re.IGNORECASE),
        validate=_ip_ok,
        priority=2,
    ),
)

KINDS = tuple(dict.fromkeys(d.kind for d in DETECTORS))


def find(text: str, detectors: Iterable[Detector] = DETECTORS) -> list[Match]:
    """Non-overlapping matches in `text` (a skeleton), higher priority first, then earlier."""
    found: list[Match] = []
    for detector in detectors:
        for m in detector.pattern.finditer(text):
            value = m.group(0)
            if detector.validate is not None and not detector.validate(value):
                continue
            start, end = m.span(detector.group) if detector.group else m.span()
            found.append(Match(start, end, detector.kind, detector.priority))
    found.sort(key=lambda m: (-m.priority, m.start))
    kept: list[Match] = []
    for m in found:
        if all(m.end <= k.start or m.start >= k.end for k in kept):
            kept.append(m)
    return sorted(kept)


def redact_skeleton(sk: Skeleton, matches: list[Match], upto: int | None = None) -> tuple[str, dict[str, int]]:
    """The original text with each match's original characters replaced by its placeholder."""
    limit = len(sk.original) if upto is None else upto
    out: list[str] = []
    counts: dict[str, int] = {}
    cursor = 0
    for m in matches:
        start, end = sk.span(m.start, m.end)
        if end > limit:
            break
        out.append(sk.original[cursor:start])
        out.append(f"<{m.kind}>")
        counts[m.kind] = counts.get(m.kind, 0) + 1
        cursor = end
    out.append(sk.original[cursor:limit])
    return "".join(out), counts
