"""The one output layer: a sample's answer text, fed as it grows, -> neutral events (content text, reasoning
text, tool-call start and argument fragments) that every API only renders. Streaming and non-streaming take
the same path (a whole answer is one feed), so the two always agree, wherever the text was split.

Text that may still turn out to be a marker (the start of `</think>`, of `<tool_call>`, a JSON answer that
may be a call) is held back until it is decided, so markup never leaks into content; text that was meant to
be a call but does not parse is shown as content at the end, never dropped.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum

from ownllm.parsers.reasoning import ReasoningParser
from ownllm.parsers.tool_parsers import ToolParser


@dataclass
class ContentDelta:
    text: str


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int  # which call of this answer
    id: str
    name: str


@dataclass
class ToolCallArguments:
    index: int
    fragment: str  # the calls' fragments, joined, are its arguments (a JSON object)


Event = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallArguments


class Mode(Enum):
    UNDECIDED = "undecided"  # may start with the reasoning start tag
    REASONING = "reasoning"
    CONTENT = "content"
    TOOLS = "tools"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (held back: it may be the marker)."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return keep
    return 0


class OutputStream:
    """One sample's events. feed(text, final) takes the text added since the last feed."""

    def __init__(self, tool_parser: ToolParser | None = None, reasoning: ReasoningParser | None = None,
                 prompt: str = "") -> None:
        self.tool_parser = tool_parser
        self.reasoning = reasoning
        self.mode = Mode.CONTENT
        if reasoning is not None:
            self.mode = Mode(reasoning.first_phase(prompt))
        self.trim = self.mode is Mode.REASONING  # text starts at its first non-space character
        self.pending = ""  # received text not yet turned into events
        self.content_started = False  # whether content (or a call) came: calls of whole-answer formats start first
        self.after_tools = Mode.CONTENT
        self.num_calls = 0

    def feed(self, text: str, final: bool = False) -> list[Event]:
        self.pending += text
        events: list[Event] = []
        while self._step(events, final):
            pass
        return _coalesced(events)

    def _step(self, events: list[Event], final: bool) -> bool:
        """Turns what it can of `pending` into events; -> whether to go on (the mode changed)."""
        if self.mode is Mode.UNDECIDED:
            head = self.pending.lstrip()
            if head.startswith(self.reasoning.start):
                self.pending = head[len(self.reasoning.start):]
                self.mode, self.trim = Mode.REASONING, True
                return True
            if self.reasoning.start.startswith(head) and not final:
                return False
            self.mode = Mode.CONTENT
            return True
        if self.mode is Mode.REASONING:
            return self._reasoning(events, final)
        if self.mode is Mode.CONTENT:
            return self._content(events, final)
        return self._tools(events, final)

    def _reasoning(self, events: list[Event], final: bool) -> bool:
        if not self._trimmed():
            return False
        end = self.pending.find(self.reasoning.end)
        call = self.tool_parser.find_start(self.pending, False) if self.tool_parser else (len(self.pending), True)
        if call[1] and call[0] < (end if end >= 0 else len(self.pending)):  # a call written while thinking
            events.append(ReasoningDelta(self.pending[: call[0]]))
            self.pending = self.pending[call[0]:]
            self.mode, self.after_tools = Mode.TOOLS, Mode.REASONING
            return True
        if end >= 0:
            events.append(ReasoningDelta(self.pending[:end]))
            self.pending = self.pending[end + len(self.reasoning.end):]
            self.mode, self.trim = Mode.CONTENT, True
            return True
        keep = 0 if final else max(_partial_suffix(self.pending, self.reasoning.end), len(self.pending) - call[0])
        events.append(ReasoningDelta(self.pending[: len(self.pending) - keep]))
        self.pending = self.pending[len(self.pending) - keep:]
        return False

    def _trimmed(self) -> bool:
        """Drops white space where text (re)starts: after `<think>`, `</think>` or calls. -> whether text is left."""
        if self.trim:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return False
            self.trim = False
        return True

    def _content(self, events: list[Event], final: bool) -> bool:
        if not self._trimmed():
            return False
        if self.tool_parser is None:
            self._show(events, len(self.pending))
            return False
        position, certain = self.tool_parser.find_start(self.pending, not self.content_started)
        if position < len(self.pending) and (certain or final):
            self._show(events, position)
            self.mode, self.after_tools = Mode.TOOLS, Mode.CONTENT
            return True
        self._show(events, position)
        return False

    def _show(self, events: list[Event], end: int) -> None:
        if end:
            events.append(ContentDelta(self.pending[:end]))
            self.pending = self.pending[end:]
            self.content_started = True

    def _tools(self, events: list[Event], final: bool) -> bool:
        taken = self.tool_parser.take_calls(self.pending, final)
        if taken is None:  # not a call after all: its first character is text, and the rest is read again
            self.mode = self.after_tools
            text, self.pending = self.pending[:1], self.pending[1:]
            events.append(ContentDelta(text) if self.mode is Mode.CONTENT else ReasoningDelta(text))
            self.content_started = True
            return True
        for call in taken.calls:
            events += [ToolCallStart(self.num_calls, new_call_id(), call.name),
                       ToolCallArguments(self.num_calls, call.arguments)]
            self.num_calls += 1
        self.content_started = self.content_started or bool(taken.calls)
        self.pending = self.pending[taken.consumed:]
        if taken.done:
            self.mode, self.trim = self.after_tools, True
            return bool(self.pending)
        return False


def _coalesced(events: list[Event]) -> list[Event]:
    """Adjacent text events of one kind merged, empty ones dropped."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, (ContentDelta, ReasoningDelta)):
            if not event.text:
                continue
            if merged and type(merged[-1]) is type(event):
                merged[-1] = type(event)(merged[-1].text + event.text)
                continue
        merged.append(event)
    return merged


@dataclass
class Message:
    """A whole answer's events gathered: what a non-streaming response shows."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[tuple[str, str, str]] | None = None  # (id, name, arguments)

    @classmethod
    def of(cls, events: list[Event]) -> "Message":
        message = cls()
        calls: dict[int, list[str]] = {}
        for event in events:
            if isinstance(event, ContentDelta):
                message.content += event.text
            elif isinstance(event, ReasoningDelta):
                message.reasoning += event.text
            elif isinstance(event, ToolCallStart):
                calls[event.index] = [event.id, event.name, ""]
            else:
                calls[event.index][2] += event.fragment
        message.tool_calls = [tuple(c) for c in calls.values()] or None
        return message
