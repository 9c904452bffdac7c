"""Frozen, normalized settings: what a model is (ModelConfig) and what the engine may use (EngineConfig).

Everything here is plain data, validated once when built; a bad value raises ValueError naming it.
It imports no torch, so the control plane (engine/) can use it freely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_device(device: str | None) -> str:
    """'cpu' (the default), 'cuda' or 'cuda:N', checked against what this torch build can use -> the name
    ('cpu' for any CPU device)."""
    import torch

    name = device or "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch build sees no CUDA GPU (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False)")
    return "cpu" if kind == "cpu" else name


def normalize_dtype(dtype: str | None) -> str | None:
    """'bf16' -> 'bfloat16'; None and 'auto' stay None (meaning: the checkpoint's own dtype)."""
    if dtype is None or dtype == "auto":
        return None
    name = _DTYPE_ALIASES.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return name


# transformers' config defaults for the language models of multimodal checkpoints, whose text_config holds only
# what differs from them (llava-hf/llava-1.5-7b-hf's names no hidden_size)
_TEXT_CONFIG_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, sliding_window=4096),
}


def _rope_settings(hf: Mapping[str, Any], layer_type: str = "full_attention") -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`.
    v5 may key them by layer type (Gemma 3: {"full_attention": {...}, "sliding_attention": {...}})."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params or "sliding_attention" in params:
        params = dict(params.get(layer_type) or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or dict(hf.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type in ("default", "mrope"):  # v4's "mrope" (Qwen2.5-VL) is default rope split by its mrope_section
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}


def _sliding_rope(hf: Mapping[str, Any]) -> tuple[float, dict | None] | None:
    """(rope_theta, rope_scaling) of the sliding-window layers where they have their own (Gemma 3's local layers:
    v5 `rope_parameters["sliding_attention"]`, v4 `rope_local_base_freq` without scaling); None: as the others."""
    params = hf.get("rope_parameters") or {}
    if "sliding_attention" in params:
        return _rope_settings(hf, "sliding_attention")
    if hf.get("rope_local_base_freq") is not None:
        return float(hf["rope_local_base_freq"]), None
    return None


def _optional_float(hf: Mapping[str, Any], key: str) -> float | None:
    return None if hf.get(key) is None else float(hf[key])


def _layer_types(hf: Mapping[str, Any], num_layers: int, sliding_window: int | None) -> tuple[str, ...]:
    """Per layer 'full_attention' or 'sliding_attention', the way transformers decides it."""
    if hf.get("layer_types"):
        types = tuple(hf["layer_types"])
        if len(types) != num_layers:
            raise ValueError(f"layer_types has {len(types)} entries but num_hidden_layers is {num_layers}")
        return types if sliding_window else tuple("full_attention" for _ in types)
    if not sliding_window:
        return ("full_attention",) * num_layers
    if hf.get("sliding_window_pattern"):  # Gemma 3 style: every pattern-th layer global, the others local
        pattern = int(hf["sliding_window_pattern"])
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))
    if "use_sliding_window" in hf:  # Qwen2 style: sliding only from max_window_layers on
        if not hf["use_sliding_window"]:
            return ("full_attention",) * num_layers
        first = int(hf.get("max_window_layers", 0))
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    return ("sliding_attention",) * num_layers


@dataclass(frozen=True)
class ModelConfig:
    """One model's shape and numerics, normalized from its HF config.json (or a GGUF file's metadata)."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    layer_types: tuple[str, ...]
    dtype: str  # the compute dtype: activations, norms, the KV cache
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # a 16-bit dtype the Linear weights and the token embedding stay in while the model computes in float32 (CPUs
    # without bfloat16 arithmetic: layers/linear.py), or None: every weight in `dtype`
    weight_dtype: str | None = None
    # encoders (BERT): post-norm LayerNorm, the feed-forward activation and token-type (segment) embeddings
    layer_norm_eps: float = 1e-12
    hidden_act: str = "silu"
    type_vocab_size: int = 0
    # Gemma 3: the sliding-window layers' own rope (theta, scaling); attention scale query_pre_attn_scalar**-0.5
    # (None: head_dim**-0.5); tanh soft-capping of the final logits (None: off)
    sliding_rope: tuple[float, dict | None] | None = None
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dtype: str | None = None) -> "ModelConfig":
        from ownllm.models.registry import check_supported  # a table of names: imports no model, no torch

        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell which model this is")
        check_supported(archs[0])  # before any field: other architectures name their fields differently
        text = hf.get("text_config")
        if text:  # multimodal wrappers keep the language model's shape in text_config
            hf = {**_TEXT_CONFIG_DEFAULTS.get(text.get("model_type"), {}), **hf, **text}
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        num_layers = int(hf["num_hidden_layers"])
        sliding_window = hf.get("sliding_window") or None
        if sliding_window is not None and hf.get("use_sliding_window") is False:
            sliding_window = None
        theta, scaling = _rope_settings(hf)
        config_dtype = hf.get("dtype") or hf.get("torch_dtype")
        config = cls(
            architecture=archs[0],
            model_type=hf.get("model_type", ""),
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf.get("intermediate_size", 4 * hidden)),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(sliding_window) if sliding_window else None,
            layer_types=_layer_types(hf, num_layers, sliding_window),
            dtype=normalize_dtype(dtype) or normalize_dtype(config_dtype) or "float32",
            hf_config=dict(hf),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            hidden_act=str(hf.get("hidden_activation") or hf.get("hidden_act", "silu")),
            type_vocab_size=int(hf.get("type_vocab_size", 0)),
            sliding_rope=_sliding_rope(hf),
            query_pre_attn_scalar=_optional_float(hf, "query_pre_attn_scalar"),
            final_logit_softcapping=_optional_float(hf, "final_logit_softcapping"),
        )
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size, and its size as bytes of memory (None: a fraction of what is free)."""

    block_size: int = 16
    memory_bytes: int | None = None
    memory_fraction: float = 0.25  # of the memory available when the engine starts (capped at 2 GiB)
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # overrides the memory sizing (tests)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError(f"kv cache memory must be positive, got {self.memory_bytes} bytes")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"kv cache memory fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching: how many tokens one step may compute, and how many sequences may run at once."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    # decode rows (decoding requests plus their drafts) up to which a step verifies drafts: past a small batch,
    # extra rows cost compute (the lm_head, sampling, attention) that speculation does not win back (bundled
    # model, 16 streaming clients: 0.88x with 32 here, where 16 leaves them without drafts)
    max_num_spec_rows: int = 16
    # images: the vision encoder's output rows one step may compute, and how many rows of encoder outputs the
    # runner keeps (those of running requests, then the most recently used, so a resent image is not re-encoded)
    max_num_encoder_tokens: int = 4096
    encoder_cache_tokens: int = 16384

    def __post_init__(self) -> None:
        if not 1 <= self.max_num_encoder_tokens <= self.encoder_cache_tokens:
            raise ValueError(f"max_num_encoder_tokens must be in [1, encoder_cache_tokens ({self.encoder_cache_tokens})], "
                             f"got {self.max_num_encoder_tokens}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


SPECULATIVE_METHODS = ("ngram", "draft_model", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, with vLLM's keys: {"method": "ngram", "num_speculative_tokens": k,
    "prompt_lookup_min": a, "prompt_lookup_max": b}, {"method": "draft_model", "model": PATH_OR_ID,
    "num_speculative_tokens": k} or {"method": "mtp"}."""

    method: str
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    model: str | None = None  # the draft model (method draft_model)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported; choose one of "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be >= 1 and <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("a speculative config names a draft 'model' exactly when its method is draft_model")

    @classmethod
    def parse(cls, value: "str | Mapping[str, Any] | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """From a dict or its JSON text (--speculative-config); unknown keys are refused by name."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"the speculative config is not valid JSON: {error}") from None
        if not isinstance(value, Mapping):
            raise ValueError("the speculative config must be a JSON object, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"the speculative config has unknown keys {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        if "method" not in value:
            raise ValueError(f"the speculative config needs a 'method': one of {', '.join(SPECULATIVE_METHODS)}")
        return cls(**value)

    @property
    def num_lookahead_tokens(self) -> int:
        """Slots past the verified tokens a proposer writes while it drafts (a draft model's or MTP layer's own
        KV: the MTP layer's first draft comes from positions already verified)."""
        return {"draft_model": self.num_speculative_tokens, "mtp": self.num_speculative_tokens - 1}.get(self.method, 0)


@dataclass(frozen=True)
class BackendConfig:
    """Which implementation of each pluggable layer piece the model runner builds with, by its name in the
    piece's registry (None: the fastest that runs here): attention (layers.attention.ATTENTION_BACKENDS),
    moe (layers.moe.MOE_BACKENDS), mla (layers.mla.MLA_BACKENDS), quant (layers.quant.QUANT_METHODS)."""

    attention: str | None = None
    moe: str | None = None
    mla: str | None = None
    quant: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    """Everything that makes one engine, built once and handed to `build_engine` by LLM, AsyncEngine and
    `ownllm serve` alike. model None: the bundled model; dtype None: the checkpoint's; device None: cpu."""

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None
    backends: BackendConfig = field(default_factory=BackendConfig)
    structured_outputs_backend: str = "llguidance"  # a name in structured_output.GRAMMAR_BACKENDS
    # names in parsers.reasoning.REASONING_PARSERS / parsers.tool_parsers.TOOL_PARSERS; None: from the chat
    # template; "none": off
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    max_model_len: int | None = None  # the longest prompt + answer served (None: the model's own context)
    tensor_parallel_size: int = 1  # worker processes the model is split across (distributed/executor.py)
    mmproj: str | None = None  # llama.cpp's vision projector file for a .gguf text model (loader/mmproj.py)
    limit_images_per_prompt: int | None = None  # the most images one prompt may carry (None: the model's own limit)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.speculative is not None:
            raise ValueError("tensor parallel (tensor_parallel_size > 1) does not support speculative decoding")
        if self.limit_images_per_prompt is not None and self.limit_images_per_prompt < 0:
            raise ValueError(f"limit_images_per_prompt must be >= 0, got {self.limit_images_per_prompt}")


# sentence-transformers' pooling modes, in the order it concatenates them when several are on
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")


@dataclass(frozen=True)
class PoolingConfig:
    """How an embedding model turns its tokens' hidden states into one vector (a sentence-transformers folder's
    modules.json, 1_Pooling/config.json and sentence_bert_config.json), and which output sizes it allows."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_seq_length: int = 512  # longest input in tokens, special tokens included
    is_matryoshka: bool = False  # trained so that a prefix of the vector is an embedding too
    matryoshka_dimensions: tuple[int, ...] = ()  # the prefix sizes it was trained for; empty: any

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in POOLING_MODES]
        if unknown or not self.modes:
            raise ValueError(f"pooling mode {unknown[0] if unknown else 'none'!r} is not supported; "
                             f"supported: {', '.join(POOLING_MODES)}")
        if self.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1, got {self.max_seq_length}")


def parse_memory_size(text: str) -> int:
    """'2GiB', '512MB', '1e9' -> bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    value = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            try:
                return int(float(value[: -len(suffix)]) * units[suffix])
            except ValueError:
                break
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"memory size {text!r} is not understood; write e.g. 2GiB or 512MB") from None
