"""Hugging Face checkpoint folders: config.json, *.safetensors (single or sharded), tokenizer files.

Tensors are opened with safetensors' memory map and handed over as they are; the model adopts
them without a second full copy when no dtype conversion is needed. Every failure names the file
or tensor at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from ownllm.config import ModelConfig
from ownllm.loader import Checkpoint
from ownllm.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: weights file {missing[0]} listed in {INDEX_FILE} is missing")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    return files


class SafetensorsWeights(Mapping[str, torch.Tensor]):
    """Lazy name -> tensor view over one or many safetensors files; tensors are read on access (mmap)."""

    def __init__(self, files: list[Path]) -> None:
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError) as error:
                raise ValueError(f"weights file {file} is unreadable or truncated: {error}") from None
            self._handles[file] = handle
            self._file_of.update(dict.fromkeys(keys, file))

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"tensor {name!r} in {file} cannot be read (truncated file?): {error}") from None

    def get_slice(self, name: str):
        """A lazy view of tensor `name` that reads only the part it is indexed with (a tensor-parallel shard)."""
        return self._handles[self._file_of[name]].get_slice(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor to find out
        return name in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def load_hf_folder(folder: Path, dtype: str | None = None) -> Checkpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    config = ModelConfig.from_hf(read_json(config_file), dtype)  # refuses unsupported architectures first
    tensors = SafetensorsWeights(safetensors_files(folder))
    generation_file = folder / "generation_config.json"
    generation_config = read_json(generation_file) if generation_file.is_file() else {}
    preprocessor_file = folder / "preprocessor_config.json"
    preprocessor_config = read_json(preprocessor_file) if preprocessor_file.is_file() else {}
    return Checkpoint(config, tensors, Tokenizer.from_dir(folder), generation_config, folder, preprocessor_config)
