"""The Responses API's in-memory store: each stored response by id, with the conversation it ends, for GET,
DELETE and `previous_response_id`. It holds at most `max_size` responses and forgets the least recently used
first; everything is lost when the server stops. It never touches the engine.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ownllm.server.responses_protocol import ResponseObject


@dataclass
class StoredResponse:
    response: ResponseObject
    conversation: list[dict]  # the chat template's messages, this response's answer last (instructions left out)


class ResponseStore:
    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError(f"the responses store size must be >= 0, got {max_size}")
        self.max_size = max_size
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        if self.max_size == 0:
            return
        self._responses[stored.response.id] = stored
        self._responses.move_to_end(stored.response.id)
        while len(self._responses) > self.max_size:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._responses)
