"""Prefix affinity: which replica most likely holds a prompt's leading blocks in its prefix cache, and the choice
between that replica and the least loaded one. Plain Python (no Ray, no torch), so its tests run in milliseconds;
router.py puts it behind Ray Serve's RequestRouter interface.

It remembers, per block hash (prefix_key.py's chains), the replica it last sent a prompt holding that block, least
recently used forgotten first. A new request goes to the owner of its longest remembered prefix, when that prefix is
at least `min_matched_blocks` long (a few blocks are cheap to recompute, and chat templates start every prompt
with the same few tokens), unless that replica has more than `imbalance_threshold` requests in flight beyond the
least loaded replica; then, and for prompts with no such prefix, it goes to the least loaded replica, ties broken toward the replica chosen least recently
(so distinct prompts spread over idle replicas instead of piling on the first).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Mapping, Sequence

DEFAULT_IMBALANCE_THRESHOLD = 8  # requests in flight; a replica decodes up to max_num_seqs (64) together
DEFAULT_MIN_MATCHED_BLOCKS = 4  # 64 tokens at the default block size
DEFAULT_MAX_BLOCKS = 200_000  # remembered block hashes (a few MB of router memory)


class PrefixAffinity:
    def __init__(self, imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
                 min_matched_blocks: int = DEFAULT_MIN_MATCHED_BLOCKS, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.min_matched_blocks = min_matched_blocks
        self.max_blocks = max_blocks
        self.owners: OrderedDict[int, str] = OrderedDict()  # block hash -> replica, least recently used first
        self.last_chosen: dict[str, int] = {}  # replica -> when it was last chosen (a counter)
        self._clock = itertools.count()

    def choose(self, hashes: Sequence[int], loads: Mapping[str, int]) -> str:
        """The replica for a prompt with these block hashes, given each candidate's requests in flight."""
        least = min(loads, key=lambda replica: (loads[replica], self.last_chosen.get(replica, -1), replica))
        owner = self.longest_prefix_owner(hashes, loads)
        chosen = owner if owner is not None and loads[owner] - loads[least] <= self.imbalance_threshold else least
        self.last_chosen[chosen] = next(self._clock)
        return chosen

    def longest_prefix_owner(self, hashes: Sequence[int], candidates: Mapping[str, int]) -> str | None:
        """The candidate last sent the longest remembered prefix of these blocks (min_matched_blocks at least)."""
        owner = None
        for depth, block_hash in enumerate(hashes, 1):
            replica = self.owners.get(block_hash)
            if replica is None:
                break
            if replica in candidates and depth >= self.min_matched_blocks:
                owner = replica
        return owner

    def record(self, hashes: Sequence[int], replica: str) -> None:
        """The prompt with these block hashes went to `replica`: its blocks are now (most recently) there."""
        for block_hash in hashes:
            self.owners.pop(block_hash, None)
            self.owners[block_hash] = replica
        while len(self.owners) > self.max_blocks:
            self.owners.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica is gone: its blocks are nobody's."""
        for block_hash in [h for h, owner in self.owners.items() if owner == replica]:
            del self.owners[block_hash]
        self.last_chosen.pop(replica, None)
