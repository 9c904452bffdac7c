"""Prompt lookup: drafts copied from the request's own earlier text. Plain Python, no model.

If the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) occurred earlier in the request,
the tokens that followed their latest earlier occurrence are the draft: code edits, quotes and repeated
structure copy long runs this way, at no cost beyond a scan of the token ids.
"""

from __future__ import annotations

from typing import Sequence


def propose_ngram(token_ids: Sequence[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to num_tokens tokens that followed the latest earlier occurrence of the longest suffix of token_ids
    of length min_n..max_n; [] when none recurs. One backward scan over the occurrences of the last token."""
    size = len(token_ids)
    last = token_ids[-1]
    best_n, best_end = 0, -1
    for end in range(size - 2, min_n - 2, -1):  # end: the candidate occurrence's last index
        if token_ids[end] != last:
            continue
        n = 1
        while n < max_n and n <= end and token_ids[end - n] == token_ids[size - 1 - n]:
            n += 1
        if n > best_n:
            best_n, best_end = n, end
            if n == max_n:
                break
    if best_n < min_n:
        return []
    return list(token_ids[best_end + 1 : best_end + 1 + num_tokens])


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def cost_per_draft(self, step_seconds: float) -> float:
        """Drafting is free; verifying a draft adds a row to the step, a few percent of its time."""
        return 0.05

    def propose(self, states) -> dict[str, list[int]]:
        drafts = {}
        for state in states:
            num_tokens = state.draft_length.next
            draft = propose_ngram(state.token_ids, num_tokens, self.min_n, self.max_n) if num_tokens else []
            if draft:
                drafts[state.request_id] = draft
        return drafts

    def free(self, request_id: str) -> None:
        pass
