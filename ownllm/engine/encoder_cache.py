"""EncoderCacheManager: which images' vision-encoder outputs the runner holds, counted in rows (placeholder tokens).

Pure bookkeeping, no torch, like kv_cache.py: the runner holds the tensors and does what this decides. An
image is encoded once per content hash; the requests that still need its rows hold a reference; outputs nobody
references stay until room is needed, least recently used first (so a conversation that resends an image does
not re-encode it). Evicted hashes are handed to the runner with the next step (SchedulerOutput.freed_encoder_hashes).
"""

from __future__ import annotations

from collections import OrderedDict


class EncoderCacheManager:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # rows
        self.num_used = 0
        self.sizes: dict[str, int] = {}  # hash -> rows, every output held
        self.users: dict[str, set[str]] = {}  # hash -> ids of the requests that still need it
        self.unused: OrderedDict[str, None] = OrderedDict()  # held, referenced by no request: LRU first
        self.freed: list[str] = []  # evicted since the runner was last told
        self.num_encoded = 0  # images scheduled for encoding, ever

    def has(self, image_hash: str) -> bool:
        return image_hash in self.sizes

    def can_add(self, num_rows: int) -> bool:
        evictable = sum(self.sizes[h] for h in self.unused)
        return self.num_used - evictable + num_rows <= self.capacity

    def use(self, request_id: str, image_hash: str) -> None:
        """A request takes a reference on an output held (or being added this step)."""
        self.users[image_hash].add(request_id)
        self.unused.pop(image_hash, None)

    def add(self, request_id: str, image_hash: str, num_rows: int) -> None:
        """Makes room (evicting unreferenced outputs, LRU first) and records an image to encode this step."""
        while self.num_used + num_rows > self.capacity:
            evicted, _ = self.unused.popitem(last=False)
            self.num_used -= self.sizes.pop(evicted)
            del self.users[evicted]
            self.freed.append(evicted)
        self.sizes[image_hash] = num_rows
        self.users[image_hash] = {request_id}
        self.num_used += num_rows
        self.num_encoded += 1

    def release(self, request_id: str, image_hashes) -> None:
        """The request no longer needs these outputs (computed past them, finished or preempted)."""
        for image_hash in image_hashes:
            users = self.users.get(image_hash)
            if users is not None and request_id in users:
                users.discard(request_id)
                if not users:
                    self.unused[image_hash] = None

    def take_freed(self) -> list[str]:
        freed, self.freed = self.freed, []
        return freed
