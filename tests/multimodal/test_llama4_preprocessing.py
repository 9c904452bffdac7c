"""Our Llama 4 preprocessing vs transformers' Llama4ImageProcessor (its code over a torchvision stand-in, see
llama4_reference.py): the same tile grid and pixel values within 1e-5 for the llama-models photos and synthetic
images of several sizes, aspect ratios and modes; and our prompt form vs Llama4Processor's string."""

from __future__ import annotations

import numpy as np
import pytest

from ownllm.multimodal.llama4 import Llama4ImageProcessor, Llama4Preprocessing, tile_grids
from tests.multimodal.images import real_images, synthetic
from tests.multimodal.llama4_reference import hf_pixel_values

CONFIGS = {
    "llama4-scout": {"size": {"height": 336, "width": 336}, "max_patches": 16, "resample": 2},
    "tiny-56-max-4": {"size": {"height": 56, "width": 56}, "max_patches": 4},
    "bicubic-max-canvas": {"size": {"height": 64, "width": 64}, "max_patches": 6, "resample": 3,
                           "resize_to_max_canvas": True},
}


def images():
    out = dict(real_images())
    for width, height, mode in [(640, 480, "RGB"), (100, 300, "RGB"), (37, 53, "RGBA"), (300, 120, "L"),
                                (17, 17, "LA"), (1000, 200, "RGB"), (336, 336, "RGBA"), (700, 20, "RGB")]:
        out[f"{width}x{height}-{mode}"] = synthetic(width, height, mode)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pixel_values_match_transformers(name):
    config = CONFIGS[name]
    pictures = images()
    expected, grids = hf_pixel_values(list(pictures.values()), **config)
    ours = Llama4Preprocessing.from_config(config)
    seen = set()
    for (image_name, image), reference, grid in zip(pictures.items(), expected, grids):
        got, our_grid = ours(image)
        assert our_grid == grid, image_name
        assert got.shape == tuple(reference.shape), image_name
        assert got.dtype == np.float32
        assert np.abs(got - reference.numpy()).max() < 1e-5, image_name
        seen.add(grid)
    assert len(seen) >= 4  # the images above reach several tile grids
    assert ((1, 1) in seen) != bool(config.get("resize_to_max_canvas"))  # a single tile: no global one


def test_tile_grids_cover_every_count_up_to_the_limit():
    grids = tile_grids(4)
    assert sorted(grids) == sorted({(r, c) for n in range(1, 5) for r in range(1, n + 1) if n % r == 0
                                    for c in [n // r]})


def test_prompt_form_matches_llama4_processor(tmp_path):
    """Llama4Processor's string for a grid, tokenized by a tokenizer holding the image tokens, equals ours."""
    from tokenizers import Tokenizer
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    from ownllm.loader import load_checkpoint
    from tests.multimodal.llama4_checkpoint import SPECIAL, build_llama4

    build_llama4(tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    checkpoint = load_checkpoint(str(tmp_path), None)
    processor = Llama4ImageProcessor.from_checkpoint(checkpoint.config, checkpoint.preprocessor_config,
                                                     checkpoint.tokenizer)
    assert processor.tokens_per_tile == 16
    for grid in [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (3, 1)]:
        text = Llama4Processor._prompt_split_image(None, grid, processor.tokens_per_tile)
        expected = tokenizer.encode(text, add_special_tokens=False).ids
        assert set(expected) <= set(tokenizer.token_to_id(t) for t in SPECIAL)
        assert processor.prompt_tokens(grid) == expected, grid


def test_each_tile_run_becomes_an_image_input_of_its_own():
    """process() pairs each run of <|patch|> with one tile: offsets at the runs, the tiles' own pixel values."""
    from ownllm.multimodal import placeholder_runs

    token_ids = {t: 100 + i for i, t in enumerate(["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                                                    "<|tile_x_separator|>", "<|tile_y_separator|>"])}
    processor = Llama4ImageProcessor(Llama4Preprocessing.from_config(CONFIGS["tiny-56-max-4"]), token_ids, 16)
    image = synthetic(100, 50, seed=3)  # 1x2 tiles + the global one
    prompt, inputs = processor.process([1, 102, 7], [image])
    pixel_values, grid = processor.preprocessing(image)
    assert grid == (1, 2) and len(inputs) == 3
    runs = placeholder_runs(prompt, 103)
    # <|image_start|>, tile, <|tile_x_separator|>, tile, <|tile_y_separator|>, <|image|>, global tile
    assert [(i.offset, i.length) for i in inputs] == runs == [(2, 16), (19, 16), (37, 16)]
    for image_input, tile in zip(inputs, pixel_values):
        assert np.array_equal(image_input.pixel_values, tile)
    assert len({i.image_hash for i in inputs}) == 3
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        processor.process([1, 102, 102], [image])
