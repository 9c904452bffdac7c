"""What `ownllm show` tells about one local model (a checkpoint folder or a GGUF file): architecture, parameter
count, context length, quantization, chat template and capabilities. Reads metadata and tensor shapes only, never
weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ownllm.models.registry import is_embedding_architecture


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    parameters: str
    context_length: int | None
    quantization: str
    chat_template: str | None
    capabilities: tuple[str, ...]


def model_info(path: Path) -> ModelInfo:
    from ownllm.server.ollama import model_facts

    facts = model_facts(path)
    if path.suffix == ".gguf":
        architecture, context_length, template, has_vision = _gguf_metadata(path)
    else:
        architecture, context_length, template, has_vision = _folder_metadata(path)
    if is_embedding_architecture(architecture):
        capabilities: tuple[str, ...] = ("embedding",)
    else:
        text = template or ""
        capabilities = ("completion",) + ("tools",) * ("tools" in text) + \
            ("thinking",) * ("enable_thinking" in text or "<think>" in text) + ("vision",) * has_vision
    return ModelInfo(architecture, facts.details.parameter_size, context_length, facts.details.quantization_level,
                     template, capabilities)


def _gguf_metadata(path: Path) -> tuple[str, int | None, str | None, bool]:
    from ownllm.loader.gguf import open_gguf

    fields = open_gguf(str(path)).fields
    architecture = str(fields["general.architecture"].contents())
    context = fields.get(f"{architecture}.context_length")
    template = fields.get("tokenizer.chat_template")
    return (f"gguf:{architecture}", int(context.contents()) if context else None,
            str(template.contents()) if template else None, False)


def _folder_metadata(path: Path) -> tuple[str, int | None, str | None, bool]:
    from ownllm.tokenizer import MissingTokenizerFile, Tokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    text_config = config.get("text_config") or config
    try:
        template = Tokenizer.from_dir(path).chat_template
    except MissingTokenizerFile:
        template = None
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    architecture = (config.get("architectures") or ["unknown"])[0]
    context = text_config.get("max_position_embeddings")
    return architecture, int(context) if context else None, template, "vision_config" in config
