"""What models are on this machine: the bundled one, Hugging Face cache snapshots, and given paths.

Reads only metadata (config.json, GGUF headers); never loads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ownllm.loader.resolve import BUNDLED_MODEL_NAME, bundled_model_path


@dataclass
class ModelEntry:
    name: str
    source: str  # "bundled" | "hf-cache" | "path"
    architecture: str
    size: str
    path: str


def human_size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1024 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def describe(path: Path, name: str | None = None, source: str = "path") -> ModelEntry:
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        try:
            fields = GGUFReader(str(path)).fields
            arch = str(fields["general.architecture"].contents())
        except Exception as error:  # a broken file is listed, not fatal to the listing
            arch = f"unreadable ({type(error).__name__})"
        return ModelEntry(name or path.stem, source, f"gguf:{arch}", human_size(path.stat().st_size), str(path))
    config = path / "config.json"
    if config.is_file():
        arch = ",".join(json.loads(config.read_text()).get("architectures") or ["?"])
    else:
        arch = "no config.json"
    return ModelEntry(name or path.name, source, arch, human_size(_folder_size(path)), str(path))


def _hf_cache_entries() -> list[ModelEntry]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    entries = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            if (revision.snapshot_path / "config.json").is_file():
                entries.append(describe(revision.snapshot_path, repo.repo_id, "hf-cache"))
                break
            ggufs = sorted(revision.snapshot_path.rglob("*.gguf"))  # pulled as ORG/REPO:QUANT
            entries += [describe(gguf, f"{repo.repo_id}:{gguf.stem}", "hf-cache") for gguf in ggufs]
            if ggufs:
                break
    return entries


def list_local_models(paths: list[Path]) -> list[ModelEntry]:
    entries = []
    try:
        entries.append(describe(bundled_model_path(), BUNDLED_MODEL_NAME, "bundled"))
    except FileNotFoundError as error:
        entries.append(ModelEntry(BUNDLED_MODEL_NAME, "bundled", "not installed", "-", str(error)))
    entries += _hf_cache_entries()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        entries.append(describe(path))
    return entries
