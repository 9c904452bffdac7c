"""Sampler: logits of a batch of requests -> one next token each, plus the logprobs asked for.

Order of processing, as vLLM and transformers do it: penalties (repetition over prompt and output,
presence and frequency over output), min_tokens EOS masking, then greedy argmax or temperature,
top-k, top-p, min-p and a draw. Draws use the exponential-race trick (argmax of p / Exp(1)), which
is an exact sample from p and, with a per-request torch.Generator, reproducible under a seed.
Returned logprobs are those of the raw model distribution (before penalties and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ownllm.request import Request


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # of the sampled token, raw distribution
    rank: int  # 1 = most likely; 0 when logprobs were not asked for
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob), most likely first


def apply_penalties(logits: torch.Tensor, request: Request) -> torch.Tensor:
    # logits: [vocab] float32
    params = request.sampling_params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and request.output_token_ids:
        ids, counts = torch.tensor(request.output_token_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Sets to -inf the tokens top-k, top-p and min-p exclude. logits: [vocab] (already temperature-scaled)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop = before >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    def __init__(self, eos_token_ids: list[int] | None = None, device: str = "cpu") -> None:
        self.eos_token_ids = set(eos_token_ids or [])
        self.device = device  # the logits', so seeded generators live there
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        if request.request_id not in self._generators:
            self._generators[request.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return self._generators[request.request_id]

    def free(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        # logits: [num_requests, vocab] float32
        raw_logprobs = logits.log_softmax(-1)
        return [self._sample_one(logits[i].clone(), raw_logprobs[i], r) for i, r in enumerate(requests)]

    def _sample_one(self, logits: torch.Tensor, raw: torch.Tensor, request: Request) -> SampleResult:
        params = request.sampling_params
        logits = apply_penalties(logits, request)
        if request.num_output_tokens < params.min_tokens:  # hold back every token that would stop it
            stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            logits[list(stop_ids)] = float("-inf")
        if params.is_greedy:
            token_id = int(logits.argmax())
        else:
            logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
            probs = logits.softmax(-1)
            race = torch.empty_like(probs).exponential_(generator=self._generator(request))
            token_id = int((probs / race).argmax())
        logprob = float(raw[token_id])
        rank, top = 0, None
        if params.logprobs is not None:
            rank = int((raw > raw[token_id]).sum()) + 1
        if params.logprobs:
            values, ids = raw.topk(params.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return SampleResult(token_id, logprob, rank, top)
