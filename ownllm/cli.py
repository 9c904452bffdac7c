"""The `ownllm` command: run, chat, models, pull, rm, show, serve, eval, bench, plan. Wires the offline engine to a
terminal, and the async engine to the HTTP server (and to `bench`, which measures what that server would serve).

Every expected failure (bad path, bad option value, unsupported model...) is printed as one
`error: ...` line with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ownllm.loader.resolve import BUNDLED_MODEL_NAME

app = typer.Typer(
    help="Run open-weight LLMs on your own machine, offline. With no --model, uses the bundled "
    f"{BUNDLED_MODEL_NAME} (SmolLM2-135M-Instruct, Q4_1 GGUF).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help=f"A Hugging Face checkpoint folder, a hub id (org/name), a .gguf file, or "
    f"'{BUNDLED_MODEL_NAME}'. Default: the bundled {BUNDLED_MODEL_NAME}.")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    help="Compute dtype: float32, bfloat16 or float16. Default: the checkpoint's; quantized GGUF files run in "
    "bfloat16 with their weights kept quantized on CPUs with AVX-512 BF16, in float32 with them kept quantized on "
    "CPUs with AVX2 alone; there, bfloat16 and float16 also compute in float32, the weights kept 16-bit.")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    help="Where to run: cpu (default) or cuda (plain-torch paths; GGUF weights dequantized).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate per answer.")]
TemperatureOpt = Annotated[Optional[float], typer.Option(
    help="Sampling temperature; 0 is greedy. Default: the model's generation_config, else 0.8.")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling: keep the most likely tokens "
                                                   "whose probabilities sum to this, in (0, 1].")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="Keep only the k most likely tokens; 0 disables.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for reproducible sampling.")]
SystemOpt = Annotated[Optional[str], typer.Option(help="A system prompt to put before the conversation.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print load time, prompt and decode speed (and "
                                           "speculation's acceptance) after each answer.")]
SpeculativeOpt = Annotated[Optional[str], typer.Option(
    "--speculative-config", help="Speculative decoding, as JSON with vLLM's keys: '{\"method\": \"ngram\", "
    "\"num_speculative_tokens\": 4}' (drafts copied from earlier text; also prompt_lookup_min/max), "
    "'{\"method\": \"draft_model\", \"model\": PATH, \"num_speculative_tokens\": 4}' (a small model with the "
    "same tokenizer) or '{\"method\": \"mtp\"}' (DeepSeek-V3's multi-token-prediction layer). "
    "Greedy output is unchanged; sampled output keeps its distribution.")]

MmprojOpt = Annotated[Optional[Path], typer.Option(
    "--mmproj", help="llama.cpp's vision projector file (mmproj-*.gguf) for a .gguf text model: LLaVA ('mlp' "
    "projectors) and Gemma 3; the two load as one vision model.")]
LimitImagesOpt = Annotated[Optional[int], typer.Option(
    "--limit-images-per-prompt", min=0, help="The most images one prompt may carry (vLLM's --limit-mm-per-prompt "
    "for images). Default: the model's own limit (8).")]

TensorParallelOpt = Annotated[int, typer.Option(
    "--tensor-parallel-size", min=1, help="Split the model across this many worker processes (torch.distributed: "
    "gloo on the CPU, NCCL on CUDA), each holding its share of the heads, MLP rows, vocabulary and KV cache.")]


def _load(model: str | None, dtype: str | None, device: str | None, speculative_config: str | None,
          tensor_parallel_size: int = 1, mmproj: Path | None = None, limit_images_per_prompt: int | None = None):
    from ownllm.config import SpeculativeConfig
    from ownllm.engine.llm import LLM

    speculative = SpeculativeConfig.parse(speculative_config)  # checked before the model loads
    started = time.perf_counter()
    with _spinner(f"Loading {model or BUNDLED_MODEL_NAME}..."):
        llm = LLM(model, dtype=dtype, device=device, speculative_config=speculative,
                  tensor_parallel_size=tensor_parallel_size, mmproj=_mmproj_path(mmproj),
                  limit_images_per_prompt=limit_images_per_prompt)
    return llm, time.perf_counter() - started


def _mmproj_path(mmproj: Path | None) -> str | None:
    """The --mmproj file as an absolute path (replicas may start elsewhere), or FileNotFoundError before loading."""
    if mmproj is None:
        return None
    path = mmproj.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--mmproj {mmproj}: no such file")
    return str(path.resolve())


@contextlib.contextmanager
def _spinner(label: str):
    """err.status(label); on a terminal a kernel build shows its progress in it (elsewhere, as stderr lines)."""
    from ownllm.kernels.progress import shown_by

    with err.status(label) as status:
        if not err.is_terminal:
            yield
            return

        def show(text: str, is_final: bool) -> None:
            if is_final:
                status.update(label)
                err.print(escape(text), highlight=False)
            else:
                status.update(f"{label} {escape(text.removeprefix('ownllm: '))}")

        with shown_by(show):
            yield


def _check_options(dtype: str | None, max_tokens: int, temperature, top_p, top_k, seed) -> None:
    """Fails fast, before the model loads, on option values no model could take."""
    from ownllm.config import normalize_dtype
    from ownllm.sampling_params import SamplingParams

    normalize_dtype(dtype)
    given = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    SamplingParams(**{name: value for name, value in given.items() if value is not None})


def _params(llm, max_tokens: int, temperature, top_p, top_k, seed):
    from ownllm.sampling_params import SamplingParams

    defaults = llm.default_sampling_params()
    temperature = temperature if temperature is not None else (
        defaults.temperature if "temperature" in llm.generation_config else 0.8)
    return SamplingParams(
        temperature=temperature, top_p=top_p if top_p is not None else defaults.top_p,
        top_k=top_k if top_k is not None else defaults.top_k, min_p=defaults.min_p,
        repetition_penalty=defaults.repetition_penalty, seed=seed, max_tokens=max_tokens,
    )


def _stream_answer(llm, prompt, params, verbose: bool) -> str:
    """Streams one answer to stdout; Ctrl-C stops the answer (not the program). -> the answer's text."""
    pieces: list[str] = []
    started = time.perf_counter()
    first_token_at = None
    stream = llm.stream(prompt, params)
    try:
        for piece in stream:
            first_token_at = first_token_at or time.perf_counter()
            pieces.append(piece)
            out.print(piece, end="", markup=False)
    except KeyboardInterrupt:
        stream.close()
        out.print()
        err.print("[dim](stopped)[/dim]")
        return "".join(pieces)
    out.print()
    if verbose and llm.last_output is not None:
        _print_stats(llm, prompt, started, first_token_at, len(llm.last_output.token_ids))
    return "".join(pieces)


def _print_stats(llm, prompt, started: float, first_token_at: float | None, num_generated: int) -> None:
    ended = time.perf_counter()
    first = first_token_at or ended
    num_prompt = len(prompt["prompt_token_ids"]) if isinstance(prompt, dict) else len(llm.tokenizer.encode(prompt))
    decode_tokens = max(num_generated - 1, 0)
    err.print(f"prompt: {num_prompt} tokens in {first - started:.2f}s ({num_prompt / max(first - started, 1e-9):.1f} tokens/s)")
    err.print(f"decode: {decode_tokens} tokens in {ended - first:.2f}s ({decode_tokens / max(ended - first, 1e-9):.1f} tokens/s)")
    stats = llm.engine.core.stats()
    steps, drafted = stats["spec_decode_sampling_steps_total"], stats["spec_decode_draft_tokens_total"]
    if drafted:  # totals since the model loaded
        accepted = stats["spec_decode_accepted_tokens_total"]
        err.print(f"speculation: {accepted}/{drafted} drafts accepted ({accepted / drafted:.0%}), "
                  f"mean accepted length {1 + accepted / max(steps, 1):.2f} tokens a step")


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="What to ask. Use - to read it from standard input.")],
    model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = None, max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = None, top_p: TopPOpt = None, top_k: TopKOpt = None, seed: SeedOpt = None,
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option(help="Send the prompt as is, without the model's chat template.")] = False,
    verbose: VerboseOpt = False, speculative_config: SpeculativeOpt = None,
    image: Annotated[Optional[list[Path]], typer.Option(
        help="An image file to ask about (repeat for several); needs a vision model such as LLaVA.")] = None,
    tensor_parallel_size: TensorParallelOpt = 1, mmproj: MmprojOpt = None,
    limit_images_per_prompt: LimitImagesOpt = None,
) -> None:
    """Answer one prompt and stream the answer to the terminal."""
    _check_options(dtype, max_tokens, temperature, top_p, top_k, seed)
    if image and raw:
        raise ValueError("--image goes through the chat template; drop --raw")
    if prompt == "-":
        prompt = sys.stdin.read()
    content = _with_images(image or [], prompt)
    llm, load_seconds = _load(model, dtype, device, speculative_config, tensor_parallel_size, mmproj,
                              limit_images_per_prompt)
    if verbose:
        err.print(f"load: {load_seconds:.2f}s")
    params = _params(llm, max_tokens, temperature, top_p, top_k, seed)
    if raw or (llm.tokenizer.chat_template is None and not image):
        request = prompt
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        request = llm.chat_prompt(messages)
    _stream_answer(llm, request, params, verbose)


def _with_images(paths: list[Path], text: str) -> str | list[dict]:
    """A user message's content: the images (read now, so a bad file fails before the model loads), then the text."""
    if not paths:
        return text
    from ownllm.multimodal.image_io import load_image_file

    return [{"type": "image", "image": load_image_file(path)} for path in paths] + [{"type": "text", "text": text}]


@app.command()
def chat(
    model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = None, max_tokens: MaxTokensOpt = 1024,
    temperature: TemperatureOpt = None, top_p: TopPOpt = None, top_k: TopKOpt = None, seed: SeedOpt = None,
    system: SystemOpt = None, verbose: VerboseOpt = False, speculative_config: SpeculativeOpt = None,
    tensor_parallel_size: TensorParallelOpt = 1, mmproj: MmprojOpt = None,
    limit_images_per_prompt: LimitImagesOpt = None,
) -> None:
    """Chat with a model in the terminal. /image PATH attaches an image to the next message (vision models), /reset
    clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops an answer."""
    _check_options(dtype, max_tokens, temperature, top_p, top_k, seed)
    llm, load_seconds = _load(model, dtype, device, speculative_config, tensor_parallel_size, mmproj,
                              limit_images_per_prompt)
    params = _params(llm, max_tokens, temperature, top_p, top_k, seed)
    system_messages = [{"role": "system", "content": system}] if system else []
    history = list(system_messages)
    images: list[Path] = []  # attached with /image, sent with the next message
    err.print(f"[dim]{BUNDLED_MODEL_NAME if model is None else model} loaded in {load_seconds:.1f}s. "
              "/image PATH attaches an image, /reset clears the history, /exit quits, Ctrl-C stops an answer.[/dim]")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/bye", "/quit"):
            return
        if line.strip() == "/reset":
            history = list(system_messages)
            err.print("[dim](history cleared)[/dim]")
            continue
        if line.strip().startswith("/image"):
            path = Path(line.strip()[len("/image"):].strip())
            if not path.is_file():
                err.print(f"[red]error:[/red] image file {escape(str(path))} does not exist")
                continue
            images.append(path)
            err.print(f"[dim](image {escape(path.name)} attached to your next message)[/dim]")
            continue
        try:
            content = _with_images(images, line)
        except ValueError as error:  # a file that is not an image
            err.print(f"[red]error:[/red] {escape(str(error))}")
            continue
        finally:
            images = []
        history.append({"role": "user", "content": content})
        try:
            prompt = llm.chat_prompt(history)
        except ValueError as error:  # e.g. the conversation outgrew the context, or images to a text-only model
            history.pop()
            err.print(f"[red]error:[/red] {escape(str(error))}")
            continue
        answer = _stream_answer(llm, prompt, params, verbose)
        history.append({"role": "assistant", "content": answer})


@app.command()
def models(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="GGUF files or checkpoint folders to describe too.")] = None,
) -> None:
    """List the models available locally: the bundled one, the Hugging Face cache, and any paths given."""
    from rich.table import Table

    from ownllm.model_list import list_local_models

    table = Table("name", "source", "architecture", "size", "path")
    for entry in list_local_models(paths or []):
        table.add_row(entry.name, entry.source, entry.architecture, entry.size, entry.path)
    out.print(table)


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="A hub model: ORG/REPO (a checkpoint: weights, configs, tokenizer) or "
                                         "ORG/REPO:QUANT (one GGUF file of the repo; Q4_K_M when a GGUF repo "
                                         "is named alone).")],
) -> None:
    """Download a model from the Hugging Face hub into its cache (resumable), with a progress bar."""
    from ownllm.hub import pull as pull_model

    path = pull_model(model)
    out.print(f"{escape(model)}: {escape(str(path))}")


@app.command()
def rm(model: Annotated[str, typer.Argument(help="A hub model (ORG/REPO) in the Hugging Face cache.")]) -> None:
    """Remove a model from the Hugging Face cache."""
    from ownllm.hub import remove
    from ownllm.model_list import human_size

    freed = remove(model)
    out.print(f"removed {escape(model)} ({human_size(freed)} freed)")


@app.command()
def show(
    model: ModelOpt = None,
    template: Annotated[bool, typer.Option("--template", help="Print the chat template itself.")] = False,
) -> None:
    """Describe a model: architecture, parameters, context, quantization, chat template and capabilities."""
    from ownllm.loader.resolve import resolve_model
    from ownllm.model_info import model_info

    info = model_info(resolve_model(model))
    chat_template = f"{len(info.chat_template)} characters" if info.chat_template else "none"
    for label, value in (("architecture", info.architecture), ("parameters", info.parameters),
                         ("context length", info.context_length or "unknown"), ("quantization", info.quantization),
                         ("chat template", chat_template), ("capabilities", ", ".join(info.capabilities))):
        out.print(f"{label:<16}{escape(str(value))}")
    if template and info.chat_template:
        out.print(escape(info.chat_template))


@app.command()
def serve(
    model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on. The default keeps the server private to this "
                                      "machine; 0.0.0.0 opens it to the network (then set --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on (vLLM's 8000; point Ollama clients "
                                      "at it with OLLAMA_HOST=http://127.0.0.1:8000).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="OWNLLM_API_KEY", help="Require 'Authorization: Bearer "
                                                   "KEY' on every /v1 and /api request.")] = None,
    cors_origins: Annotated[Optional[list[str]], typer.Option(
        help="Let web pages from these origins call the server (repeat or comma-separate; '*' for any). "
        "Default: none.")] = None,
    max_waiting: Annotated[Optional[int], typer.Option(min=0, help="Answer 503 with Retry-After to a new request when "
                                                       "this many already wait. Default: no limit.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model name clients send. Default: the model's "
                                                             "file or folder name, or the hub id.")] = None,
    kv_cache_memory: Annotated[Optional[str], typer.Option(
        help="Memory for the paged KV cache, e.g. 4GiB or 512MB. Default: what --max-num-seqs full-length "
        "sequences need, at most 2 GiB or a quarter of free memory.")] = None,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Most requests decoded together in one step.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(
        min=1, help="Token budget of one engine step; longer prompts are prefilled in chunks of this size.")] = 512,
    max_model_len: Annotated[Optional[int], typer.Option(
        min=1, help="The longest prompt plus answer served, in tokens (at most the model's context, which is the "
        "default).")] = None,
    no_prefix_caching: Annotated[bool, typer.Option(
        "--no-prefix-caching", help="Do not reuse the KV cache of earlier requests' shared prompt prefixes.")] = False,
    speculative_config: SpeculativeOpt = None,
    tensor_parallel_size: TensorParallelOpt = 1,
    responses_store_size: Annotated[int, typer.Option(
        min=0, help="Responses the Responses API (/v1/responses) keeps in memory for GET and previous_response_id; "
        "the least recently used are forgotten first.")] = 1000,
    embedding_model: Annotated[Optional[str], typer.Option(
        help="An embedding model (a sentence-transformers BertModel folder or hub id) to serve beside the chat "
        "model at /v1/embeddings, /api/embed and /api/embeddings; a request's `model` field picks the model. "
        "An embedding model given as --model is served alone.")] = None,
    max_body_size: Annotated[str, typer.Option(help="Largest request body, e.g. 16MiB; a larger one gets 413.")] = "16MiB",
    max_messages: Annotated[int, typer.Option(min=1, help="Most messages in one chat request.")] = 1024,
    max_completion_tokens: Annotated[Optional[int], typer.Option(
        min=1, help="Most tokens one answer may ask for (max_tokens, num_predict); also the cap of a request that "
        "names none. Default: the model's context.")] = None,
    max_n: Annotated[int, typer.Option(min=1, help="Most samples (n) one request may ask for.")] = 16,
    max_stop: Annotated[int, typer.Option(min=0, help="Most stop strings (and, apart, stop token ids) in one "
                                          "request.")] = 32,
    max_logprobs: Annotated[int, typer.Option(min=0, help="Most alternatives per token a request may ask logprobs "
                                              "for.")] = 20,
    request_timeout: Annotated[Optional[float], typer.Option(
        min=0.001, help="Stop a request that runs longer than this many seconds (answered 408) and free its memory. "
        "Default: none (max_tokens and the context already bound every request).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM or Ctrl-C: seconds to let running requests finish (new ones get 503) before "
        "stopping them and exiting.")] = 30.0,
    tool_call_parser: Annotated[Optional[str], typer.Option(
        help="How to read tool calls out of answers: hermes, llama3_json, pythonic, mistral, deepseek_v3 or none. "
        "Default: the format the model's chat template writes.")] = None,
    reasoning_parser: Annotated[Optional[str], typer.Option(
        help="How to split reasoning from answers: qwen3, deepseek_r1 or none. Default: from the chat "
        "template.")] = None,
    reasoning_budget: Annotated[Optional[int], typer.Option(
        min=0, help="Most reasoning tokens of a thinking model's answer before the server ends the thinking "
        "itself (a request's thinking_budget or reasoning_effort overrides it). Default: no limit.")] = None,
    max_compute_samples: Annotated[int, typer.Option(
        min=1, help="The most samples one request's `compute` field may ask for.")] = 64,
    verifier_model: Annotated[Optional[str], typer.Option(
        help="The model that scores samples of `compute` requests with scorer \"verifier\" (a folder, hub id or "
        "GGUF file, loaded beside the served model). Default: the served model itself.")] = None,
    structured_outputs_backend: Annotated[str, typer.Option(
        help="What compiles JSON schemas, regexes and grammars into token masks: llguidance, or xgrammar "
        "(pip install 'ownllm[xgrammar]').")] = "llguidance",
    allowed_media_domains: Annotated[Optional[list[str]], typer.Option(
        help="Hosts whose http(s) image URLs requests may send (repeat or comma-separate; exact host names). The "
        "fetch refuses private, loopback and link-local addresses. Default: none (images as data: URLs only).")] = None,
    max_image_size: Annotated[str, typer.Option(help="Largest encoded image a request may send or have fetched, "
                                                "e.g. 20MiB.")] = "20MiB",
    mmproj: MmprojOpt = None, limit_images_per_prompt: LimitImagesOpt = None,
    replicas: Annotated[Optional[int], typer.Option(
        min=1, help="Serve with this many engine replicas, each its own process, on Ray Serve (pip install "
        "'ownllm[ray]'); a local Ray is started unless --ray-address names a cluster.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="An existing Ray cluster to run the replicas on (e.g. ray://HEAD:10001 or HEAD:6379; 'auto': the "
        "cluster this machine joined).")] = None,
    threads_per_replica: Annotated[Optional[int], typer.Option(
        min=1, help="CPU threads (and Ray CPUs) per replica. Default: 1.")] = None,
    min_replicas: Annotated[Optional[int], typer.Option(
        min=1, help="Autoscale: the fewest replicas (scaled on requests in flight and KV-cache use).")] = None,
    max_replicas: Annotated[Optional[int], typer.Option(
        min=1, help="Autoscale: the most replicas.")] = None,
    no_prefix_routing: Annotated[bool, typer.Option(
        "--no-prefix-routing", help="With replicas: route by load alone, not to the replica that holds a "
        "request's prompt prefix in its cache.")] = False,
) -> None:
    """Serve a model over HTTP: the OpenAI API (with Responses) and Anthropic's Messages API under /v1, the Ollama API
    under /api, /health and /metrics."""
    from ownllm.config import (
        CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig, normalize_dtype, parse_memory_size, resolve_device,
    )
    from ownllm.loader.resolve import resolve_model
    from ownllm.server import ServerSettings
    from ownllm.server.launch import ServeSpec, build_server
    from ownllm.server.limits import RequestLimits
    from ownllm.server.shutdown import serve as serve_app
    from ownllm.structured_output import check_backend

    normalize_dtype(dtype)  # every option is checked before the model loads
    resolve_device(device)
    _check_parsers(tool_call_parser, reasoning_parser)
    check_backend(structured_outputs_backend)
    scaling = _replica_scaling(replicas, min_replicas, max_replicas, ray_address, threads_per_replica)
    config = EngineConfig(
        None, dtype, device,
        CacheConfig(memory_bytes=parse_memory_size(kv_cache_memory) if kv_cache_memory else None,
                    enable_prefix_caching=not no_prefix_caching),
        SchedulerConfig(max_num_batched_tokens, max_num_seqs), SpeculativeConfig.parse(speculative_config),
        reasoning_parser=reasoning_parser, tool_call_parser=tool_call_parser,
        structured_outputs_backend=structured_outputs_backend, tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len, mmproj=_mmproj_path(mmproj), limit_images_per_prompt=limit_images_per_prompt)
    limits = RequestLimits(parse_memory_size(max_body_size), max_messages, max_completion_tokens, max_n, max_stop,
                           max_logprobs)
    origins = tuple(o.strip() for value in cors_origins or [] for o in value.split(",") if o.strip())
    media_domains = tuple(d.strip().lower() for value in allowed_media_domains or [] for d in value.split(",")
                          if d.strip())
    max_image_bytes = parse_memory_size(max_image_size)
    _check_port_free(host, port)
    if not _is_loopback(host) and not api_key:
        err.print(f"[yellow]warning:[/yellow] listening on {escape(host)} without --api-key: anyone who can reach "
                  "this port can use the model (set --api-key or OWNLLM_API_KEY)")
    path = resolve_model(model)
    name = served_model_name or _served_name(model, path)
    embedding = None
    if embedding_model:
        embedding_path = resolve_model(embedding_model)
        embedding = (str(embedding_path), _served_name(embedding_model, embedding_path))
        if embedding[1] == name:
            raise ValueError(f"the chat model and the embedding model are both named {name}; rename one "
                             "(--served-model-name)")
    verifier = None
    if verifier_model:
        verifier_path = resolve_model(verifier_model)
        verifier = (str(verifier_path), _served_name(verifier_model, verifier_path))
    settings = ServerSettings(api_key=api_key or None, cors_origins=origins, model_path=path, limits=limits,
                              request_timeout=request_timeout, reasoning_budget=reasoning_budget,
                              responses_store_size=responses_store_size,
                              max_compute_samples=max_compute_samples, allowed_media_domains=media_domains,
                              max_image_bytes=max_image_bytes)
    spec = ServeSpec(replace(config, model=str(path)), name, settings, max_waiting, embedding, verifier)
    if scaling is not None:
        from ownllm.ray_serve.deploy import serve_replicas

        with _spinner(f"Starting {scaling.describe()} of {model or BUNDLED_MODEL_NAME} on Ray Serve..."):
            deployment = serve_replicas(spec, scaling, prefix_routing=not no_prefix_routing)
        app, drain, closer = deployment.app, deployment.drain, deployment.shutdown
    else:
        with _spinner(f"Loading {model or BUNDLED_MODEL_NAME}..."):
            server = build_server(spec)
        app, drain, closer = server.app, server.app.state.ctx.drain, server.shutdown
    served = escape(name) + (f" and {escape(embedding[1])}" if embedding else "")
    err.print(f"Serving {served} at http://{escape(host)}:{port} (OpenAI and Anthropic APIs: /v1, Ollama API: /api)")
    try:
        serve_app(app, drain, host, port, shutdown_timeout)
    finally:
        closer()


def _replica_scaling(replicas: int | None, min_replicas: int | None, max_replicas: int | None,
                     ray_address: str | None, threads_per_replica: int | None):
    """The Ray Serve replicas asked for, or None for one in-process engine; without the extra, a one-line error."""
    if replicas is None and min_replicas is None and max_replicas is None and ray_address is None:
        if threads_per_replica is not None:
            raise ValueError("--threads-per-replica needs --replicas (or --min-replicas/--max-replicas)")
        return None
    from ownllm.ray_serve import ReplicaScaling

    return ReplicaScaling.of(replicas, min_replicas, max_replicas, ray_address, threads_per_replica)


def _check_parsers(tool_call_parser: str | None, reasoning_parser: str | None) -> None:
    from ownllm.parsers.reasoning import reasoning_parser as reasoning_parser_named
    from ownllm.parsers.tool_parsers import tool_parser as tool_parser_named

    if tool_call_parser not in (None, "none"):
        tool_parser_named(tool_call_parser)
    if reasoning_parser not in (None, "none"):
        reasoning_parser_named(reasoning_parser)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@app.command(name="eval")
def eval_(
    family: Annotated[str, typer.Option(help="Task family: chain, percent, units or algebra.")] = "chain",
    model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = None,
    server: Annotated[Optional[str], typer.Option(help="A running ownllm server's URL (instead of --model), e.g. "
                                                  "http://127.0.0.1:8000.")] = None,
    split: Annotated[str, typer.Option(help="heldout (report) or dev (tune).")] = "heldout",
    limit: Annotated[int, typer.Option(min=1, help="Problems to run (the split's first).")] = 100,
    strategies: Annotated[str, typer.Option(help="Comma-separated: vote, vote_early_stop, best_of, "
                                            "best_of_verifier.")] = "vote,best_of",
    samples: Annotated[str, typer.Option(help="Comma-separated sample counts.")] = "1,2,4,8,16",
    max_tokens: Annotated[int, typer.Option(help="Most tokens per sample.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the samples.")] = 0.7,
    output: Annotated[Path, typer.Option("--out", help="Where to write the JSON results (rewritten after each run; "
                                         "one line per problem goes to the same name with .problems.jsonl as it "
                                         "finishes).")] = Path("eval.json"),
    plot: Annotated[Optional[Path], typer.Option(help="Also draw a PNG plot here (needs ownllm[plot]).")] = None,
    greedy: Annotated[bool, typer.Option(help="Also run greedy decoding, the baseline.")] = True,
    replay: Annotated[bool, typer.Option("--replay", help="One request of the largest sample count per problem, "
                                         "every strategy at every count replayed on subsets of its samples (an "
                                         "early-stopping vote step by step): the whole curve for the cost of one "
                                         "run.")] = False,
    from_lines: Annotated[Optional[Path], typer.Option(help="Rebuild the results from a run's .problems.jsonl "
                                                       "(finished or interrupted) instead of running a model: real "
                                                       "runs summarized, replayed samples replayed again for "
                                                       "--strategies and --samples.")] = None,
) -> None:
    """Accuracy vs samples for each strategy, beside greedy, on generated problems with exact checkers."""
    import json

    from ownllm.evals import run as evals
    from ownllm.evals.tasks import problems

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in evals.STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown[0]!r}; choose from {', '.join(evals.STRATEGIES)}")
    counts = [int(c) for c in samples.split(",")]
    label = server or model or (from_lines.name.split(".")[0] if from_lines else BUNDLED_MODEL_NAME)
    meta = {"model": label, "family": family, "split": split,
            "max_tokens": max_tokens, "temperature": temperature}
    if from_lines is not None:
        lines = [json.loads(line) for line in from_lines.read_text().splitlines() if line.strip()]
        results = evals.rebuild(lines, names, counts)
        meta["num_problems"] = max((r.num_problems for r in results), default=0)
    else:
        chosen = problems(family, split, limit)
        meta["num_problems"] = len(chosen)
        results = _eval_runs(evals, chosen, names, counts, replay, greedy, output, meta,
                             evals.server_solver(server, None, max_tokens, temperature) if server else
                             evals.offline_solver(_load(model, dtype, device, None)[0], max_tokens, temperature))
    report = evals.as_json(results, meta)
    output.write_text(json.dumps(report, indent=2))
    for r in results:
        seconds = f"{r.seconds_per_problem:.2f} s/problem" if r.seconds_per_problem is not None else (
            f"replayed from x{r.replayed_from}")
        out.print(f"{r.strategy:<18}x{r.samples:<3} accuracy {r.accuracy:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]  "
                  f"{r.tokens_per_problem:.0f} tokens  {seconds}")
    if plot is not None:
        from ownllm.evals.plot import plot as draw

        draw(report, plot)


def _eval_runs(evals, chosen, names, counts, replay, greedy, output, meta, solve) -> list:
    """The model runs of `ownllm eval`: the replayed curve first (if asked), then each real run; each problem's
    line appended to OUTPUT.problems.jsonl as it finishes, the JSON rewritten after each run."""
    import json

    from rich.progress import Progress

    replayed = names if replay else []
    runs = [("greedy", 1)] * greedy + [(name, count) for name in names if name not in replayed for count in counts]
    lines = output.with_suffix(".problems.jsonl")
    lines.write_text("")

    def record(line: dict) -> None:
        with lines.open("a") as f:
            f.write(json.dumps(line) + "\n")

    results = []
    with Progress(console=err) as progress:
        task = progress.add_task("eval", total=(len(runs) + bool(replayed)) * len(chosen))
        advance = lambda: progress.advance(task)  # noqa: E731
        if replayed:  # first: the curve is what the run is for
            progress.update(task, description=f"{max(counts)} samples, replayed")
            results += evals.evaluate_curve(solve, chosen, replayed, counts, advance, record)
        for name, count in runs:
            progress.update(task, description=f"{name} x{count}")
            results.append(evals.evaluate(solve, chosen, name, count, advance, record))
            output.write_text(json.dumps(evals.as_json(results, meta), indent=2))
    return results


@app.command()
def bench(
    model: ModelOpt = None, dtype: DtypeOpt = None, device: DeviceOpt = None,
    concurrency: Annotated[str, typer.Option(help="Concurrent streams to measure, comma-separated; each stream sends "
                                             "one request.")] = "1,4,16,64",
    prompt_tokens: Annotated[int, typer.Option(help="Tokens in each request's prompt (every prompt distinct, so "
                                               "none reuses another's KV cache).")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Tokens each request generates (greedy, EOS ignored).")] = 64,
    output: Annotated[Path, typer.Option("--json", help="Where to write the report (what `ownllm plan --from` "
                                         "reads).")] = Path("bench.json"),
    plot: Annotated[Optional[Path], typer.Option(help="Also draw throughput and latency against concurrency in this "
                                                 "PNG (needs ownllm[plot]).")] = None,
) -> None:
    """Measure what this machine serves with a model: load time, prefill and decode tokens/s at batch 1, then
    aggregate tokens/s, TTFT and ITL (p50, p99) at each concurrency, through the engine `ownllm serve` runs."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ownllm.capacity import bench as capacity
    from ownllm.capacity.render import bench_summary, bench_table
    from ownllm.config import normalize_dtype, resolve_device

    normalize_dtype(dtype)  # every option is checked before the model loads
    resolve_device(device)
    settings = capacity.BenchSettings(capacity.parse_concurrency(concurrency), prompt_tokens, new_tokens)
    for option, path in (("--json", output), ("--plot", plot)):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{option} {path}: the folder {path.parent} does not exist")
    if plot is not None:
        from ownllm.plotting import pyplot

        pyplot()
    columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
               TimeElapsedColumn())
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("", total=settings.num_requests)
        report = capacity.run_bench(model, dtype, device, settings, capacity.Progress(
            lambda text: bar.update(task, description=text), lambda: bar.advance(task)))
    output.write_text(json.dumps(report, indent=2))
    out.print(escape(bench_summary(report)))
    out.print(bench_table(report))
    out.print(f"report: {escape(str(output))}")
    if plot is not None:
        from ownllm.capacity.plot import plot as draw

        draw(report, plot)
        out.print(f"plot: {escape(str(plot))}")


@app.command()
def plan(
    source: Annotated[Path, typer.Option("--from", help="A report written by `ownllm bench`.")] = Path("bench.json"),
    ttft: Annotated[str, typer.Option(help="Target time to first token: 2s, 500ms, or seconds (0.5).")] = "2s",
    itl: Annotated[str, typer.Option(help="Target inter-token latency: 100ms, 0.1s, or seconds (0.1).")] = "100ms",
    percentile: Annotated[str, typer.Option(help="Which percentile of TTFT and ITL must meet the targets: p50 or "
                                            "p99.")] = "p99",
    price_per_hour: Annotated[Optional[float], typer.Option(help="What the machine costs per hour, for the cost "
                                                            "per million tokens.")] = None,
    users: Annotated[Optional[int], typer.Option(help="Concurrent users to serve: how many such machines they "
                                                 "need.")] = None,
    output: Annotated[Optional[Path], typer.Option("--json", help="Also write the plan as JSON here ('-': print it "
                                                   "instead of the tables).")] = None,
) -> None:
    """How many concurrent users this machine serves within latency targets (the largest measured concurrency whose
    TTFT and ITL meet them), its tokens per day, the cost per million tokens, and the machines N users need."""
    import json

    from ownllm.capacity.plan import load_report, make_plan, parse_duration
    from ownllm.capacity.render import cannot_meet, levels_table, plan_table

    ttft_s, itl_s = parse_duration(ttft, "--ttft"), parse_duration(itl, "--itl")
    the_plan = make_plan(load_report(source), ttft_s, itl_s, percentile, price_per_hour, users, f"--from {source}")
    if output is not None:
        text = json.dumps(the_plan.as_json(), indent=2)
        if str(output) == "-":
            out.print(text, markup=False)
        else:
            output.write_text(text)
    if output is None or str(output) != "-":
        out.print(levels_table(the_plan))
        out.print(plan_table(the_plan) if the_plan.chosen else escape(cannot_meet(the_plan)))
    if the_plan.chosen is None:
        raise typer.Exit(1)


def _served_name(model: str | None, path: Path) -> str:
    if model is None or model.lower() == BUNDLED_MODEL_NAME:
        return BUNDLED_MODEL_NAME
    if Path(model).expanduser().exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return model


def _check_port_free(host: str, port: int) -> None:
    """Fails fast, before the model loads, when the address cannot be listened on."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ValueError(f"cannot listen on {host!r}: {error.strerror}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def main() -> None:
    try:
        app()
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        err.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
