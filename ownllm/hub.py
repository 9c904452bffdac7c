"""Models by name: `ownllm pull ORG/REPO[:QUANT]` into huggingface_hub's cache and `ownllm rm` out of it.

Downloads go through huggingface_hub (its cache, HF_HOME, tokens and progress bars; an interrupted download
resumes where it stopped). A checkpoint repo brings its weights, configs and tokenizer files; a repo of GGUF files
brings the one file (or the shards of it) whose name holds QUANT, Q4_K_M when none is given, as llama.cpp's
`-hf` and Ollama do. Offline (HF_HUB_OFFLINE), pull says so in one line before touching the network.
"""

from __future__ import annotations

import re
from pathlib import Path

from ownllm.loader.resolve import HUB_PATTERNS, looks_like_hub_id

DEFAULT_QUANT = "Q4_K_M"
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'org/repo:Q8_0' -> ('org/repo', 'Q8_0'); refuses what is not a hub id."""
    repo_id, _, quant = spec.partition(":")
    if not looks_like_hub_id(repo_id):
        raise ValueError(f"{spec!r} is not a hub model name; write ORG/REPO or ORG/REPO:QUANT")
    return repo_id, quant or None


def pick_gguf_files(repo_id: str, files: list[str], quant: str | None) -> list[str]:
    """The GGUF file (or its shards) of `files` whose name holds `quant` (Q4_K_M by default), case-insensitively."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    wanted = (quant or DEFAULT_QUANT).lower()
    matches = [f for f in ggufs if wanted in Path(f).name.lower()]
    if not matches:
        available = ", ".join(Path(f).name for f in ggufs) or "none"
        raise FileNotFoundError(f"{repo_id} has no .gguf file for {quant or DEFAULT_QUANT}; "
                                f"its .gguf files: {available}")
    first = _SHARD.sub("", matches[0])
    return [f for f in matches if _SHARD.sub("", f) == first]  # one model: the first match and its other shards


def pull(spec: str) -> Path:
    """Downloads (or completes) a model into the hub cache -> the checkpoint folder or the (first) GGUF file."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    repo_id, quant = parse_spec(spec)
    if is_offline_mode():
        raise ValueError(f"cannot pull {spec}: offline (HF_HUB_OFFLINE is set)")
    try:
        files = HfApi().list_repo_files(repo_id)
        if quant is None and "config.json" in files:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        paths = [Path(hf_hub_download(repo_id, name)) for name in pick_gguf_files(repo_id, files, quant)]
        return paths[0]
    except GatedRepoError:
        raise FileNotFoundError(f"{repo_id} is gated: accept its terms on huggingface.co and log in "
                                "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model {repo_id!r} not found on the Hugging Face hub (or it is gated and you are "
                                "not logged in)") from None
    except HfHubHTTPError as error:
        raise FileNotFoundError(f"cannot pull {spec}: {error}") from None
    except OSError as error:  # no connection
        raise FileNotFoundError(f"cannot pull {spec}: the Hugging Face hub cannot be reached ({error})") from None


def remove(spec: str) -> int:
    """Deletes every cached revision of a hub model -> the bytes freed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    repo_id, _ = parse_spec(spec)
    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache (there is no cache yet)") from None
    for repo in cache.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id:
            strategy = cache.delete_revisions(*(revision.commit_hash for revision in repo.revisions))
            strategy.execute()
            return repo.size_on_disk
    raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache; `ownllm models` lists what is")
