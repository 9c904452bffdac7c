"""The xgrammar grammar backend (the optional extra `ownllm[xgrammar]`; `--structured-outputs-backend xgrammar`):
JSON schemas, regexes, choices and Lark grammars compiled by xgrammar against the model's vocabulary, read
from the same `tokenizers` backend the engine uses (GGUF vocabularies included). Masks are filled straight into
the step's numpy bitmask, in the layout llguidance uses too.

Strict tools under tool_choice auto write their grammars in llguidance's Lark dialect (`%json`, token ids),
which xgrammar does not read: with this backend such a request is refused with the compile error.
"""

from __future__ import annotations

import json
from functools import cached_property

import numpy as np
import xgrammar

from ownllm.sampling_params import StructuredOutputsParams
from ownllm.structured_output import GRAMMAR_BACKENDS, bounded_schema
from ownllm.tokenizer import Tokenizer

MAX_JSON_WHITESPACE = 16  # as the llguidance backend's JSON: a run of white space is bounded


class XGrammarGrammar:
    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self.matcher = matcher

    def accept(self, token_ids: list[int]) -> bool:
        return all(self.matcher.accept_token(token_id) for token_id in token_ids)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @cached_property
    def compiler(self) -> xgrammar.GrammarCompiler:
        vocab = self.tokenizer.backend.get_vocab(with_added_tokens=True)
        encoded = [""] * self.vocab_size
        for token, token_id in vocab.items():
            if token_id < self.vocab_size:
                encoded[token_id] = token
        # the vocabulary's encoding (byte-level, byte fallback, raw) and prefix space, read as xgrammar reads them
        # from a Hugging Face tokenizer
        metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(self.tokenizer.backend.to_str())
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        info = xgrammar.TokenizerInfo(encoded, metadata["vocab_type"], vocab_size=self.vocab_size,
                                      stop_token_ids=list(self.tokenizer.eos_token_ids),
                                      add_prefix_space=metadata["add_prefix_space"])
        return xgrammar.GrammarCompiler(info)

    def compile(self, spec: StructuredOutputsParams) -> XGrammarGrammar:
        compiler = self.compiler
        try:
            compiled = self._compile(compiler, spec)
        except Exception as error:  # xgrammar raises RuntimeError and ValueError subclasses alike
            raise ValueError(f"{spec.source} cannot be compiled: {str(error).splitlines()[0]}") from None
        return XGrammarGrammar(xgrammar.GrammarMatcher(compiled))

    @staticmethod
    def _compile(compiler: xgrammar.GrammarCompiler, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        if spec.json is not None or spec.json_object:
            schema = {"type": "object"} if spec.json_object else spec.json
            schema = bounded_schema(json.loads(schema) if isinstance(schema, str) else schema, as_pattern=True)
            return compiler.compile_json_schema(json.dumps(schema),
                                                max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if spec.regex is not None:
            return compiler.compile_regex(spec.regex)
        if spec.choice is not None:
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
        return compiler.compile_lark(spec.grammar)


GRAMMAR_BACKENDS["xgrammar"] = XGrammarBackend
