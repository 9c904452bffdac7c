"""An answer's events (parsers/events.py) as a sequence of typed blocks: reasoning, text, and one block per tool
call, a new block whenever the kind changes. Anthropic's content blocks and the Responses API's output items are
such blocks; both APIs read answers through this one splitter, streaming or not, so their two forms agree.
It only groups events; rendering is each API's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ownllm.parsers.events import ContentDelta, Event, ReasoningDelta, ToolCallStart

BlockKind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    kind: BlockKind
    index: int  # its position among the answer's blocks
    text: str = ""  # reasoning or text, or a call's arguments (JSON text)
    call_id: str | None = None
    name: str | None = None


@dataclass
class BlockChange:
    """What happened to a block: it opened, grew by `text`, or closed."""

    kind: Literal["open", "delta", "close"]
    block: Block
    text: str = ""


@dataclass
class BlockSplitter:
    blocks: list[Block] = field(default_factory=list)
    is_open: bool = False

    def feed(self, events: list[Event]) -> list[BlockChange]:
        changes: list[BlockChange] = []
        for event in events:
            if isinstance(event, ToolCallStart):
                changes += self._open(Block("tool_call", len(self.blocks), call_id=event.id, name=event.name))
                continue
            kind: BlockKind = ("reasoning" if isinstance(event, ReasoningDelta) else
                               "text" if isinstance(event, ContentDelta) else "tool_call")
            text = event.fragment if kind == "tool_call" else event.text
            if kind != "tool_call" and not (self.is_open and self.blocks[-1].kind == kind):
                changes += self._open(Block(kind, len(self.blocks)))
            self.blocks[-1].text += text
            changes.append(BlockChange("delta", self.blocks[-1], text))
        return changes

    def close(self) -> list[BlockChange]:
        """The last block's close, once the answer has ended."""
        if not self.is_open:
            return []
        self.is_open = False
        return [BlockChange("close", self.blocks[-1])]

    def _open(self, block: Block) -> list[BlockChange]:
        changes = self.close()
        self.blocks.append(block)
        self.is_open = True
        return changes + [BlockChange("open", block)]


def answer_blocks(events: list[Event]) -> list[Block]:
    """A whole answer's blocks (what a non-streaming response shows)."""
    splitter = BlockSplitter()
    splitter.feed(events)
    return splitter.blocks
