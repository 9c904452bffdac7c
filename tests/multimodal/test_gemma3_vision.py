"""Gemma 3's image side against transformers: our preprocessing vs Gemma3ImageProcessorPil (the slow, Pillow one)
within 1e-5 for real photos and synthetic images of several sizes, aspect ratios and modes; our SigLIP tower and
projector vs Gemma3ForConditionalGeneration.get_image_features on a tiny random checkpoint within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ownllm.multimodal.gemma3 import gemma3_preprocessing
from tests.multimodal.gemma3_checkpoint import TOKENS_PER_IMAGE, build_gemma3, hf_pixel_values
from tests.multimodal.images import real_images, synthetic
from tests.multimodal.test_image_processing import images

CONFIGS = {
    "class-defaults": {},
    "gemma3-896": {"size": {"height": 896, "width": 896}, "resample": 2, "rescale_factor": 1 / 255,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pan_and_scan": None},
    "tiny-non-square": {"size": {"height": 40, "width": 24}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pixel_values_match_transformers(name):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    config = CONFIGS[name]
    reference = Gemma3ImageProcessorPil(**{k: v for k, v in config.items() if v is not None})
    ours = gemma3_preprocessing(config)
    for image_name, image in images().items():
        expected = reference(image, return_tensors="np")["pixel_values"][0]
        got = ours(image)
        assert got.shape == expected.shape and got.dtype == np.float32, image_name
        assert np.abs(got - expected).max() < 1e-5, image_name


def test_pan_and_scan_is_refused():
    with pytest.raises(ValueError, match="do_pan_and_scan is not supported for Gemma 3"):
        gemma3_preprocessing({"do_pan_and_scan": True})


def test_image_features_match_transformers(tmp_path):
    from ownllm.config import BackendConfig
    from ownllm.layers.backends import LayerBackends
    from ownllm.loader import load_checkpoint
    from ownllm.models.registry import model_class

    hf_model = build_gemma3(tmp_path)
    checkpoint = load_checkpoint(str(tmp_path), "float32")
    backends = LayerBackends.resolve(BackendConfig(), torch.float32, "cpu")
    model = model_class(checkpoint.config.architecture).from_tensors(checkpoint.config, checkpoint.tensors, backends)
    photos = real_images()
    pixels = hf_pixel_values([photos["dog.jpg"], synthetic(50, 90, "RGBA", seed=1), photos["pasta.jpeg"].convert("L")])
    with torch.inference_mode():
        expected = hf_model.get_image_features(pixels).pooler_output  # [3, 16, 64]
        ours = model.embed_images(list(pixels))
    assert expected.shape == (3, TOKENS_PER_IMAGE, 64)
    assert expected.abs().mean() > 0.1  # the random projection is not the zeros transformers initializes it to
    for got, want in zip(ours, expected, strict=True):
        assert (got - want).abs().max() < 1e-4
