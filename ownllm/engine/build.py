"""build_engine: the one function that turns an EngineConfig into a running Engine, for the offline LLM, the
AsyncEngine and `ownllm serve` alike: it loads the checkpoint, builds the executor (the model runner, with its
draft proposer when speculating, or tensor-parallel workers), the KV-cache manager and the engine core, and
knows the model's sampling defaults.

Loading runs torch on one thread (load_threads): its work is many small, memory-bound copies (repacking, fusing,
undoing llama.cpp's row order), where a parallel region costs more in OpenMP barriers than it saves, and far more
when another process holds a core (the bundled model's load: 0.44 s on one thread, 1.2-3.4 s on two, measured on a
shared 2-core machine). The thread count is restored before the engine runs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from ownllm.config import EngineConfig, resolve_device
from ownllm.distributed.executor import Executor, MultiprocExecutor, UniprocExecutor
from ownllm.engine.core import EngineCore
from ownllm.engine.engine import Engine
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.engine.structured_output import ReasoningTokens, StructuredOutputManager
from ownllm.loader import Checkpoint, load_checkpoint
from ownllm.multimodal.registry import image_processor
from ownllm.parsers.reasoning import ReasoningParser, detect_reasoning_parser, reasoning_parser
from ownllm.parsers.tool_parsers import detect_tool_parser, tool_parser
from ownllm.sampling_params import SamplingParams
from ownllm.tokenizer import Tokenizer

_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def build_engine(config: EngineConfig) -> Engine:
    """-> an Engine on the configured model, ready to take requests."""
    device = resolve_device(config.device)  # before loading: a bad device fails fast
    # with tensor-parallel workers, which load their own shards, this process needs no weights
    with load_threads():
        checkpoint = load_checkpoint(config.model, config.dtype, keep_quantized=device == "cpu",
                                     with_tensors=config.tensor_parallel_size == 1, mmproj=config.mmproj)
    tokenizer = checkpoint.tokenizer
    executor = _executor(config, checkpoint, device)
    block_size = config.cache.block_size
    kv_cache = KVCacheManager(executor.num_blocks, block_size, config.cache.enable_prefix_caching)
    max_model_len = min(_max_model_len(config, checkpoint.config.max_model_len), executor.num_blocks * block_size)
    speculative = config.speculative
    reasoning = _reasoning_parser(config, tokenizer)
    structured_output = StructuredOutputManager(
        checkpoint.config.vocab_size, _grammar_compiler(config, tokenizer, checkpoint.config.vocab_size),
        _reasoning_tokens(reasoning, tokenizer))
    core = EngineCore(executor, kv_cache, tokenizer, max_model_len, config.scheduler,
                      speculative.num_lookahead_tokens if speculative else 0,
                      spec_method=speculative.method if speculative else None, structured_output=structured_output)
    return Engine(core, tokenizer, checkpoint.config, checkpoint.generation_config, checkpoint.path, reasoning,
                  _tool_parser_name(config, tokenizer), image_processor(checkpoint, config.limit_images_per_prompt))


def _executor(config: EngineConfig, checkpoint: Checkpoint, device: str) -> Executor:
    """The model runner in this process, or (tensor_parallel_size > 1) worker processes that each load their
    shard of the checkpoint themselves; this process then keeps only its config and tokenizer."""
    if config.tensor_parallel_size > 1:
        return MultiprocExecutor(config, device)
    from ownllm.worker.model_runner import ModelRunner

    with load_threads():
        runner = ModelRunner(checkpoint, config.cache, checkpoint.tokenizer.eos_token_ids,
                             config.scheduler.max_num_seqs, device, config.speculative, config.backends)
    return UniprocExecutor(runner)


@contextlib.contextmanager
def load_threads() -> Iterator[None]:
    """torch on one intra-op thread inside, this thread's count as it was afterwards (see the module docstring)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _max_model_len(config: EngineConfig, model_context: int) -> int:
    """The configured max_model_len, which may shorten the model's context but never lengthen it."""
    if config.max_model_len is None:
        return model_context
    if not 0 < config.max_model_len <= model_context:
        raise ValueError(f"max_model_len must be in [1, {model_context}] (the model's context), "
                         f"got {config.max_model_len}")
    return config.max_model_len


def _template_text(tokenizer: Tokenizer) -> str | None:
    template = tokenizer.chat_template
    return "\n".join(template.values()) if isinstance(template, dict) else template


def _reasoning_parser(config: EngineConfig, tokenizer: Tokenizer) -> ReasoningParser | None:
    name = config.reasoning_parser or detect_reasoning_parser(_template_text(tokenizer))
    return None if name in (None, "none") else reasoning_parser(name)


def _tool_parser_name(config: EngineConfig, tokenizer: Tokenizer) -> str | None:
    name = config.tool_call_parser or detect_tool_parser(_template_text(tokenizer))
    if name in (None, "none"):
        return None
    tool_parser(name)  # an unknown name fails here, at start-up
    return name


def _reasoning_tokens(parser: ReasoningParser | None, tokenizer: Tokenizer) -> ReasoningTokens | None:
    """The reasoning block's start and end as single tokens, or None (then budgets and delayed grammars are off)."""
    ids = parser.tag_token_ids(tokenizer) if parser is not None else None
    return ReasoningTokens(*ids) if ids else None


def _grammar_compiler(config: EngineConfig, tokenizer: Tokenizer, vocab_size: int):
    """The backend's compile, the backend (and its vocabulary index) made when the first grammar comes."""
    backend = None

    def compile_grammar(spec):
        nonlocal backend
        if backend is None:
            from ownllm.structured_output import grammar_backend

            backend = grammar_backend(config.structured_outputs_backend, tokenizer, vocab_size)
        return backend.compile(spec)

    return compile_grammar


def default_sampling_params(generation_config: dict) -> SamplingParams:
    """The model's own sampling defaults from generation_config.json, as vLLM applies them."""
    values = {k: generation_config[k] for k in _GENERATION_CONFIG_KEYS if k in generation_config}
    if generation_config.get("do_sample") is False:
        values["temperature"] = 0.0
    return SamplingParams(**values)
