"""Reading tool calls back out of a model's output as it streams: content, and each call's id,
name and arguments, in the call format of `service.serving.tools`. The tool grammar fixes every
literal of the calls' part, so the parser follows them exactly; text that leaves the format (a
post hook changed it) ends the calls there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.serving.tools import ToolFormat, new_call_id


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass
class Piece:
    """What a slice of text said: content, the start of call `index`, or arguments of it."""

    content: str = ""
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Content and calls from an output in `fmt`, fed as it streams."""

    fmt: ToolFormat
    openings: tuple[str, ...]  # how the calls' part starts in the decoded text
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    text: str = ""  # everything fed
    _buffer: str = ""
    _state: str = "undecided"  # content | head | name | args | tail | between | done | broken
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    @classmethod
    def for_tokenizer(cls, fmt: ToolFormat, tokenizer: Any) -> ToolCallParser:
        """Decoding drops special tokens: a prefix spelled by one ([TOOL_CALLS] in Mistral's
        tokenizers) is absent from the text, so the parser does not wait for it."""
        specials = set(getattr(tokenizer, "all_special_tokens", ()) or ())
        prefix = fmt.prefix
        for special in specials:
            if special and prefix.startswith(special):
                prefix = prefix[len(special) :]
                break
        return cls(fmt, (prefix + fmt.call_open,))

    def feed(self, text: str, *, final: bool = False) -> list[Piece]:
        """What `text` says; `final`: it is the output's last (a held-back opening that never
        completed is content after all)."""
        self.text += text
        self._buffer += text
        pieces: list[Piece] = []
        while self._advance(pieces):
            pass
        if final and self._state == "undecided" and self._buffer:
            self._state = "content"
            self._advance(pieces)
        return pieces

    @property
    def complete_calls(self) -> list[ParsedCall]:
        """The calls, if the output was calls and each ended; else none."""
        if self._state in ("between", "done") and self.calls and all(c.complete for c in self.calls):
            return self.calls
        return []

    def _advance(self, pieces: list[Piece]) -> bool:
        state, buffer = self._state, self._buffer
        if state == "undecided":
            for opening in self.openings:
                if buffer.startswith(opening):
                    self._buffer, self._state = buffer[len(opening) :], "head"
                    return True
            if buffer and not any(o.startswith(buffer) for o in self.openings):
                self._state = "content"
                return True
            return False
        if state in ("content", "broken", "done"):
            if buffer:
                self.content += buffer
                self._buffer = ""
                if state == "content":
                    pieces.append(Piece(content=buffer))
            return False
        if state == "head":
            return self._expect('{"name": "', "name")
        if state == "name":
            end = buffer.find('"')
            if end < 0:
                return False
            call = ParsedCall(new_call_id(self.fmt), buffer[:end])
            self.calls.append(call)
            pieces.append(Piece(index=len(self.calls) - 1, id=call.id, name=call.name))
            self._buffer, self._state = buffer[end + 1 :], "after_name"
            return True
        if state == "after_name":
            return self._expect(f', "{self.fmt.arguments_key}": ', "args")
        if state == "args":
            return self._arguments(pieces)
        if state == "tail":
            return self._expect("}" + self.fmt.call_close, "between")
        # between calls: another, the suffix, or the end
        following = self.fmt.separator + self.fmt.call_open
        if buffer.startswith(following):
            self._buffer, self._state = buffer[len(following) :], "head"
            return True
        if self.fmt.suffix and buffer.startswith(self.fmt.suffix):
            self._buffer, self._state = buffer[len(self.fmt.suffix) :], "done"
            return True
        if buffer and not following.startswith(buffer) and not self.fmt.suffix.startswith(buffer):
            self._state = "broken"
            return True
        return False

    def _expect(self, literal: str, then: str) -> bool:
        if self._buffer.startswith(literal):
            self._buffer, self._state = self._buffer[len(literal) :], then
            return True
        if not literal.startswith(self._buffer):
            self._state = "broken"  # not the grammar's text (a post hook changed it)
            return True
        return False

    def _arguments(self, pieces: list[Piece]) -> bool:
        """Stream the arguments' JSON up to the end of its object."""
        call = self.calls[-1]
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    piece = self._buffer[: i + 1]
                    call.arguments += piece
                    call.complete = True
                    pieces.append(Piece(index=len(self.calls) - 1, arguments=piece))
                    self._buffer, self._state = self._buffer[i + 1 :], "tail"
                    return True
        if self._buffer:
            call.arguments += self._buffer
            pieces.append(Piece(index=len(self.calls) - 1, arguments=self._buffer))
            self._buffer = ""
        return False
