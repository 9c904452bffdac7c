"""build_engine: the one function that turns an EngineConfig into a running Engine, for the offline LLM, the
AsyncEngine and `ownllm serve` alike: it loads the checkpoint, builds the model runner (with its draft
proposer when speculating), the KV-cache manager and the engine core, and knows the model's sampling defaults.
"""

from __future__ import annotations

from ownllm.config import EngineConfig, resolve_device
from ownllm.engine.core import EngineCore
from ownllm.engine.engine import Engine
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.loader import load_checkpoint
from ownllm.sampling_params import SamplingParams

_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def build_engine(config: EngineConfig) -> Engine:
    """-> an Engine on the configured model, ready to take requests."""
    from ownllm.worker.model_runner import ModelRunner

    device = resolve_device(config.device)  # before loading: a bad device fails fast
    checkpoint = load_checkpoint(config.model, config.dtype, keep_quantized=device == "cpu")
    tokenizer = checkpoint.tokenizer
    runner = ModelRunner(checkpoint, config.cache, tokenizer.eos_token_ids, config.scheduler.max_num_seqs, device,
                         config.speculative, config.backends)
    block_size = config.cache.block_size
    kv_cache = KVCacheManager(runner.num_blocks, block_size, config.cache.enable_prefix_caching)
    max_model_len = min(checkpoint.config.max_model_len, runner.num_blocks * block_size)
    speculative = config.speculative
    core = EngineCore(runner, kv_cache, tokenizer, max_model_len, config.scheduler,
                      speculative.num_lookahead_tokens if speculative else 0,
                      spec_method=speculative.method if speculative else None)
    return Engine(core, tokenizer, checkpoint.config, checkpoint.generation_config, checkpoint.path)


def default_sampling_params(generation_config: dict) -> SamplingParams:
    """The model's own sampling defaults from generation_config.json, as vLLM applies them."""
    values = {k: generation_config[k] for k in _GENERATION_CONFIG_KEYS if k in generation_config}
    if generation_config.get("do_sample") is False:
        values["temperature"] = 0.0
    return SamplingParams(**values)
