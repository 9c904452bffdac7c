"""A sentence-transformers folder's embedding settings -> PoolingConfig: which pooling its modules.json names (and
how 1_Pooling/config.json sets it up), whether it normalizes, its longest input (sentence_bert_config.json) and the
matryoshka sizes its config.json allows. A folder without modules.json pools as sentence-transformers then does:
mean pooling, no normalization, up to the model's context. Reads metadata only, never weights.
"""

from __future__ import annotations

from pathlib import Path

from ownllm.config import ModelConfig, PoolingConfig
from ownllm.loader.hf import read_json

# 1_Pooling/config.json's switches -> our modes (POOLING_MODES, in sentence-transformers' concatenation order)
_POOLING_SWITCHES = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "lasttoken",
}
_UNSUPPORTED_SWITCHES = ("pooling_mode_weightedmean_tokens",)
_MODULE_KINDS = ("Transformer", "Pooling", "Normalize")


def read_pooling_config(folder: Path, config: ModelConfig) -> PoolingConfig:
    hf = config.hf_config
    matryoshka_dimensions = tuple(int(d) for d in hf.get("matryoshka_dimensions") or ())
    common = dict(is_matryoshka=bool(hf.get("is_matryoshka") or matryoshka_dimensions),
                  matryoshka_dimensions=matryoshka_dimensions)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig(("mean",), False, config.max_position_embeddings, **common)
    modules = {}
    for module in read_json(modules_file):
        kind = str(module.get("type", "")).rpartition(".")[2]
        if kind not in _MODULE_KINDS:
            raise ValueError(f"{modules_file}: module {module.get('type')!r} ({module.get('path')}) is not supported; "
                             f"supported: {', '.join(_MODULE_KINDS)}")
        modules[kind] = folder / module.get("path", "")
    if "Pooling" not in modules:
        raise ValueError(f"{modules_file} names no Pooling module; cannot tell how to pool token vectors")
    pooling_file = modules["Pooling"] / "config.json"
    pooling = read_json(pooling_file) if pooling_file.is_file() else {"pooling_mode_mean_tokens": True}
    unsupported = [k for k in _UNSUPPORTED_SWITCHES if pooling.get(k)]
    if unsupported:
        raise ValueError(f"{pooling_file}: {unsupported[0]} is not supported")
    modes = tuple(mode for switch, mode in _POOLING_SWITCHES.items() if pooling.get(switch))
    settings_file = modules.get("Transformer", folder) / "sentence_bert_config.json"
    settings = read_json(settings_file) if settings_file.is_file() else {}
    max_seq_length = min(int(settings.get("max_seq_length") or config.max_position_embeddings),
                         config.max_position_embeddings)
    return PoolingConfig(modes, "Normalize" in modules, max_seq_length, **common)
