"""The prompt a request carries, as the token ids the engine will see, hashed block by block for prefix-aware routing.

The ingress reads a request's JSON body before it forwards it: chat requests (OpenAI chat, Ollama chat, Anthropic
messages, Responses) are rendered with the model's chat template and encoded as the server does; completion requests
(OpenAI completions, Ollama generate) are encoded as text. The block hashes are engine/kv_cache.py's
(prefix_hashes), so two requests that share a prompt prefix share a hash chain. For text-only messages without
tools the token ids are exactly the engine's; otherwise (tools, images, unusual fields) they are a close stand-in
that still maps equal prefixes to equal chains. A body it cannot read gives no hashes (the request then goes by
load): it never raises and never imports torch or Ray.
"""

from __future__ import annotations

import json
from typing import Any

from ownllm.engine.kv_cache import prefix_hashes
from ownllm.tokenizer import Tokenizer

MAX_ROUTING_BLOCKS = 256  # the leading blocks hashed; longer prompts are told apart by these already
_CHAT_PATHS = ("/v1/chat/completions", "/api/chat", "/v1/messages", "/v1/responses")
_TEXT_PATHS = ("/v1/completions", "/api/generate")


def request_prefix_hashes(path: str, body: bytes, tokenizer: Tokenizer, block_size: int) -> tuple[int, ...]:
    """-> the hash chain of the prompt's full blocks (at most MAX_ROUTING_BLOCKS), or () when there is no prompt."""
    try:
        ids = prompt_token_ids(path, json.loads(body), tokenizer)
    except Exception:  # a malformed request: the replica answers it with the right error
        return ()
    if not ids:
        return ()
    num_blocks = min((len(ids) - 1) // block_size, MAX_ROUTING_BLOCKS)  # the engine always computes the last token
    return tuple(prefix_hashes(ids, block_size, num_blocks))


def prompt_token_ids(path: str, body: dict, tokenizer: Tokenizer) -> list[int] | None:
    if path in _TEXT_PATHS:
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else prompt
        return tokenizer.encode(prompt) if isinstance(prompt, str) else None
    if path in _CHAT_PATHS:
        messages = _messages(body)
        return tokenizer.encode_chat(messages) if messages else None
    return None


def _messages(body: dict) -> list[dict]:
    """System text (Anthropic's system, Responses' instructions), then the conversation, as role + text."""
    messages = []
    system = _text(body.get("system") or body.get("instructions"))
    if system:
        messages.append({"role": "system", "content": system})
    conversation = body.get("messages", body.get("input"))
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    for message in conversation if isinstance(conversation, list) else []:
        if isinstance(message, dict) and isinstance(message.get("role"), str):
            messages.append({"role": message["role"], "content": _text(message.get("content"))})
    return messages


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, joined as the server joins them
        return "\n".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""
