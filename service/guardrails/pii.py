"""PII and secret redaction hooks: typed placeholders (`<EMAIL>` ...) on input and output, or a
block. What counts as PII, and why the detectors are written here rather than taken from
presidio, is in `service.guardrails.pii_detectors`."""

from __future__ import annotations

from dataclasses import replace

from service.guardrails.base import GuardedOutput, GuardedRequest, HoldbackFilter, Hook, StreamFilter, Verdict
from service.guardrails.pii_detectors import DETECTORS, KINDS, Detector, find, redact_skeleton
from service.guardrails.text import skeleton


class PIIRedactor(Hook):
    """Replaces PII and secrets with `<KIND>` placeholders (pre and post); or blocks on them."""

    name = "pii"

    def __init__(self, kinds: list[str] | None = None, action: str = "redact"):
        unknown = set(kinds or ()) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {list(KINDS)}")
        if action not in ("redact", "block"):
            raise ValueError("action must be 'redact' or 'block'")
        wanted = set(kinds or KINDS)
        self.detectors = tuple(d for d in DETECTORS if d.kind in wanted)
        self.action = action

    def findings(self, text: str) -> list[tuple[str, int, int]]:
        """(kind, start, end) of each value found, in original offsets."""
        sk = skeleton(text)
        return [(m.kind, *sk.span(m.start, m.end)) for m in find(sk.text, self.detectors)]

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        sk = skeleton(text)
        return redact_skeleton(sk, find(sk.text, self.detectors))

    def _verdict(self, counts: dict[str, int], **changed) -> Verdict:
        if not counts:
            return Verdict.allow()
        kinds = ", ".join(sorted(counts))
        if self.action == "block":
            return Verdict("block", f"the text contains {kinds}", details=counts)
        return Verdict("redact", f"redacted {kinds}", details=counts, **changed)

    def pre(self, request: GuardedRequest) -> Verdict:
        texts, total = [], {}
        for text in request.texts():
            redacted, counts = self.redact(text)
            texts.append(redacted)
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return self._verdict(total, request=request.with_texts(texts))

    def post(self, output: GuardedOutput) -> Verdict:
        redacted, counts = self.redact(output.text)
        return self._verdict(counts, text=redacted)

    def stream(self, output: GuardedOutput) -> StreamFilter:
        return PIIStreamFilter(self, output)


class PIIStreamFilter(HoldbackFilter):
    """Releases redacted text up to where no match in progress could reach.

    The held tail starts at the earliest point any detector's `tail` pattern claims (the run
    of characters a value of its kind could still be growing from), and never inside a match.
    Released text equals the corresponding part of redacting the whole output at once.

    A tail is held for at most its detector's `hold` characters, so what is held, and what each
    new delta re-scans, is bounded whatever the output (linear time in its length; security
    review H2: a run after `sk-` was held to the end and re-scanned at every token). Past that,
    a run that cannot be a value of the kind is released, and a secret's run is redacted: its
    placeholder goes out, and its further characters are dropped as they arrive
    (`_suppressing`), as redacting the whole output would have redacted them.
    """

    CONTEXT = 64  # released characters kept for the detectors' look-behind boundaries

    def __init__(self, hook: Hook, output: GuardedOutput):
        super().__init__(hook, output)
        self._suppressing: Detector | None = None  # a secret's run being dropped
        self.scanned = 0  # characters the detectors ran over (linear in the output: tested)

    def _release(self, final: bool) -> str:
        if self._suppressing is not None and not self._drop(final):
            return ""
        ahead = self.lookahead if final else ""  # past the output's end: looked at, never released
        text = self.context + self.pending
        self.scanned += len(text) + len(ahead)
        sk = skeleton(text + ahead)
        floor = len(skeleton(self.context).text)  # where `pending` starts in the skeleton
        end = len(skeleton(text).text) if ahead else len(sk.text)  # where the output ends
        matches = [
            replace(m, end=min(m.end, end))  # a value the stop string cut: redacted up to the cut
            for m in find(sk.text, self.hook.detectors)
            if floor <= m.start < end
        ]
        cut, overflow = end, None
        if not final:
            for detector in self.hook.detectors:
                tail = detector.tail.search(sk.text, floor)
                if tail is None or tail.start() >= cut:
                    continue
                if tail.end() - tail.start() <= detector.hold:
                    cut, overflow = tail.start(), None
                elif detector.overflow == "redact":
                    value = detector.pattern.search(sk.text, tail.start())
                    if value is not None and value.end() == len(sk.text):  # a secret, still growing
                        start = value.start(detector.group) if detector.group else value.start()
                        cut, overflow = start, detector
            for m in matches:
                if m.start < cut < m.end:
                    cut, overflow = m.start, None
        limit = sk.to_original(cut) if cut < len(sk.text) else len(text)
        limit = min(limit, len(text))
        kept = [m for m in matches if m.end <= cut]
        released, counts = redact_skeleton(sk, kept, upto=limit)
        released = released[len(self.context) :]  # kept matches all start after the context
        if overflow is not None:  # the run so far goes as one placeholder; the rest is dropped
            placeholder = f"<{overflow.kind}>"
            released += placeholder
            counts[overflow.kind] = counts.get(overflow.kind, 0) + 1
            self.context = (text[:limit] + placeholder)[-self.CONTEXT :]
            self.pending = ""
            self._suppressing = overflow
        else:
            self.context = text[:limit][-self.CONTEXT :]
            self.pending = text[limit:]
        self._record(self.hook._verdict(counts, text=released))
        return released

    def _drop(self, final: bool) -> bool:
        """Drop what continues the secret being suppressed; True once its run has ended (the
        rest is pending, for the detectors), False while it may still go on."""
        detector = self._suppressing
        self.scanned += len(self.pending)
        if detector.end is not None:  # a PEM block: everything up to its END line
            end = detector.end.search(self.pending)
            if end is None:
                keep = 0 if final else min(len(self.pending), 48)  # a partial END line
                self.pending = self.pending[len(self.pending) - keep :]
                return final
            self.pending = self.pending[end.end() :]
        else:
            sk = skeleton(self.pending)
            run = detector.run.match(sk.text)
            if run.end() == len(sk.text):
                self.pending = ""
                if not final:
                    return False
            else:
                self.pending = self.pending[sk.to_original(run.end()) :]
        self._suppressing = None
        return True
