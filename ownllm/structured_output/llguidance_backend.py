"""The llguidance grammar backend: JSON schemas, regexes, choices and Lark grammars compiled against the model's
vocabulary (its tokenizer built once per model from the serialized `tokenizers` JSON, GGUF vocabularies
included). Masks are filled straight into the step's numpy bitmask, with the GIL released.
"""

from __future__ import annotations

import json
from functools import cached_property

import llguidance
import llguidance.numpy
import numpy as np

from ownllm.sampling_params import StructuredOutputsParams
from ownllm.structured_output import GRAMMAR_BACKENDS, bounded_schema
from ownllm.tokenizer import Tokenizer


# JSON may be laid out freely, but a run of white space is bounded: a small model that prefers spaces to the
# next value would otherwise write them until max_tokens (a known failure of unbounded JSON white space)
JSON_OPTIONS = {"whitespace_pattern": r"[\n ]{0,16}"}


class LLGuidanceGrammar:
    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_ids: list[int]) -> bool:
        return self.matcher.consume_tokens(token_ids)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()


class LLGuidanceBackend:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @cached_property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:  # about a second for a 150k vocabulary: built on first use
        return llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                      eos_token=self.tokenizer.eos_token_ids or None)

    def compile(self, spec: StructuredOutputsParams) -> LLGuidanceGrammar:
        grammar = _grammar(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise ValueError(f"{spec.source} cannot be compiled: {messages[0]}")
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{spec.source} cannot be compiled: {matcher.get_error()}")
        return LLGuidanceGrammar(matcher)


def _grammar(spec: StructuredOutputsParams) -> str:
    if spec.json is not None or spec.json_object:
        schema = {"type": "object"} if spec.json_object else spec.json
        try:
            schema = bounded_schema(json.loads(schema) if isinstance(schema, str) else schema)
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as error:
            raise ValueError(f"{spec.source} is not a valid JSON schema: {error}") from None
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(choice) for choice in spec.choice))
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


GRAMMAR_BACKENDS["llguidance"] = LLGuidanceBackend
