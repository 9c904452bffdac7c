"""Images in API requests -> PIL images for the engine, every refusal a 400 naming the field: a model without a
vision tower, bytes that are not an image, one over the size limit, a URL whose domain is not allowed or that
resolves to a private address (ownllm.multimodal.fetch guards the fetch). URL fetches run off the event loop. Pillow is imported only when an image comes."""

from __future__ import annotations

import asyncio
from typing import Any

from ownllm.multimodal.registry import takes_images
from ownllm.server.errors import ServerError
from ownllm.server.serving import ServerContext


def check_takes_images(ctx: ServerContext, param: str) -> None:
    config = ctx.engine.model_config
    if config is None or not takes_images(config.architecture):
        raise ServerError(400, f"{param}: model {ctx.model_name} does not accept images", param=param)


async def load_images(ctx: ServerContext, sources: list[tuple[str, Any]]) -> list:
    """[(field path, a data: or http(s) URL, or encoded bytes)] -> the images (PIL), in order."""
    if not sources:
        return []
    check_takes_images(ctx, sources[0][0])
    from ownllm.multimodal.fetch import load_image_url
    from ownllm.multimodal.image_io import decode_image

    images = []
    for param, source in sources:
        try:
            if isinstance(source, str):
                images.append(await asyncio.to_thread(load_image_url, source, ctx.settings.allowed_media_domains,
                                                      ctx.settings.max_image_bytes))
            else:
                images.append(await asyncio.to_thread(decode_image, source, ctx.settings.max_image_bytes))
        except ValueError as error:
            raise ServerError(400, f"{param}: {error}", param=param) from None
    return images


def base64_sources(param: str, images: list[str] | None) -> list[tuple[str, Any]]:
    """Ollama's `images` (base64 strings) -> [(field path, bytes)]."""
    from ownllm.multimodal.fetch import decode_base64

    sources = []
    for i, data in enumerate(images or []):
        try:
            sources.append((f"{param}.{i}", decode_base64(data)))
        except ValueError as error:
            raise ServerError(400, f"{param}.{i}: {error}", param=f"{param}.{i}") from None
    return sources
