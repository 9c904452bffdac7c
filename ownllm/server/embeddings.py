"""The embedding routes: OpenAI's POST /v1/embeddings, Ollama's POST /api/embed and its legacy POST /api/embeddings,
over one AsyncEmbedder; and the routing between an embedding model and a chat model served side by side (or an
embedding model alone): generation routes asked for the embedding model, and embedding routes asked for another
model, answer a 400 that names the model. Errors are ServerErrors, rendered in each API's shape by app.py.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ownllm.engine.async_embedder import AsyncEmbedder
from ownllm.engine.embedder import EmbeddingOutput
from ownllm.sampling_params import SamplingParams
from ownllm.server.serving import ServerError, parse_body, until_disconnect

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
                    "/v1/messages/count_tokens", "/api/chat", "/api/generate")
EMBEDDING_ROUTES = "/v1/embeddings, /api/embed and /api/embeddings"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class EmbeddingRequest(_Request):
    """OpenAI's: input is a string, a list of strings, a list of token ids or a list of token-id lists."""

    input: Any
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class OllamaEmbedRequest(_Request):
    model: str
    input: Any  # a string or a list of strings
    truncate: bool = True
    dimensions: int | None = None
    options: dict | None = None
    keep_alive: Any = None


class OllamaEmbeddingsRequest(_Request):
    model: str
    prompt: str
    options: dict | None = None
    keep_alive: Any = None


def _untagged(name: str) -> str:
    return name.removesuffix(":latest")


def embedding_model_error(name: str) -> ServerError:
    return ServerError(400, f"model {name} is an embedding model: it serves {EMBEDDING_ROUTES}, not text generation",
                       param="model")


class EmbeddingOnlyEngine:
    """The EngineClient of a server with an embedding model and no chat model: the model listings, /health and
    /metrics see the embedding model; generation is refused (generation_guard refuses it before it gets here)."""

    def __init__(self, embedder: AsyncEmbedder) -> None:
        self.model_name = embedder.model_name
        self.max_model_len = embedder.embedder.max_model_len
        self.tokenizer = embedder.embedder.tokenizer
        self.generation_config: dict = {}

    async def generate(self, *args, **kwargs):
        raise ValueError(embedding_model_error(self.model_name).message)
        yield

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams()


def generation_guard(embedder: AsyncEmbedder, serves_generation: bool):
    """A dependency for the generation routers: a generation request naming the embedding model (any, when no chat
    model is served) -> 400 naming it."""

    async def refuse_embedding_model(request: Request) -> None:
        if request.method != "POST" or request.url.path not in GENERATION_PATHS:
            return
        if serves_generation:
            try:
                model = json.loads(await request.body() or b"{}").get("model")
            except (ValueError, AttributeError):
                return  # the route itself names what is wrong with the body
            if not isinstance(model, str) or _untagged(model) != _untagged(embedder.model_name):
                return
        raise embedding_model_error(embedder.model_name)

    return refuse_embedding_model


def router(embedder: AsyncEmbedder | None, chat_model_name: str | None) -> APIRouter:
    api = APIRouter()

    def check_model(name: str | None) -> AsyncEmbedder:
        if embedder is not None and (name is None or _untagged(name) == _untagged(embedder.model_name)):
            return embedder
        if name is not None and name == chat_model_name:
            served = f"its embedding model is {embedder.model_name}" if embedder else "it serves no embedding model"
            raise ServerError(400, f"model {name} is not an embedding model; {served}", param="model")
        served = f"this server embeds with {embedder.model_name}" if embedder else "it serves no embedding model"
        raise ServerError(404, f"model {name} not found; {served}", param="model", code="model_not_found")

    @api.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        body = parse_body(await request.body(), EmbeddingRequest)
        model = check_model(body.model)
        outputs = await _embed(request, model, _openai_inputs(body.input), False, body.dimensions, "input")
        data = [{"object": "embedding", "index": i, "embedding": _encode(o.embedding, body.encoding_format)}
                for i, o in enumerate(outputs)]
        num_tokens = sum(o.num_prompt_tokens for o in outputs)
        return JSONResponse({"object": "list", "data": data, "model": model.model_name,
                             "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})

    @api.post("/api/embed")
    async def ollama_embed(request: Request) -> Response:
        started = time.perf_counter_ns()
        body = parse_body(await request.body(), OllamaEmbedRequest)
        model = check_model(body.model)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
            raise ServerError(400, "input must be a string or a list of strings", param="input")
        outputs = await _embed(request, model, inputs, body.truncate, body.dimensions, "input")
        return JSONResponse({"model": body.model, "embeddings": [o.embedding for o in outputs],
                             "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
                             "prompt_eval_count": sum(o.num_prompt_tokens for o in outputs)})

    @api.post("/api/embeddings")
    async def ollama_embeddings(request: Request) -> Response:
        body = parse_body(await request.body(), OllamaEmbeddingsRequest)
        model = check_model(body.model)
        outputs = await _embed(request, model, [body.prompt], True, None, "prompt")
        return JSONResponse({"embedding": outputs[0].embedding})

    return api


async def _embed(request: Request, embedder: AsyncEmbedder, inputs: list, truncate: bool, dimensions: int | None,
                 param: str) -> list[EmbeddingOutput]:
    """The embeddings of `inputs`; the embedder's refusals become 400s naming the request's field."""
    try:
        return await until_disconnect(request, embedder.embed(inputs, truncate, dimensions))
    except ValueError as error:
        message = str(error)
        if param == "prompt":
            message = message.replace("input 0 is", "prompt is", 1)
        raise ServerError(400, message, param="dimensions" if message.startswith("dimensions") else param) from None


def _openai_inputs(value: Any) -> list:
    """OpenAI's input forms -> a list of texts or token-id lists (empty ones are left for the embedder to name)."""
    if isinstance(value, str) or (_is_token_ids(value) and value):
        return [value]
    if isinstance(value, list) and (all(isinstance(v, str) for v in value) or all(_is_token_ids(v) for v in value)):
        return value
    raise ServerError(400, "input must be a string, a list of strings, a list of token ids or a list of token-id "
                      "lists", param="input")


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
