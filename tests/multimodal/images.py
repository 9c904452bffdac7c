"""Test images: the real photos the llama-models package ships, plus synthetic ones of other sizes and modes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


def resources() -> Path:
    spec = importlib.util.find_spec("llama_models")
    assert spec is not None, "pip install --no-deps llama-models (the test extra) for its test images"
    return Path(next(iter(spec.submodule_search_locations))) / "resources"


def real_images() -> dict[str, Image.Image]:
    return {name: Image.open(resources() / name) for name in ("dog.jpg", "pasta.jpeg")}


def synthetic(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
