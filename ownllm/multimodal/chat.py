"""Image parts of chat messages, for the chat template and the engine.

OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` (and, offline, `{"type": "image", "image": <PIL>}` or
vLLM's `{"type": "image_pil", "image_pil": <PIL>}`) become Hugging Face's `{"type": "image"}` content items, which
chat templates render as the model's image marker; the images themselves are returned apart, in order. Messages
without images keep their text parts joined into one string, as text-only templates expect.
"""

from __future__ import annotations

from typing import Any

IMAGE_PART_TYPES = ("image_url", "image", "image_pil")


def split_images(messages: list[dict]) -> tuple[list[dict], list[tuple[str, Any]]]:
    """-> (messages for the template, [(the part's field path, its image: a URL string, a PIL image or bytes)]).
    Raises ValueError naming the part for a part it cannot read."""
    rendered, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            param = f"messages.{i}.content.{j}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in IMAGE_PART_TYPES:
                images.append((param, _image_of(part, kind, param)))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{param}: only text and image_url parts are supported, got a part of type {kind!r}")
        has_image = any(p["type"] == "image" for p in parts)
        rendered.append({**message, "content": parts if has_image else "\n".join(p["text"] for p in parts)})
    return rendered, images


def _image_of(part: dict, kind: str, param: str) -> Any:
    value = part.get(kind)
    if kind == "image_url":
        value = value.get("url") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise ValueError(f"{param}: image_url needs a url")
    elif value is None:
        raise ValueError(f"{param}: a part of type {kind!r} needs its image in {kind!r}")
    return value
