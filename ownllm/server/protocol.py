"""The wire shapes of the OpenAI and Ollama APIs as pydantic models: what requests may hold and what
responses carry.

Request models are strict (a string is not a number; an integer may be written 2.0) and ignore unknown fields, as vLLM and Ollama
do, so newer clients keep working. Ranges are checked here only where SamplingParams does not check
them under the same name; the rest is left to it, so a limit is written once. This module only
describes data: it never touches the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ownllm.parsers.events import Message


def _whole_number(value: Any) -> Any:
    """2.0 -> 2: JSON has one number type, so an integer may come written as 2.0 (never as "2" or 2.5)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole_number)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


# ---- OpenAI requests


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Request):
    """vLLM's `structured_outputs` request field: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class ComputeField(_Request):
    """The `compute` request field (ownllm.compute.ComputeParams checks the values); unknown keys are refused."""

    model_config = ConfigDict(strict=True, extra="forbid")
    strategy: str = "vote"
    samples: int = 8
    answer: str = "text"
    scorer: str = "logprob"
    early_stop: bool = False
    confidence: float = 1.0


class ChatMessage(_Request):
    """One message; fields beyond role and content (name, tool_calls, tool_call_id...) go to the template."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _OpenAISampling(_Request):
    """The decoding options both OpenAI endpoints share, with vLLM's extensions."""

    model: str | None = None
    n: Int = 1
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] = []
    ignore_eos: bool = False
    min_tokens: Int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    compute: ComputeField | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    thinking_budget: int | None = Field(None, ge=0)


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    logprobs: Int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = Field(None, ge=1)


# ---- OpenAI responses


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


class CompletionTokensDetails(_Response):
    reasoning_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = []

    @classmethod
    def of(cls, answer: Message) -> "AssistantMessage":
        """A whole answer read by the output layer; content is null when calls are all it holds."""
        calls = [ToolCall(id=id_, function=FunctionCall(name=name, arguments=arguments))
                 for id_, name, arguments in answer.tool_calls or []]
        content = None if calls and not answer.content.strip() else answer.content
        return cls(content=content, reasoning_content=answer.reasoning or None, tool_calls=calls)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    """A streamed tool call: its first delta has index, id, type and name; later ones add argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(_Response):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ComputeAnswerCount(_Response):
    answer: str | None
    count: int


class ComputeSampleInfo(_Response):
    """One sample of a `compute` request (ownllm.compute.strategies.SampleResult)."""

    index: int
    answer: str | None
    num_tokens: int
    cumulative_logprob: float
    finish_reason: str | None
    score: float | None = None


class ComputeInfo(_Response):
    """How a `compute` request chose its one answer (ownllm.compute.ComputeSummary)."""

    strategy: str
    answer: str | None
    answers: list[ComputeAnswerCount]
    samples: int
    samples_run: int
    samples_saved: int
    agreement: float
    completion_tokens: int
    chosen_index: int
    score: float | None = None
    per_sample: list[ComputeSampleInfo] = []


class ComputeProgressInfo(_Response):
    """A streamed `compute` request's progress: samples finished so far and the current leader."""

    samples_done: int
    samples: int
    leader: str | None
    leader_count: int


class ComputeChatResponse(ChatCompletionResponse):
    compute: ComputeInfo


class ComputeChatChunk(ChatCompletionChunk):
    compute: ComputeInfo | None = None
    compute_progress: ComputeProgressInfo | None = None


class ComputeCompletionResponse(CompletionResponse):
    """The response, and each streamed chunk, of a `compute` completion."""

    compute: ComputeInfo | None = None
    compute_progress: ComputeProgressInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ownllm"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- Ollama requests


class OllamaOptions(_Request):
    """Ollama's `options`. Those that only tune llama.cpp's runtime (num_thread, num_gpu...) are ignored."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    num_predict: Int | None = None
    stop: list[str] | str | None = None
    seed: Int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: Int | None = Field(None, ge=1)


class OllamaMessage(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | None = ""
    images: list[str] | None = None


class _OllamaBase(_Request):
    model: str = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0)


class OllamaChatRequest(_OllamaBase):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_OllamaBase):
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[Int] | None = None
    suffix: str | None = None
    images: list[str] | None = None


class OllamaShowRequest(_Request):
    model: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1)
    verbose: bool = False


# ---- Ollama responses (sent without their None fields, as Ollama omits empty ones)


class OllamaTopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class OllamaLogprob(OllamaTopLogprob):
    top_logprobs: list[OllamaTopLogprob] | None = None


class _OllamaChunk(_Response):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[OllamaLogprob] | None = None


class OllamaFunctionCall(_Response):
    name: str
    arguments: dict[str, Any]


class OllamaToolCall(_Response):
    function: OllamaFunctionCall


class OllamaAssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | None = None
    tool_calls: list[OllamaToolCall] | None = None


class OllamaChatChunk(_OllamaChunk):
    message: OllamaAssistantMessage


class OllamaGenerateChunk(_OllamaChunk):
    response: str
    thinking: str | None = None
    context: list[int] | None = None


class OllamaModelDetails(_Response):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModel(_Response):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(_Response):
    models: list[OllamaModel]


class OllamaRunningModel(OllamaModel):
    expires_at: str
    size_vram: int
    context_length: int


class OllamaProcesses(_Response):
    models: list[OllamaRunningModel]


class OllamaShowResponse(_Response):
    modified_at: str
    template: str
    parameters: str
    details: OllamaModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
