"""Sampler: the logits rows of one step -> one token each, plus the logprobs asked for, as batched tensor code.

Each sampled row (a request's next position, or each position it verifies drafts at) has its settings in one
SamplingMetadata of tensors, built once per step. Order of processing, as vLLM and transformers do it:
penalties (repetition over prompt and output, presence and frequency over output), min_tokens stop-id
masking, the allowed-token bitmask (grammars), then greedy argmax or temperature, top-k, top-p, min-p and a
draw. A draw inverts the row's CDF at one uniform number (_inverse_cdf), an exact sample from p; a seeded
request's rows draw from its own torch.Generator, so the same seed gives the same tokens whatever else is in the
batch.
Returned logprobs are those of the raw model distribution (before penalties and temperature).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ownllm.outputs import SampleLogprobs
from ownllm.sampling_params import SamplingParams

NEG_INF = float("-inf")
CDF_BLOCK = 256  # entries a draw's second running sum covers (see _inverse_cdf)
CANDIDATES = 1024  # the most likely tokens a filtered row samples among, when what it keeps lies among them


@dataclass
class SamplingRow:
    """What one logits row needs: its request's params and token history (the drafts before the row count as
    output); the histories are sliced only when a penalty needs them."""

    params: SamplingParams
    token_ids: list[int]  # the request's prompt and output tokens
    num_prompt_tokens: int
    drafts_before: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :] + self.drafts_before

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens + len(self.drafts_before)


@dataclass
class Penalties:
    """Penalties touch only the tokens a row has seen, so they are applied to those alone: each penalized row's
    distinct prompt and output token ids, padded to one width by repeating its first (which then computes and
    writes the same value again)."""

    rows: torch.Tensor  # [P, 1] rows with a penalty
    token_ids: torch.Tensor  # [P, W] the tokens each has seen, in the prompt or the output
    output_counts: torch.Tensor  # [P, W] float32: how often each is in the output
    repetition: torch.Tensor  # [P, 1]
    presence: torch.Tensor  # [P, 1]
    frequency: torch.Tensor  # [P, 1]

    @classmethod
    def build(cls, rows: list[int], histories: list[tuple[list[int], list[int]]], params: list[SamplingParams],
              device) -> "Penalties":
        """histories: each row's (prompt token ids, output token ids)."""
        ids, counts = [], []
        for prompt, output in histories:
            seen = Counter(output)
            row_ids = list(seen.keys() | set(prompt)) or [0]
            ids.append(row_ids)
            counts.append([float(seen[t]) for t in row_ids])
        width = max(len(r) for r in ids)

        def padded(values: list[list], dtype) -> torch.Tensor:
            return torch.tensor([v + v[:1] * (width - len(v)) for v in values], dtype=dtype, device=device)

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

        return cls(torch.tensor(rows, dtype=torch.long, device=device)[:, None], padded(ids, torch.long),
                   padded(counts, torch.float32), column([p.repetition_penalty for p in params]),
                   column([p.presence_penalty for p in params]), column([p.frequency_penalty for p in params]))

    def apply(self, logits: torch.Tensor) -> None:
        # logits: [R, vocab] float32, changed in place
        values = logits[self.rows, self.token_ids]  # [P, W]
        values = torch.where(values > 0, values / self.repetition, values * self.repetition)
        values -= self.frequency * self.output_counts + self.presence * (self.output_counts > 0)
        logits[self.rows, self.token_ids] = values


@dataclass
class SamplingMetadata:
    """One step's sampling settings for R rows. Optional parts are None when no row uses them."""

    temperature: torch.Tensor  # [random rows, 1] float32
    greedy_rows: list[int]
    random_rows: list[int]
    top_k: torch.Tensor  # [random rows] long, 0 = off
    top_p: torch.Tensor  # [random rows] float32, 1 = off
    min_p: torch.Tensor  # [random rows] float32, 0 = off
    filtered: list[int]  # random rows with top-k, top-p or min-p
    generators: dict[int, torch.Generator]  # random row -> its request's seeded generator
    penalties: Penalties | None
    stop_masks: list[tuple[int, list[int]]]  # (row, token ids it may not sample yet: min_tokens)
    allowed_token_bitmask: torch.Tensor | None  # [R, ceil(vocab / 32)] int32
    num_logprobs: list[int | None]  # per row: top alternatives asked for (None: no logprobs)

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab: int, eos_token_ids: set[int], device="cpu",
              allowed_token_bitmask=None) -> "SamplingMetadata":
        params = [r.params for r in rows]
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        randoms = [params[i] for i in random_rows]

        def column(values: list, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 or p.presence_penalty
                     or p.frequency_penalty]
        penalties = None
        if penalized:
            penalties = Penalties.build(penalized, [(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in penalized],
                                        [params[i] for i in penalized], device)
        stop_masks = []
        for i, (row, p) in enumerate(zip(rows, params)):
            if row.num_output_tokens < p.min_tokens:
                stop_masks.append((i, sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else eos_token_ids))))
        bitmask = allowed_token_bitmask
        if bitmask is not None and not isinstance(bitmask, torch.Tensor):
            bitmask = torch.as_tensor(bitmask, dtype=torch.int32, device=device)
        return cls(
            temperature=column([[p.temperature] for p in randoms]),
            greedy_rows=[i for i, p in enumerate(params) if p.is_greedy], random_rows=random_rows,
            top_k=column([p.top_k for p in randoms], torch.long), top_p=column([p.top_p for p in randoms]),
            min_p=column([p.min_p for p in randoms]),
            filtered=[j for j, p in enumerate(randoms) if p.top_k or p.top_p < 1 or p.min_p],
            generators={j: rows[i].generator for j, i in enumerate(random_rows) if rows[i].generator is not None},
            penalties=penalties, stop_masks=stop_masks, allowed_token_bitmask=bitmask,
            num_logprobs=[p.logprobs for p in params],
        )


# [256, 8] bool: bit j of byte value b is 0 (token banned)
_BANNED_BITS = torch.tensor([[not (b >> j) & 1 for j in range(8)] for b in range(256)])


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets to -inf, in place, every token whose bit is 0. logits: [R, vocab]; bitmask: [R, ceil(vocab / 32)] int32,
    token t's bit is bit t % 32 of word t // 32 (xgrammar's and llguidance's layout).
    A grammar bans most words whole (0) and allows a few whole (-1): those take one broadcast fill; only the few
    mixed words are expanded bit by bit."""
    num_rows, vocab = logits.shape
    num_words = vocab // 32
    by_word = logits[:, : num_words * 32].view(num_rows, num_words, 32)  # [R, W, 32], a view of logits
    words = bitmask[:, :num_words]  # [R, W]
    by_word.masked_fill_((words == 0).unsqueeze(-1), NEG_INF)
    rows, cols = ((words != 0) & (words != -1)).nonzero(as_tuple=True)  # [P] each: the mixed words
    if len(rows):
        codes = words[rows, cols].contiguous().view(torch.uint8).int()  # [P * 4], little-endian bytes
        banned = _BANNED_BITS.to(logits.device).index_select(0, codes).view(-1, 32)  # [P, 32]
        by_word[rows, cols] = by_word[rows, cols].masked_fill(banned, NEG_INF)
    if vocab % 32:  # the last, partly used word
        bits = torch.arange(vocab % 32, dtype=torch.int32, device=logits.device)
        logits[:, num_words * 32 :].masked_fill_(((bitmask[:, num_words, None] >> bits) & 1) == 0, NEG_INF)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                  min_p: torch.Tensor | None) -> torch.Tensor:
    """Sets to -inf the tokens top-k, top-p and min-p exclude, row by row, over the whole vocabulary (the reference
    `draw` is checked against). logits: [R, vocab] (temperature-scaled); top_k: [R] (0 off), top_p: [R] (1 off),
    min_p: [R] (0 off); each may be None."""
    if top_p is not None and bool((top_p >= 1).all()):
        top_p = None
    if min_p is not None and not bool(min_p.any()):
        min_p = None
    if top_k is not None and not bool(top_k.any()):
        top_k = None
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
        values = logits.topk(int(k.max()), dim=-1).values  # [R, k_max], descending
        kth = values.gather(1, (k - 1)[:, None])  # [R, 1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop = before >= top_p[:, None]
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)
    if min_p is not None:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), NEG_INF)
    return logits


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [R]
    logprobs: list[float]  # [R] of each sampled token, raw distribution
    ranks: list[int]  # [R], 0 where logprobs were not asked for
    top_logprobs: list[list[tuple[int, float]] | None]  # [R]


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # logits: [R, vocab] float32, left raw (the logprobs are the raw distribution's)
        x = logits
        if meta.penalties is not None or meta.stop_masks:
            x = logits.clone()
        if meta.penalties is not None:
            meta.penalties.apply(x)
        for row, stop_ids in meta.stop_masks:  # hold back every token that would stop it
            x[row, stop_ids] = NEG_INF
        token_ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        if meta.greedy_rows:
            greedy = meta.greedy_rows
            token_ids[greedy] = x[greedy].argmax(-1) if len(greedy) < x.shape[0] else x.argmax(-1)
        random = None
        if meta.random_rows:  # [N, vocab] temperature-scaled, a new tensor
            random = (x if len(meta.random_rows) == x.shape[0] else x[meta.random_rows]) / meta.temperature
        if meta.allowed_token_bitmask is not None:
            _apply_grammar(x, random, token_ids, meta)
        if random is not None:
            token_ids[meta.random_rows] = draw(random, meta)
        return _logprobs(logits, token_ids, meta.num_logprobs)


def _apply_grammar(x: torch.Tensor, random: torch.Tensor | None, token_ids: torch.Tensor,
                   meta: SamplingMetadata) -> None:
    """Applies the grammar masks where they change the outcome: to the random rows (in place), and to the greedy
    rows whose argmax the grammar bans, whose token is taken again from the masked row. A greedy row whose argmax
    is allowed keeps it: the masked row's argmax is the same token, and masking all of a row costs a pass over
    the vocabulary. x: [R, vocab]; random: x's random rows [N, vocab] or None; token_ids: [R], the greedy rows set."""
    bitmask = meta.allowed_token_bitmask  # [R, words] int32
    if meta.greedy_rows:
        greedy = torch.tensor(meta.greedy_rows, device=x.device)
        top = token_ids[greedy]  # [G]
        banned = greedy[((bitmask[greedy, top // 32] >> (top % 32)) & 1) == 0]  # [B]
        if len(banned):
            rows = x[banned]  # [B, vocab], a copy
            apply_token_bitmask(rows, bitmask[banned])
            token_ids[banned] = rows.argmax(-1)
    if random is not None:
        apply_token_bitmask(random, bitmask[meta.random_rows])


def _inverse_cdf(weights: torch.Tensor, rows: list[int], generators: dict[int, torch.Generator]) -> torch.Tensor:
    """A sample from each row's unnormalized weights [N, n] (>= 0, some positive) at one uniform draw per row (a
    seeded row's from its own generator, so it does not depend on the batch): the block of CDF_BLOCK entries the
    draw falls in, from the blocks' running sum, then the entry, from that block's. Both sums are float64, so no
    entry's mass is lost to rounding; one random number a row, where a race of exponential noise drew one per
    entry (25 ms for 8 rows of a 152k vocabulary, against 1.3 here). rows: each row's random-row index."""
    num_rows, n = weights.shape
    device = weights.device
    uniforms = torch.rand(num_rows, dtype=torch.float64, device=device)
    for i, row in enumerate(rows):
        if row in generators:
            uniforms[i] = torch.rand(1, dtype=torch.float64, device=device, generator=generators[row])[0]
    whole = n // CDF_BLOCK * CDF_BLOCK
    sums = weights[:, :whole].view(num_rows, -1, CDF_BLOCK).sum(-1, dtype=torch.float64)  # [N, n // B]
    if whole < n:  # the last, shorter block
        sums = torch.cat([sums, weights[:, whole:].sum(-1, keepdim=True, dtype=torch.float64)], dim=1)
    block_cdf = sums.cumsum(-1)  # [N, blocks]
    target = uniforms * block_cdf[:, -1]  # [N], below each row's total
    block = _first_above(block_cdf, target)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    entries = block[:, None] * CDF_BLOCK + torch.arange(CDF_BLOCK, device=device)  # [N, B]
    inner = weights.gather(1, entries.clamp(max=n - 1)).masked_fill(entries >= n, 0)  # [N, B]
    return block * CDF_BLOCK + _first_above(inner.double().cumsum(-1), target - before)


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of cdf [N, m] (non-decreasing), the first index whose value exceeds target [N]: the entry the draw
    lands in. Never past the last entry with mass, which rounding between two sums of the same numbers could give."""
    found = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return found.minimum((cdf < cdf[:, -1:]).sum(-1))


def draw(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """One token per random row from its temperature-scaled logits x [random rows, vocab], after top-k, top-p and
    min-p. A filtered row samples among its CANDIDATES most likely tokens when what it keeps provably lies among
    them (its top-k is that small, or the candidates' mass already passes its top-p and their last is under its
    min-p), which spares sorting the whole vocabulary; other rows take the full path
    (filter_logits). Which path a row takes depends on that row alone, so seeded draws do not depend on the batch."""
    num_rows, vocab = x.shape
    token_ids = torch.empty(num_rows, dtype=torch.long, device=x.device)
    filtered = set(meta.filtered)
    full = [j for j in range(num_rows) if j not in filtered]
    if meta.filtered:
        rows = meta.filtered
        k = meta.top_k[rows]
        x_rows = x if len(rows) == num_rows else x[rows]
        values, ids = x_rows.topk(min(CANDIDATES, vocab), dim=-1)  # [F, C], most likely first
        probs = (values - x_rows.logsumexp(-1, keepdim=True)).exp()  # the full distribution's probabilities
        position = torch.arange(values.shape[1], device=x.device)
        has_top_k = (k > 0) & (k <= values.shape[1])
        keep = ~has_top_k[:, None] | (position < k[:, None])
        probs = probs * keep
        probs = torch.where(has_top_k[:, None], probs / probs.sum(-1, keepdim=True), probs)  # renormalized by top-k
        keep &= (probs.cumsum(-1) - probs < meta.top_p[rows, None]) | (position == 0)
        keep &= probs >= meta.min_p[rows, None] * probs[:, :1]
        # exact only if nothing past the candidates would be kept: ruled out by top-k, or by top-p's mass and min-p
        past_kept = (probs.sum(-1) < meta.top_p[rows]) & (probs[:, -1] >= meta.min_p[rows] * probs[:, 0])
        exact = has_top_k | ~past_kept | (values.shape[1] == vocab)
        exact = exact.tolist()
        inside = [j for j, ok in enumerate(exact) if ok]
        full += [rows[j] for j, ok in enumerate(exact) if not ok]
        if inside:
            chosen = _inverse_cdf((probs * keep)[inside], [rows[j] for j in inside], meta.generators)
            token_ids[[rows[j] for j in inside]] = ids[inside].gather(1, chosen[:, None]).squeeze(1)
    if full:
        full.sort()
        rows = x if len(full) == num_rows else x[full]
        probs = filter_logits(rows, meta.top_k[full], meta.top_p[full], meta.min_p[full]).softmax(-1)
        token_ids[full] = _inverse_cdf(probs, full, meta.generators)
    return token_ids


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[SampleLogprobs]:
    """The logprobs of given tokens (a prompt's) in the raw distribution of each row of logits [R, vocab], with
    ranks and k top alternatives, as the sampler reports a sampled token's."""
    out = _logprobs(logits, token_ids, [k] * logits.shape[0])
    return [SampleLogprobs(*entry) for entry in zip(out.logprobs, out.ranks, out.top_logprobs)]


def _logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int | None]) -> SamplerOutput:
    """Logprobs of the sampled tokens in the raw distribution, with ranks and top alternatives where asked.
    log_softmax, not logsumexp: its row reductions give a row the same numbers in a batch of any size (logsumexp
    splits a row across threads when rows are few), so speculation and batching leave logprobs bit-identical."""
    raw = logits.log_softmax(-1)  # [R, vocab]
    chosen = logits.gather(1, token_ids[:, None])  # [R, 1]
    chosen_logprobs = raw.gather(1, token_ids[:, None])  # [R, 1]
    asked = [i for i, k in enumerate(num_logprobs) if k is not None]
    ranks = [0] * logits.shape[0]
    tops: list[list[tuple[int, float]] | None] = [None] * logits.shape[0]
    if asked:
        rank_values = ((logits[asked] > chosen[asked]).sum(-1) + 1).tolist()
        for i, rank in zip(asked, rank_values):
            ranks[i] = rank
        max_top = max(num_logprobs[i] for i in asked)
        if max_top:
            values, ids = raw[asked].topk(max_top, dim=-1)
            for i, row_ids, row_values in zip(asked, ids.tolist(), values.tolist()):
                k = num_logprobs[i]
                tops[i] = list(zip(row_ids[:k], row_values[:k])) if k else None
    return SamplerOutput(token_ids.tolist(), chosen_logprobs.squeeze(1).tolist(), ranks, tops)
