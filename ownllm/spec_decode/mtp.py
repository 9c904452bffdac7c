"""DeepSeek-V3's multi-token-prediction layer drafts for its own model ({"method": "mtp"}), greedily, for every
speculating request at once.

The layer at position i reads the target's hidden state h_i and the token t_{i+1}, so it keeps pace with the
target: after every step (`observe`) it computes its own KV for each position the target just computed whose
next token is known (a prompt chunk's positions; a decode's last token and the drafts it accepted), reading
the target's hidden states of that step. Its cache is a one-layer paged pool on the target's block ids and
slots, like a draft model's. Its output at a request's newest position gives the first draft; each further
draft feeds the layer its own output and the draft before (writing the lookahead slots the scheduler reserves;
the target's next step rewrites them). Positions a prefix-cache hit skipped keep the KV the request that filled
those blocks wrote: the same tokens, except at a block's last position, whose next token may differ (a draft a
little less likely to be right, never a wrong output).
"""

from __future__ import annotations

import time

import torch

from ownllm.config import SpeculativeConfig
from ownllm.layers.attention import PagedKVCache
from ownllm.loader import Checkpoint
from ownllm.models.deepseek_v3_mtp import DeepseekV3MTP, has_mtp_tensors
from ownllm.worker.input_batch import Span, build_inputs


class MTPProposer:
    reads_hidden_states = True  # the runner hands `observe` each step's hidden states before the final norm

    def __init__(self, config: SpeculativeConfig, runner, target: Checkpoint) -> None:
        model_config = target.config
        if model_config.architecture != "DeepseekV3ForCausalLM" or not has_mtp_tensors(model_config, target.tensors):
            raise ValueError(f"speculative method 'mtp' needs a model with multi-token-prediction layers; "
                             f"{target.path} ({model_config.architecture}) has none")
        self.model = DeepseekV3MTP.from_tensors(model_config, target.tensors, runner.backends)
        if torch.device(runner.device).type != "cpu":
            self.model.to(runner.device)
        self.kv_cache = PagedKVCache(DeepseekV3MTP.kv_cache_spec(model_config), runner.num_blocks, runner.block_size,
                                     runner.dtype, runner.device)
        self.attention_backend = runner.backends.attention
        self.num_tokens = config.num_speculative_tokens
        self.device = runner.device
        self.prior_cost = 1 / model_config.num_hidden_layers  # one layer of the target's, before it is measured
        self.newest: dict[str, tuple[int, torch.Tensor]] = {}  # per request: (position, the layer's output there)
        self.forward_seconds = 0.0  # a chained draft step (decayed mean)

    def cost_per_draft(self, step_seconds: float) -> float:
        """A drafted token's time over the target step's."""
        return self.forward_seconds / step_seconds if self.forward_seconds and step_seconds else self.prior_cost

    def free(self, request_id: str) -> None:
        self.newest.pop(request_id, None)

    def _forward(self, spans: list[Span], previous_hidden: torch.Tensor) -> torch.Tensor:
        input_ids, meta = build_inputs(spans, self.kv_cache, self.attention_backend, self.device)
        return self.model(input_ids, previous_hidden, meta)  # [T, hidden]

    def observe(self, scheduled: list[tuple], hidden: torch.Tensor) -> None:
        """scheduled: (state, span, first row) of each request the target just computed, its tokens extended by
        what it accepted; hidden: [T, hidden] the target's hidden states before its final norm, rows in order."""
        spans, rows, ends = [], [], []
        for state, span, first_row in scheduled:
            num_valid = min(len(span.token_ids), len(state.token_ids) - 1 - span.start)  # next token known
            if num_valid <= 0:
                continue
            spans.append(Span(state.token_ids[span.start + 1 : span.start + 1 + num_valid], span.start, state.block_ids))
            rows.append(torch.arange(first_row, first_row + num_valid))
            ends.append((state.request_id, span.start + num_valid - 1))
        if not spans:
            return
        out = self._forward(spans, hidden[torch.cat(rows).to(hidden.device)])  # [T', hidden]
        last = 0
        for span, (request_id, position) in zip(spans, ends):
            last += len(span.token_ids)
            self.newest[request_id] = (position, out[last - 1].clone())  # not a view holding all of `out`

    @torch.inference_mode()
    def propose(self, states) -> dict[str, list[int]]:
        # a request drafts when the layer has seen its newest token (position len - 2 holds it as t_{i+1}) and
        # its blocks hold the chained drafts' slots (up to position len + k - 3: the scheduler's lookahead)
        slots = self.kv_cache.block_size
        wanted = {s.request_id: s.draft_length.next for s in states}
        states = [s for s in states if wanted[s.request_id] and s.request_id in self.newest
                  and self.newest[s.request_id][0] == len(s.token_ids) - 2
                  and len(s.block_ids) * slots >= len(s.token_ids) + self.num_tokens - 2]
        if not states:
            return {}
        hidden = torch.stack([self.newest[s.request_id][1] for s in states])  # [B, hidden]
        tokens = self.model.compute_logits(hidden).argmax(-1).tolist()
        drafts = {s.request_id: [token] for s, token in zip(states, tokens)}
        for step in range(1, self.num_tokens):
            going = [i for i, s in enumerate(states) if wanted[s.request_id] > step]
            if not going:
                break
            started = time.perf_counter()
            spans = [Span([drafts[states[i].request_id][-1]], len(states[i].token_ids) + step - 2, states[i].block_ids)
                     for i in going]
            hidden = self._forward(spans, hidden[going])  # [B', hidden]
            states = [states[i] for i in going]
            for state, token in zip(states, self.model.compute_logits(hidden).argmax(-1).tolist()):
                drafts[state.request_id].append(token)
            elapsed = time.perf_counter() - started
            self.forward_seconds = 0.8 * self.forward_seconds + 0.2 * elapsed if self.forward_seconds else elapsed
        return drafts
