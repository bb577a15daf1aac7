"""An adversarial PII corpus: each record is a text and the values in it that must be redacted.

Written for this project (all values are fictitious or documentation ranges: 555 numbers,
RFC 5737 / 3849 addresses, ISO 13616 example IBANs, card-network test numbers). It covers each
kind in several formats, Unicode tricks (full-width digits, zero-width characters inside a
value, Cyrillic/Greek homoglyphs) and ordinary text with numbers that must stay (dates, prices,
product codes, versions, times, quantities). `bench/guardrails.py` scores precision and recall
per kind on it for docs/guardrails.md.
"""

from __future__ import annotations

ZW = "\u200b"  # zero-width space
ZWJ = "\u200d"


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


# (text, [(kind, value), ...]); every value must occur in the text exactly as written.
CORPUS: list[tuple[str, list[tuple[str, str]]]] = [
    # ---- e-mail
    ("Write to jane.doe@example.com for details.", [("EMAIL", "jane.doe@example.com")]),
    ("CC: J.Smith+billing@mail.example.co.uk; thanks", [("EMAIL", "J.Smith+billing@mail.example.co.uk")]),
    ("<ops_team-2@sub.example.org>", [("EMAIL", "ops_team-2@sub.example.org")]),
    ("reply to ADMIN@EXAMPLE.NET now", [("EMAIL", "ADMIN@EXAMPLE.NET")]),
    (f"hidden j{ZW}ane@exam{ZWJ}ple.com here", [("EMAIL", f"j{ZW}ane@exam{ZWJ}ple.com")]),
    ("homoglyph јane@ехample.com (Cyrillic j, e, x)", [("EMAIL", "јane@ехample.com")]),
    (f"full-width {fullwidth('bob@example.com')} too", [("EMAIL", fullwidth("bob@example.com"))]),
    # ---- phone
    ("Call +1 (415) 555-2671 after 5pm.", [("PHONE", "+1 (415) 555-2671")]),
    ("Office: +44 20 7946 0958", [("PHONE", "+44 20 7946 0958")]),
    (
        "Berlin 0049 30 12345678, Paris +33 1 42 68 53 00.",
        [("PHONE", "0049 30 12345678"), ("PHONE", "+33 1 42 68 53 00")],
    ),
    ("US style 415.555.2671 or (212) 555-0182", [("PHONE", "415.555.2671"), ("PHONE", "(212) 555-0182")]),
    ("Mobile +91 98765 43210 / Tokyo +81 3-1234-5678", [("PHONE", "+91 98765 43210"), ("PHONE", "+81 3-1234-5678")]),
    (f"full-width {fullwidth('+44 20 7946 0958')}", [("PHONE", fullwidth("+44 20 7946 0958"))]),
    (f"zero-width +1 415{ZW} 555 2671 inside", [("PHONE", f"+1 415{ZW} 555 2671")]),
    # ---- payment cards (Luhn-valid test numbers)
    ("Visa 4111 1111 1111 1111 exp 12/27", [("CREDIT_CARD", "4111 1111 1111 1111")]),
    ("mc:5555-5555-5555-4444.", [("CREDIT_CARD", "5555-5555-5555-4444")]),
    (
        "amex 3782 822463 10005 and 378282246310005",
        [("CREDIT_CARD", "3782 822463 10005"), ("CREDIT_CARD", "378282246310005")],
    ),
    ("discover 6011111111111117", [("CREDIT_CARD", "6011111111111117")]),
    (f"full-width {fullwidth('4111 1111 1111 1111')}", [("CREDIT_CARD", fullwidth("4111 1111 1111 1111"))]),
    (f"split 4111{ZWJ}1111{ZW}1111 1111 card", [("CREDIT_CARD", f"4111{ZWJ}1111{ZW}1111 1111")]),
    # ---- IBAN
    ("Pay to DE89 3704 0044 0532 0130 00 today", [("IBAN", "DE89 3704 0044 0532 0130 00")]),
    ("IBAN GB82WEST12345698765432.", [("IBAN", "GB82WEST12345698765432")]),
    ("fr: FR14 2004 1010 0505 0001 3M02 606", [("IBAN", "FR14 2004 1010 0505 0001 3M02 606")]),
    ("lower gb82 west 1234 5698 7654 32", [("IBAN", "gb82 west 1234 5698 7654 32")]),
    # ---- US SSN
    ("SSN 123-45-6789 on file", [("US_SSN", "123-45-6789")]),
    ("ssn: 078 05 1120", [("US_SSN", "078 05 1120")]),
    (f"full-width {fullwidth('123-45-6789')}", [("US_SSN", fullwidth("123-45-6789"))]),
    # ---- IP addresses
    ("from 192.0.2.44 to 198.51.100.7", [("IP_ADDRESS", "192.0.2.44"), ("IP_ADDRESS", "198.51.100.7")]),
    ("v6 2001:db8::8a2e:370:7334 and ::1", [("IP_ADDRESS", "2001:db8::8a2e:370:7334"), ("IP_ADDRESS", "::1")]),
    ("gateway 10.0.0.1:8080", [("IP_ADDRESS", "10.0.0.1")]),
    # ---- secrets
    (
        "OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwx0123456789",
        [("SECRET", "sk-proj-abcdefghijklmnopqrstuvwx0123456789")],
    ),
    ("aws AKIAIOSFODNN7EXAMPLE key", [("SECRET", "AKIAIOSFODNN7EXAMPLE")]),
    ("token ghp_0123456789abcdefghijklmnopqrstuvwxyzAB", [("SECRET", "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB")]),
    (
        "Authorization: Bearer eyJhbGciOi.J9eyJzdWIiOiIx.SflKxwRJSMeKKF2Q",
        [("SECRET", "eyJhbGciOi.J9eyJzdWIiOiIx.SflKxwRJSMeKKF2Q")],
    ),
    (
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N",
        [("SECRET", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N")],
    ),
    ('config: password = "correct-horse-battery"', [("SECRET", "correct-horse-battery")]),
    ("slack xoxb-1234567890-abcdefghij", [("SECRET", "xoxb-1234567890-abcdefghij")]),
    (
        "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nq8Zx1\n-----END RSA PRIVATE KEY-----\ndone",
        [("SECRET", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nq8Zx1\n-----END RSA PRIVATE KEY-----")],
    ),
    (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
        [("SECRET", "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC")],
    ),
    # ---- mixed
    (
        "Customer Ana (ana@example.com, +44 20 7946 0958) paid with 5555 5555 5555 4444 from 203.0.113.9.",
        [
            ("EMAIL", "ana@example.com"),
            ("PHONE", "+44 20 7946 0958"),
            ("CREDIT_CARD", "5555 5555 5555 4444"),
            ("IP_ADDRESS", "203.0.113.9"),
        ],
    ),
    # ---- known misses, kept so the figures stay honest (docs/guardrails.md "Limits")
    ("write to jane at example dot com", [("EMAIL", "jane at example dot com")]),
    ("my ssn is 123456789", [("US_SSN", "123456789")]),
    # ---- must NOT be redacted
    ("The meeting is on 2024-05-17 at 10:30, room 4.2.", []),
    ("It costs $1,299.99 (or 1.299,99 EUR) per unit.", []),
    ("SKU 4821-77-X, part no. 000-123-456, batch 2023/11/07.", []),
    ("Upgrade from version 1.2.3 to 2.10.0-rc1.", []),
    ("Ship 12 x 250 ml bottles, 3 boxes, total 3000 ml.", []),
    ("Order #100234 and invoice 2024-00017 are linked.", []),
    ("ISBN 978-3-16-148410-0 and ISO 8601 timestamps like 2024-05-17T10:30:00Z.", []),
    ("Our ratio is 16:9 and the score was 3:1 at 12:45:30.", []),
    ("Call the front desk at extension 42.", []),
    ("Use the @mention feature, e.g. @alice, in chat.", []),
    ("Card numbers must pass the Luhn check; 1234 5678 9012 3456 does not.", []),
    ("The account was opened in 1998 with 250 USD and 17 transactions.", []),
    ("Instruction: summarise the text below in three bullet points.", []),
    ("Coordinates 48.8566, 2.3522 mark Paris.", []),
    ("Firmware release 10.2.0.1 fixes the fan curve.", []),  # a version, not an IPv4 address
    ("Since the 0.11.0.0 release, Kafka offers transactions.", []),  # Dolly: 0.0.0.0/8 is no host
    ("Upgrade to version 2.4.1.7 first.", []),
]
