"""Our CLIP preprocessing vs transformers' CLIPImageProcessorPil (the slow, Pillow one): pixel values within 1e-5
for real photos and synthetic images of several sizes, aspect ratios and modes."""

from __future__ import annotations

import numpy as np
import pytest

from ownllm.multimodal.image_processing import ClipImageProcessor
from tests.multimodal.images import real_images, synthetic

CONFIGS = {
    "llava-336": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    "tiny-crop-larger-than-resize": {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 30}},
    "fixed-size-no-crop": {"size": {"height": 40, "width": 48}, "do_center_crop": False,
                           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}


def images():
    out = dict(real_images())
    for width, height, mode in [(640, 480, "RGB"), (100, 300, "RGB"), (37, 53, "RGBA"), (300, 120, "L"),
                                (17, 17, "LA"), (400, 400, "RGBA")]:
        out[f"{width}x{height}-{mode}"] = synthetic(width, height, mode)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pixel_values_match_transformers(name):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CONFIGS[name]
    reference = CLIPImageProcessorPil(**config)
    ours = ClipImageProcessor.from_config(config)
    for image_name, image in images().items():
        expected = reference(image, return_tensors="np")["pixel_values"][0]
        got = ours(image)
        assert got.shape == expected.shape, image_name
        assert got.dtype == np.float32
        assert np.abs(got - expected).max() < 1e-5, image_name


def test_alpha_is_composited_onto_white():
    """Guards the RGBA cases above: a fully transparent image becomes white, not its hidden colour."""
    from PIL import Image

    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels = ClipImageProcessor.from_config({"size": {"height": 8, "width": 8}, "do_center_crop": False,
                                             "do_normalize": False})(transparent)
    assert np.allclose(pixels, 1.0)
