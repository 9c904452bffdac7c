"""StructuredOutputManager: the per-request constraints on which tokens may be sampled, as one bitmask per step.

Two kinds of constraint share the step's bitmask slot (SchedulerOutput.allowed_token_bitmask):
- a grammar (structured outputs: JSON schema, regex, choice, Lark), compiled when the request is added so a
  schema the backend cannot compile refuses that request alone;
- reasoning phases of a thinking model: the grammar starts only after the reasoning ends (a request whose
  answer may open with `<think>` may sample it first), and a thinking budget ends the reasoning itself once
  spent by allowing only the end-of-thinking token (s1's budget forcing; llama.cpp's reasoning budget).

Requests with neither have no state here and cost nothing; a step without constrained rows has no bitmask.
Constrained requests are not speculated on (their drafts would need masks per draft position).

A step's masks are filled on a background thread while the step's forward runs (`bitmask_async`: llguidance
fills with the GIL released); the runner waits for them just before it samples.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ownllm.outputs import SchedulerOutput
from ownllm.request import Request


PROMPT_TAIL = 3  # a reasoning tag this close to the prompt's end opens or closes the answer's block


class Phase(enum.Enum):
    UNDECIDED = enum.auto()  # the answer may open a reasoning block
    REASONING = enum.auto()
    ANSWER = enum.auto()


@dataclass(frozen=True)
class ReasoningTokens:
    """The single tokens that open and close a reasoning block in this vocabulary."""

    start: int
    end: int


@dataclass
class Constraint:
    grammar: object | None  # a structured_output.Grammar
    phase: Phase
    budget: int | None
    num_reasoning_tokens: int = 0


class StructuredOutputManager:
    def __init__(self, vocab_size: int, compile_grammar: Callable | None = None,
                 reasoning: ReasoningTokens | None = None) -> None:
        """compile_grammar: StructuredOutputsParams -> Grammar (a backend's compile), made on first use."""
        self.vocab_size = vocab_size
        self.compile_grammar = compile_grammar
        self.reasoning = reasoning
        self.constraints: dict[str, Constraint] = {}
        self._filler: ThreadPoolExecutor | None = None  # the thread that fills masks during the forward

    def add(self, request: Request) -> None:
        """Compiles the request's grammar (ValueError when it cannot be) and sets its starting phase."""
        params = request.sampling_params
        if params.structured_outputs is None and params.thinking_budget is None:
            return
        if params.thinking_budget is not None and self.reasoning is None:
            raise ValueError("thinking_budget needs a model that reasons (a chat template with <think>...</think>)")
        if params.structured_outputs is not None and self.compile_grammar is None:
            raise ValueError("structured outputs are not available on this engine")
        grammar = self.compile_grammar(params.structured_outputs) if params.structured_outputs else None
        self.constraints[request.request_id] = Constraint(grammar, self._first_phase(request.prompt_token_ids),
                                                          params.thinking_budget)

    def _first_phase(self, prompt: list[int]) -> Phase:
        """As parsers.reasoning's first_phase, on token ids: a prompt ending (but for a few tokens of white space)
        by opening a block starts inside it, one ending by closing a block starts at the answer."""
        if self.reasoning is None:
            return Phase.ANSWER
        tail = prompt[-PROMPT_TAIL:]
        if self.reasoning.start in tail or self.reasoning.end in tail:
            last = next(t for t in reversed(tail) if t in (self.reasoning.start, self.reasoning.end))
            return Phase.REASONING if last == self.reasoning.start else Phase.ANSWER
        return Phase.UNDECIDED

    def is_constrained(self, request_id: str) -> bool:
        return request_id in self.constraints

    def bitmask(self, scheduler_output: SchedulerOutput, requests: dict[str, Request]) -> np.ndarray | None:
        """[sampled rows of the step, ceil(vocab / 32)] int32, rows in batch order (a request with k drafts
        samples k + 1 rows), or None when no sampled row is constrained."""
        rows = self._rows(scheduler_output, requests)
        return self._filled(*rows) if rows else None

    def bitmask_async(self, scheduler_output: SchedulerOutput, requests: dict[str, Request]) -> Future | None:
        """The step's bitmask, filled on a background thread (None when no sampled row is constrained). The
        constraints must not advance before it is done: the runner takes its result before sampling."""
        rows = self._rows(scheduler_output, requests)
        if not rows:
            return None
        if self._filler is None:
            self._filler = ThreadPoolExecutor(1, thread_name_prefix="ownllm-masks")
        return self._filler.submit(self._filled, *rows)

    def _rows(self, scheduler_output: SchedulerOutput,
              requests: dict[str, Request]) -> tuple[int, list[tuple[int, Constraint]]] | None:
        """(number of sampled rows, [(row, constraint) of the constrained ones]), or None when there are none."""
        if not self.constraints:  # the common step: no pass over the batch
            return None
        rows: list[tuple[int, Constraint]] = []
        num_rows = 0
        for request_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = requests[request_id]
            num_drafts = len(scheduler_output.draft_token_ids.get(request_id, ()))
            if request.num_computed_tokens + num_scheduled < request.num_tokens + num_drafts:
                continue  # a prompt chunk short of the end samples nothing
            constraint = self.constraints.get(request_id)
            if constraint is not None:
                rows.append((num_rows, constraint))
            num_rows += 1 + num_drafts
        return (num_rows, rows) if rows else None

    def _filled(self, num_rows: int, rows: list[tuple[int, Constraint]]) -> np.ndarray:
        bitmask = np.full((num_rows, (self.vocab_size + 31) // 32), -1, dtype=np.int32)
        for row, constraint in rows:
            self._fill(bitmask, row, constraint)
        return bitmask

    def _fill(self, bitmask: np.ndarray, row: int, constraint: Constraint) -> None:
        if constraint.phase is Phase.REASONING:
            if constraint.budget is not None and constraint.num_reasoning_tokens >= constraint.budget:
                bitmask[row] = 0  # the budget is spent: only the end of the reasoning may come
                _allow(bitmask, row, self.reasoning.end)
            return
        if constraint.grammar is None:
            return
        constraint.grammar.fill_bitmask(bitmask, row)
        if constraint.phase is Phase.UNDECIDED:
            _allow(bitmask, row, self.reasoning.start)

    def advance(self, request_id: str, token_ids: list[int]) -> None:
        """Takes the tokens a request kept this step."""
        constraint = self.constraints.get(request_id)
        for token_id in token_ids if constraint else ():
            if constraint.phase is Phase.UNDECIDED:
                constraint.phase = Phase.REASONING if token_id == self.reasoning.start else Phase.ANSWER
                if constraint.phase is Phase.REASONING:
                    continue
            if constraint.phase is Phase.REASONING:
                constraint.num_reasoning_tokens += 1
                if token_id == self.reasoning.end:
                    constraint.phase = Phase.ANSWER
            elif constraint.grammar is not None:
                constraint.grammar.accept([token_id])

    def remove(self, request_id: str) -> None:
        self.constraints.pop(request_id, None)


def _allow(bitmask: np.ndarray, row: int, token_id: int) -> None:
    word = bitmask[row, token_id // 32 : token_id // 32 + 1].view(np.uint32)
    word |= np.uint32(1 << (token_id % 32))
