"""The Ollama-compatible API: /api/chat, /api/generate (NDJSON streams by default), /api/tags, /api/show,
/api/ps and /api/version, and how Ollama's requests and `options` become engine requests.

Durations are nanoseconds as Ollama sends them: prompt_eval_duration runs from the request's arrival
to its first token, eval_duration from the first token to the last; load_duration is 0 because the
model stays loaded. Answers are read through server/answers.py like every API's: `format` (JSON or a
schema) is a structured output, `tools` are parsed into `message.tool_calls`, reasoning goes to
`message.thinking`. `images` (base64) go to a vision model (server/images.py), placed before the message's text
as Ollama places them. What ownllm cannot honour (suffix, Go `template`s) is refused with a 400; keep_alive and
num_ctx are accepted and have no effect (the model is always loaded, and its context is fixed when the server
starts).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import ownllm
from ownllm.multimodal.registry import takes_images
from ownllm.outputs import Logprob, RequestOutput
from ownllm.parsers.events import Event, Message
from ownllm.sampling_params import SamplingParams, StructuredOutputsParams
from ownllm.server.answers import (
    SampleReader, ToolPlan, ollama_structured_outputs, read_all, reader_factory, thinking_budget, tool_plan,
)
from ownllm.server.images import base64_sources, load_images
from ownllm.server.limits import check_messages
from ownllm.server.protocol import (
    OllamaAssistantMessage, OllamaChatChunk, OllamaChatRequest, OllamaFunctionCall, OllamaGenerateChunk,
    OllamaGenerateRequest, OllamaLogprob, OllamaModel, OllamaModelDetails, OllamaOptions, OllamaProcesses,
    OllamaRunningModel, OllamaShowRequest, OllamaShowResponse, OllamaTags, OllamaToolCall, OllamaTopLogprob,
)
from ownllm.server.serving import (
    ClosingStreamingResponse, ServerContext, ServerError, Timing, as_server_error, check_context, first_and_rest,
    make_params, new_id, parse_body, run, until_disconnect,
)

DEFAULT_TEMPERATURE = 0.8  # Ollama's, used when the model's generation_config sets none
NEVER_EXPIRES = "2318-01-01T00:00:00Z"  # what Ollama reports for a model kept loaded forever
_OPTION_NAMES = {"max_tokens": "options.num_predict", "repetition_penalty": "options.repeat_penalty",
                 "logprobs": "top_logprobs", **{name: f"options.{name}" for name in OllamaOptions.model_fields}}


@dataclass(frozen=True)
class ModelFacts:
    """What Ollama's listings say about the served model, read once from its files."""

    size: int
    modified_at: str
    digest: str
    details: OllamaModelDetails
    parameter_count: int


def router(ctx: ServerContext) -> APIRouter:
    api = APIRouter(prefix="/api")
    facts = model_facts(ctx.settings.model_path)

    @api.post("/chat")
    async def chat(request: Request) -> Response:
        return await serve_chat(ctx, request)

    @api.post("/generate")
    async def generate(request: Request) -> Response:
        return await serve_generate(ctx, request)

    @api.get("/tags")
    async def tags() -> Response:
        return _json(OllamaTags(models=[_model_entry(ctx, facts)]))

    @api.get("/ps")
    async def processes() -> Response:
        entry = _model_entry(ctx, facts).model_dump()
        return _json(OllamaProcesses(models=[OllamaRunningModel(
            **entry, expires_at=NEVER_EXPIRES, size_vram=0, context_length=ctx.engine.max_model_len)]))

    @api.post("/show")
    async def show(request: Request) -> Response:
        body = parse_body(await request.body(), OllamaShowRequest)
        if not (body.model or body.name):
            raise ServerError(400, "model is required", param="model")
        check_model(ctx, body.model or body.name)
        return _json(_show(ctx, facts))

    @api.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": ownllm.__version__})

    return api


def error_body(error: ServerError) -> dict:
    return {"error": error.message}


def check_model(ctx: ServerContext, name: str) -> None:
    if _untagged(name) != _untagged(ctx.model_name):
        raise ServerError(404, f"model '{name}' not found; this server serves '{_tagged(ctx.model_name)}'",
                          param="model")


def _untagged(name: str) -> str:
    return name.removesuffix(":latest")


def _tagged(name: str) -> str:
    return name if ":" in name.rpartition("/")[2] else f"{name}:latest"


def _json(model) -> Response:
    return JSONResponse(model.model_dump(exclude_none=True))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---- model listings


def model_facts(path: Path | None) -> ModelFacts:
    if path is None:
        details = OllamaModelDetails(format="unknown", family="unknown", families=[], parameter_size="unknown",
                                     quantization_level="unknown")
        return ModelFacts(0, _now(), "", details, 0)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    mtime = max(f.stat().st_mtime for f in files)
    family, quantization, count = _gguf_facts(path) if path.suffix == ".gguf" else _hf_facts(path)
    details = OllamaModelDetails(
        format="gguf" if path.suffix == ".gguf" else "safetensors", family=family, families=[family],
        parameter_size=_human_count(count), quantization_level=quantization)
    modified = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    digest = hashlib.sha256(f"{path.resolve()}:{size}:{mtime}".encode()).hexdigest()  # an id, not a content hash
    return ModelFacts(size, modified, digest, details, count)


def _gguf_facts(path: Path) -> tuple[str, str, int]:
    from gguf import LlamaFileType

    from ownllm.loader.gguf import open_gguf

    reader = open_gguf(str(path))
    family = str(reader.fields["general.architecture"].contents())
    file_type = reader.fields.get("general.file_type")
    quantization = LlamaFileType(file_type.contents()).name.removeprefix("MOSTLY_") if file_type else "unknown"
    return family, quantization, sum(int(t.n_elements) for t in reader.tensors)


def _hf_facts(path: Path) -> tuple[str, str, int]:
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "unknown")
    names = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    count = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "np") as tensors:
            for name in tensors.keys():
                shape = tensors.get_slice(name).get_shape()
                count += math.prod(shape)
    return str(config.get("model_type", "unknown")), names.get(dtype, dtype), count


def _human_count(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.{1 if count < 10 * scale else 0}f}{unit}"
    return str(count)


def _model_entry(ctx: ServerContext, facts: ModelFacts) -> OllamaModel:
    name = _tagged(ctx.model_name)
    return OllamaModel(name=name, model=name, modified_at=facts.modified_at, size=facts.size, digest=facts.digest,
                       details=facts.details)


def _template_text(ctx: ServerContext) -> str:
    template = ctx.engine.tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("default") or next(iter(template.values()), "")
    return template or ""


def _show(ctx: ServerContext, facts: ModelFacts) -> OllamaShowResponse:
    template = _template_text(ctx)
    family = facts.details.family
    parameters = "\n".join(f"{k:<30} {v}" for k, v in ctx.engine.generation_config.items()
                           if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"))
    config = ctx.engine.model_config
    capabilities = ["completion"] + ["tools"] * ("tools" in template) + ["thinking"] * ("enable_thinking" in template) \
        + ["vision"] * (config is not None and takes_images(config.architecture))  # Ollama clients offer uploads then
    return OllamaShowResponse(
        modified_at=facts.modified_at, template=template, parameters=parameters, details=facts.details,
        model_info={"general.architecture": family, "general.parameter_count": facts.parameter_count,
                    f"{family}.context_length": ctx.engine.max_model_len},
        capabilities=capabilities)


# ---- requests -> engine inputs


def _think_kwargs(ctx: ServerContext, think: bool | str | None) -> dict:
    if think is None:
        return {}
    if "enable_thinking" in _template_text(ctx):
        return {"enable_thinking": bool(think)}
    if think:
        raise ServerError(400, f'"{ctx.model_name}" does not support thinking', param="think")
    return {}


def _encode_chat(ctx: ServerContext, messages: list[dict], tools: list[dict] | None,
                 think: bool | str | None) -> list[int]:
    try:
        return ctx.engine.tokenizer.encode_chat(messages, tools=tools, **_think_kwargs(ctx, think))
    except (ValueError, TypeError) as error:
        raise ServerError(400, str(error), param="messages") from None


def _chat_messages(body: OllamaChatRequest) -> tuple[list[dict], list[tuple[str, Any]]]:
    """-> (messages for the template, a message's images as {"type": "image"} items before its text; [(field path,
    image bytes)] in order)."""
    messages, images = [], []
    for i, message in enumerate(body.messages):
        values = {k: v for k, v in message.model_dump().items() if k != "images"}
        if message.images:
            images += base64_sources(f"messages.{i}.images", message.images)
            values["content"] = _with_images(len(message.images), message.content or "")
        messages.append(values)
    return messages, images


def _with_images(num_images: int, text: str) -> list[dict]:
    """Ollama puts a message's images before its text."""
    return [{"type": "image"}] * num_images + [{"type": "text", "text": text}]


def _generate_prompt_ids(ctx: ServerContext, body: OllamaGenerateRequest) -> list[int]:
    for field, why in (("suffix", "fill in the middle is not supported"),
                       ("template", "Go templates are not supported; format the prompt yourself and set raw to true")):
        if getattr(body, field):
            raise ServerError(400, f"{field}: {why}", param=field)
    tokenizer = ctx.engine.tokenizer
    if body.raw or tokenizer.chat_template is None:
        ids = tokenizer.encode(body.prompt)
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        content = _with_images(len(body.images), body.prompt) if body.images else body.prompt
        ids = _encode_chat(ctx, system + [{"role": "user", "content": content}], None, body.think)
    if body.context and not all(0 <= t < tokenizer.vocab_size for t in body.context):
        raise ServerError(400, f"context token ids must be in [0, {tokenizer.vocab_size})", param="context")
    return list(body.context or []) + ids


def _max_tokens(options: OllamaOptions) -> int | None:
    num_predict = options.num_predict
    if num_predict is None or num_predict in (-1, -2):
        return None  # until the model stops or the context is full
    if num_predict < 1:
        raise ServerError(400, f"options.num_predict must be -1 (no limit), -2 (fill the context) or a positive "
                          f"count, got {num_predict}", param="options.num_predict")
    return num_predict


def _sampling_params(ctx: ServerContext, body: OllamaChatRequest | OllamaGenerateRequest, max_tokens: int | None,
                     structured: StructuredOutputsParams | None, keep_special_tokens: bool = False) -> SamplingParams:
    options = body.options or OllamaOptions()
    defaults = ctx.engine.default_sampling_params()
    config = ctx.engine.generation_config
    default_temperature = defaults.temperature if "temperature" in config or config.get("do_sample") is False \
        else DEFAULT_TEMPERATURE

    def pick(value, default):
        return default if value is None else value

    return make_params(dict(
        temperature=pick(options.temperature, default_temperature), top_p=pick(options.top_p, defaults.top_p),
        top_k=pick(options.top_k, defaults.top_k), min_p=pick(options.min_p, defaults.min_p),
        repetition_penalty=pick(options.repeat_penalty, defaults.repetition_penalty),
        presence_penalty=pick(options.presence_penalty, 0.0), frequency_penalty=pick(options.frequency_penalty, 0.0),
        seed=options.seed, max_tokens=max_tokens,
        stop=[options.stop] if isinstance(options.stop, str) else list(options.stop or []),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None, structured_outputs=structured,
        thinking_budget=thinking_budget(ctx), skip_special_tokens=not keep_special_tokens, output_kind="delta",
    ), ctx.settings.limits, _OPTION_NAMES)


# ---- engine outputs -> Ollama chunks


def _logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> list[OllamaLogprob]:
    result = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        top = sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)[:k]
        result.append(OllamaLogprob(
            token=chosen.decoded_token or "", logprob=max(chosen.logprob, -9999.0),
            bytes=list((chosen.decoded_token or "").encode()),
            top_logprobs=[OllamaTopLogprob(token=lp.decoded_token or "", logprob=max(lp.logprob, -9999.0),
                                           bytes=list((lp.decoded_token or "").encode())) for lp in top] or None))
    return result


def _final_stats(num_prompt_tokens: int, reader: SampleReader, timing: Timing) -> dict:
    end = timing.last_token or time.perf_counter()
    first = timing.first_token or end
    return dict(
        done_reason=reader.finish_reason, total_duration=_ns(end - timing.arrived), load_duration=0,
        prompt_eval_count=num_prompt_tokens, prompt_eval_duration=_ns(first - timing.arrived),
        eval_count=len(reader.token_ids), eval_duration=_ns(end - first),
    )


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


@dataclass
class Piece:
    """What one chunk carries: the events of one step (or of the whole answer) and the tokens' logprobs."""

    message: Message
    logprobs: list[OllamaLogprob] | None
    final: bool


def _tool_calls(message: Message) -> list[OllamaToolCall] | None:
    """Ollama sends arguments as an object; a call whose arguments are not one keeps them under "arguments"."""
    calls = []
    for _, name, arguments in message.tool_calls or []:
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            value = None
        calls.append(OllamaToolCall(function=OllamaFunctionCall(
            name=name, arguments=value if isinstance(value, dict) else {"arguments": arguments})))
    return calls or None


async def _respond(request: Request, body: OllamaChatRequest | OllamaGenerateRequest,
                   outputs: AsyncIterator[RequestOutput], reader: SampleReader, chunk) -> Response:
    """Streams `chunk(piece)` as NDJSON lines, or returns the whole answer as one JSON chunk."""
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None

    def piece(events: list[Event], start: int, final: bool) -> Piece:
        logprobs = None
        if top_logprobs is not None:
            logprobs = _logprobs(reader.token_ids[start:], reader.logprobs[start:], top_logprobs)
        return Piece(Message.of(events), logprobs, final)

    if not body.stream:
        await until_disconnect(request, read_all(outputs, [reader]))
        return _json(chunk(piece(reader.events, 0, True)))
    outputs = await first_and_rest(request, outputs)
    return ClosingStreamingResponse(_ndjson(outputs, reader, piece, chunk), media_type="application/x-ndjson")


async def _ndjson(outputs: AsyncIterator[RequestOutput], reader: SampleReader, piece, chunk) -> AsyncIterator[str]:
    try:
        async for output in outputs:
            start = len(reader.token_ids)
            events = reader.read(output.outputs[0])
            step = piece(events, start, False)
            if events or step.logprobs:
                yield chunk(step).model_dump_json(exclude_none=True) + "\n"
            if reader.finished:
                yield chunk(Piece(Message(), None, True)).model_dump_json(exclude_none=True) + "\n"
    except Exception as error:
        yield json.dumps(error_body(as_server_error(error))) + "\n"


def _loaded(ctx: ServerContext, chunk_type) -> Response:
    """Ollama's answer to a request with nothing to generate: the model is (already) loaded."""
    extra = {"message": OllamaAssistantMessage(content="")} if chunk_type is OllamaChatChunk else {"response": ""}
    return _json(chunk_type(model=_tagged(ctx.model_name), created_at=_now(), done=True, done_reason="load", **extra))


# ---- /api/chat and /api/generate


async def serve_chat(ctx: ServerContext, request: Request) -> Response:
    timing = Timing()
    body = parse_body(await request.body(), OllamaChatRequest)
    check_model(ctx, body.model)
    structured = ollama_structured_outputs(body.format)
    if not body.messages:
        return _loaded(ctx, OllamaChatChunk)
    check_messages(ctx.settings.limits, len(body.messages))
    tools = tool_plan(ctx, body.tools, None) if body.tools else ToolPlan()
    if structured is not None and tools.structured_outputs is not None:
        raise ServerError(400, f"format cannot be combined with {tools.grammar_reason}", param="format")
    structured = structured or tools.structured_outputs
    messages, image_sources = _chat_messages(body)
    images = await load_images(ctx, image_sources)
    prompt_ids = _encode_chat(ctx, messages, body.tools, body.think)
    max_tokens = _max_tokens(body.options or OllamaOptions())
    check_context(len(prompt_ids), max_tokens, ctx.engine.max_model_len, "messages", "options.num_predict")
    params = _sampling_params(ctx, body, max_tokens, structured, tools.keep_special_tokens)
    outputs = run(ctx, prompt_ids, params, new_id("chat"), timing, images)
    reader = reader_factory(ctx, prompt_ids, tools)()

    def chunk(piece: Piece) -> OllamaChatChunk:
        stats = _final_stats(timing.num_prompt_tokens, reader, timing) if piece.final else {}
        message = OllamaAssistantMessage(content=piece.message.content, thinking=piece.message.reasoning or None,
                                         tool_calls=_tool_calls(piece.message))
        return OllamaChatChunk(model=_tagged(ctx.model_name), created_at=_now(), done=piece.final, message=message,
                               logprobs=piece.logprobs, **stats)

    return await _respond(request, body, outputs, reader, chunk)


async def serve_generate(ctx: ServerContext, request: Request) -> Response:
    timing = Timing()
    body = parse_body(await request.body(), OllamaGenerateRequest)
    check_model(ctx, body.model)
    structured = ollama_structured_outputs(body.format)
    if not body.prompt and not body.context:
        return _loaded(ctx, OllamaGenerateChunk)
    images = await load_images(ctx, base64_sources("images", body.images))
    prompt_ids = _generate_prompt_ids(ctx, body)
    max_tokens = _max_tokens(body.options or OllamaOptions())
    check_context(len(prompt_ids), max_tokens, ctx.engine.max_model_len, "prompt", "options.num_predict")
    params = _sampling_params(ctx, body, max_tokens, structured)
    outputs = run(ctx, prompt_ids, params, new_id("generate"), timing, images)
    reader = reader_factory(ctx, prompt_ids, None)()

    def chunk(piece: Piece) -> OllamaGenerateChunk:
        stats = _final_stats(timing.num_prompt_tokens, reader, timing) if piece.final else {}
        context = prompt_ids + reader.token_ids if piece.final and not body.raw else None
        return OllamaGenerateChunk(model=_tagged(ctx.model_name), created_at=_now(), done=piece.final,
                                   response=piece.message.content, thinking=piece.message.reasoning or None,
                                   context=context, logprobs=piece.logprobs, **stats)

    return await _respond(request, body, outputs, reader, chunk)
