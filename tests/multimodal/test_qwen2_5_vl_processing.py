"""Our Qwen2.5-VL preprocessing vs transformers' Qwen2VLImageProcessorPil (the slow, Pillow one): the same pixel
values within 1e-5 and the same image_grid_thw for real photos and synthetic images of several sizes, aspect ratios
and modes (RGBA, grayscale), under the default min/max pixels and tighter ones that force up- and down-scaling; the
prompt expansion and the M-RoPE positions against transformers' get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest

from ownllm.multimodal import ImageInput
from ownllm.multimodal.qwen2_5_vl import Qwen2VLPreprocessing, image_grid, mrope_positions, smart_resize
from tests.multimodal.images import real_images, synthetic

CONFIGS = {
    "defaults": {},
    "tiny-tower": {"patch_size": 4, "merge_size": 2, "min_pixels": 16 * 16, "max_pixels": 48 * 48},
    "upscale": {"min_pixels": 200 * 200, "max_pixels": 400 * 400},
}


def images():
    out = dict(real_images())
    for width, height, mode in [(640, 480, "RGB"), (100, 300, "RGB"), (37, 53, "RGBA"), (300, 120, "L"),
                                (17, 17, "LA"), (400, 400, "RGBA"), (56, 28, "RGB")]:
        out[f"{width}x{height}-{mode}"] = synthetic(width, height, mode)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pixel_values_match_transformers(name):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = CONFIGS[name]
    reference = Qwen2VLImageProcessorPil(**config)
    ours = Qwen2VLPreprocessing(config)
    for image_name, image in images().items():
        expected = reference(image, return_tensors="np")
        got = ours(image)
        assert got.dtype == np.float32
        assert list(image_grid(got)) == expected["image_grid_thw"][0].tolist(), image_name
        rows = got.reshape(-1, got.shape[-1])
        assert rows.shape == expected["pixel_values"].shape, image_name
        assert np.abs(rows - expected["pixel_values"]).max() < 1e-5, image_name


def test_smart_resize_refuses_extreme_aspect_ratios():
    with pytest.raises(ValueError, match="aspect ratio is over 200"):
        smart_resize(1, 300, 28, 56 * 56, 28 * 28 * 1280)


def test_mrope_positions_match_get_rope_index():
    """Two images of different grids between text runs: our positions and delta equal transformers'."""
    import torch
    import transformers

    merge = 2
    grids = [(1, 6, 10), (1, 8, 4)]  # patch grids (t, h, w); merged: 3x5 and 4x2 tokens
    vision = {"spatial_merge_size": merge, "depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 16,
              "out_hidden_size": 32}
    config = transformers.Qwen2_5_VLConfig(vision_config=vision,
                                           text_config={"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                                                        "num_attention_heads": 2, "num_key_value_heads": 1})
    layout, inputs, offset = [3, None, 2, None, 5], [], 0
    for part in layout:
        if part is None:
            t, h, w = grids[len(inputs)]
            length = t * h * w // merge**2
            pixels = np.zeros((t, h // merge, w // merge, merge, merge, 1), dtype=np.float32)
            inputs.append(ImageInput(str(len(inputs)), offset, length, pixels))
            offset += length
        else:
            offset += part
    token_types = np.zeros(offset, dtype=np.int64)
    for image in inputs:
        token_types[image.offset:image.end] = 1
    model = transformers.Qwen2_5_VLModel(config)
    expected, delta = model.get_rope_index(torch.zeros(1, offset, dtype=torch.long),
                                           torch.from_numpy(token_types)[None], image_grid_thw=torch.tensor(grids))
    got, our_delta = mrope_positions(offset, inputs)
    assert got.tolist() == expected[:, 0].tolist()
    assert our_delta == delta.item() < 0


def test_step_positions_slice_the_prompt_and_continue_past_it():
    """A step's [3, T]: a chunk inside a prompt with images takes its 3D positions; a span that runs past the prompt
    (its last prompt token and two drafts) continues at index + delta; a request without images sits at its index
    on all three axes; a step with no image request has none."""
    from ownllm.worker.mrope import step_mrope_positions

    pixels = np.zeros((1, 2, 3, 2, 2, 1), dtype=np.float32)  # 2x3 merged patches: 6 tokens, 3 positions wide
    table, delta = mrope_positions(9, [ImageInput("a", 2, 6, pixels)])  # text 0-1, image 2-7, text 8
    assert table[:, 8].tolist() == [5, 5, 5] and delta == 5 - 8
    got = step_mrope_positions([((table, delta), 1, 4), (None, 3, 2), ((table, delta), 8, 3)], "cpu")
    assert got.tolist() == [
        [1, 2, 2, 2, 3, 4, 5, 6, 7],
        [1, 2, 2, 2, 3, 4, 5, 6, 7],
        [1, 2, 3, 4, 3, 4, 5, 6, 7],
    ]
    assert step_mrope_positions([(None, 0, 3), (None, 5, 1)], "cpu") is None
