"""A small model with the target's vocabulary drafts tokens, greedily, for every speculating request at once.

It keeps its own paged KV pool, laid out like the target's (same block ids and slots, the draft's own layer
shapes), so the scheduler's blocks serve both. Each proposal first brings the draft's cache up to the
request's tokens (its whole prompt the first time; afterwards the one or two tokens the last step added,
keeping what it had computed for drafts that were accepted), then decodes num_speculative_tokens tokens
in one batched forward each. It writes past the verified tokens into the lookahead slots the scheduler
reserves for it.
"""

from __future__ import annotations

import time

import torch

from ownllm.config import SpeculativeConfig
from ownllm.layers.attention import PagedKVCache
from ownllm.loader import Checkpoint, load_checkpoint
from ownllm.models.registry import model_class
from ownllm.tokenizer import Tokenizer
from ownllm.worker.input_batch import Span, build_inputs


def vocabulary_difference(draft: Tokenizer, target: Tokenizer) -> str | None:
    """Why the draft's token ids do not mean the target's, or None when they do."""
    draft_vocab = draft.backend.get_vocab(with_added_tokens=True)
    target_vocab = target.backend.get_vocab(with_added_tokens=True)
    if len(draft_vocab) != len(target_vocab):
        return f"the draft's tokenizer has {len(draft_vocab)} tokens, the target's {len(target_vocab)}"
    for token, token_id in target_vocab.items():
        if draft_vocab.get(token) != token_id:
            return (f"token {token!r} is id {token_id} for the target but "
                    f"{draft_vocab.get(token, 'absent')} for the draft")
    if set(draft.eos_token_ids) != set(target.eos_token_ids):
        return f"end-of-sequence ids differ: draft {sorted(draft.eos_token_ids)}, target {sorted(target.eos_token_ids)}"
    return None


class DraftModelProposer:
    def __init__(self, config: SpeculativeConfig, runner, target: Checkpoint) -> None:
        draft = load_checkpoint(config.model, runner.config.dtype, keep_quantized=runner.device == "cpu")
        difference = vocabulary_difference(draft.tokenizer, target.tokenizer)
        if difference:
            raise ValueError(f"the draft model {config.model} cannot draft for this model: {difference}")
        cls = model_class(draft.config.architecture)
        self.model = cls.from_tensors(draft.config, draft.tensors, runner.backends)  # the target's dtype
        if torch.device(runner.device).type != "cpu":
            self.model.to(runner.device)
        self.kv_cache = PagedKVCache(cls.kv_cache_spec(draft.config), runner.num_blocks, runner.block_size,
                                     getattr(torch, draft.config.dtype), runner.device)
        self.attention_backend = runner.backends.attention
        self.vocab_size = runner.config.vocab_size  # draft logits past it (padding) are never proposed
        self.num_tokens = config.num_speculative_tokens
        self.device = runner.device
        # per request: tokens whose KV the draft holds, then the drafts it wrote KV for after them
        self.computed: dict[str, tuple[int, list[int]]] = {}
        self.forward_seconds = 0.0  # a decode forward of the draft model (decayed mean)

    def cost_per_draft(self, step_seconds: float) -> float:
        """A drafted token's time over the target step's: one decode forward of the draft model."""
        return self.forward_seconds / step_seconds if self.forward_seconds and step_seconds else 0.3

    def free(self, request_id: str) -> None:
        self.computed.pop(request_id, None)

    def _num_valid(self, state) -> int:
        """Tokens of the request whose KV in the draft's cache is still right: those it computed, and the drafts
        it wrote after them as far as they were accepted."""
        num_computed, written = self.computed.get(state.request_id, (0, []))
        for draft in written:
            if num_computed < len(state.token_ids) - 1 and state.token_ids[num_computed] == draft:
                num_computed += 1
            else:
                break
        return min(num_computed, len(state.token_ids) - 1)

    def _forward(self, spans: list[Span], last_rows: list[int]) -> list[int]:
        input_ids, meta = build_inputs(spans, self.kv_cache, self.attention_backend, self.device)
        hidden = self.model(input_ids, meta)  # [T, hidden]
        logits = self.model.compute_logits(hidden[last_rows])[:, : self.vocab_size]  # [B, vocab]
        return logits.argmax(-1).tolist()

    @torch.inference_mode()
    def propose(self, states) -> dict[str, list[int]]:
        # each request drafts its draft_length.next tokens, which must fit its blocks: the scheduler reserved
        # num_speculative_tokens slots past its end
        slots = self.kv_cache.block_size
        wanted = {s.request_id: s.draft_length.next for s in states}
        states = [s for s in states if wanted[s.request_id] and len(s.block_ids) * slots >= len(s.token_ids) + self.num_tokens - 1]
        if not states:
            return {}
        spans, last_rows, num_rows = [], [], 0
        for state in states:
            start = self._num_valid(state)
            spans.append(Span(state.token_ids[start:], start, state.block_ids))
            num_rows += len(state.token_ids) - start
            last_rows.append(num_rows - 1)
        drafts = {s.request_id: [token] for s, token in zip(states, self._forward(spans, last_rows))}
        for step in range(1, self.num_tokens):
            going = [s for s in states if wanted[s.request_id] > step]
            if not going:
                break
            spans = [Span([drafts[s.request_id][-1]], len(s.token_ids) + step - 1, s.block_ids) for s in going]
            started = time.perf_counter()
            for state, token in zip(going, self._forward(spans, list(range(len(spans))))):
                drafts[state.request_id].append(token)
            elapsed = time.perf_counter() - started
            self.forward_seconds = 0.8 * self.forward_seconds + 0.2 * elapsed if self.forward_seconds else elapsed
        for state in states:
            self.computed[state.request_id] = (len(state.token_ids), drafts[state.request_id][:-1])
        return drafts
