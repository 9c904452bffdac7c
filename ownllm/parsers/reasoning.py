"""Reasoning parsers: where a thinking model's reasoning text starts and ends, registered by name and chosen
from the chat template (`--reasoning-parser NAME` overrides).

Qwen3 and DeepSeek-R1 write `<think>...</think>`; templates that open the block in the prompt (DeepSeek-R1,
Qwen3's thinking variants) make the answer start inside it, and a template that closes an empty block in the
prompt (Qwen3 with enable_thinking false) makes the answer start after it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    start: str = "<think>"
    end: str = "</think>"

    def first_phase(self, prompt: str) -> str:
        """Where the answer begins: "reasoning" when the prompt ends by opening a block, "content" when it ends
        by closing one (thinking switched off), else "undecided" (the answer may open one itself)."""
        tail = prompt.rstrip()
        if tail.endswith(self.start):
            return "reasoning"
        return "content" if tail.endswith(self.end) else "undecided"

    def tag_token_ids(self, tokenizer) -> tuple[int, int] | None:
        """(start, end) as single tokens of the tokenizer's vocabulary, or None when either takes several."""
        start, end = (tokenizer.encode(tag, add_special_tokens=False) for tag in (self.start, self.end))
        return (start[0], end[0]) if len(start) == len(end) == 1 else None


REASONING_PARSERS: dict[str, ReasoningParser] = {
    name: ReasoningParser(name) for name in ("qwen3", "deepseek_r1")
}


def reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}")
    return REASONING_PARSERS[name]


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    if not chat_template or "</think>" not in chat_template:
        return None
    return "deepseek_r1" if "｜Assistant｜" in chat_template else "qwen3"
