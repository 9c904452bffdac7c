"""Gemma3ForConditionalGeneration, ownllm vs transformers in float32 on a tiny random checkpoint: 1 to 3 images in
one prompt and a request without images, in one batch: identical greedy tokens for 32 new tokens and top-5 logprobs
within 1e-3. transformers gets token_type_ids, so an image's 16 tokens attend each other both ways, as Gemma3Processor's
inputs make them; chunked prefill (chunks of 20 tokens, which would end inside images) keeps each image whole, and a
prefix-cache hit that ends inside an image resumes it right."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import assert_matches_reference, hf_greedy
from tests.multimodal.gemma3_checkpoint import BOI_TOKEN_ID, IMAGE_TOKEN_ID, build_gemma3, hf_pixel_values
from tests.multimodal.images import real_images, synthetic

NEW_TOKENS = 32
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)


def cases():
    """(token ids with one <start_of_image> per image, images): 1, 2 and 3 images, and none."""
    photos = real_images()
    images = [photos["dog.jpg"], synthetic(50, 90, "RGBA", seed=1), photos["pasta.jpeg"].convert("L")]
    text = [[5, 9, 17, 33], [44, 61], [70, 71, 72]]
    return [
        ([2, *text[0], BOI_TOKEN_ID, *text[1]], images[:1]),
        ([2, BOI_TOKEN_ID, *text[0], BOI_TOKEN_ID, *text[2]], images[1:]),
        ([2, *text[1], BOI_TOKEN_ID, BOI_TOKEN_ID, *text[0], BOI_TOKEN_ID, 7], images),
        ([2, *text[0], *text[2]], []),
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3-mm")
    return build_gemma3(folder), folder


@pytest.fixture(scope="module")
def ours(checkpoint):
    _, folder = checkpoint
    llm = LLM(str(folder), dtype="float32")
    return llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}} for ids, images in cases()],
                        PARAMS)


_REFERENCES: dict = {}


def reference(hf_model, expanded: list[int], images):
    """transformers' greedy run of our expanded prompt (its image tokens typed 1, as Gemma3Processor types them),
    computed once per prompt."""
    key = tuple(expanded)
    if key not in _REFERENCES:
        _REFERENCES[key] = hf_reference(hf_model, expanded, images)
    return _REFERENCES[key]


def hf_reference(hf_model, expanded: list[int], images):
    inputs = {}
    if images:
        inputs = {"pixel_values": hf_pixel_values(images),
                  "token_type_ids": (torch.tensor([expanded]) == IMAGE_TOKEN_ID).long()}
    return hf_greedy(hf_model, expanded, NEW_TOKENS, **inputs)


def assert_matches(output, ref):
    assert_matches_reference(output.outputs[0].token_ids, output.outputs[0].logprobs, ref)


def test_images_and_text_in_one_batch_match_transformers(checkpoint, ours):
    hf_model, _ = checkpoint
    for (ids, images), output in zip(cases(), ours):
        expanded = output.prompt_token_ids
        assert expanded.count(IMAGE_TOKEN_ID) == 16 * len(images)
        assert_matches(output, reference(hf_model, expanded, images))


def test_chunked_prefill_and_prefix_cache_hits_keep_parity(checkpoint):
    """Chunks of 20 tokens, which stop before an image rather than end inside it; then a prompt that parts from the
    first after its image, so that its prefix-cache hit (one block of 16) ends inside the image, whose cached keys were
    computed with the whole image."""
    hf_model, folder = checkpoint
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=20, block_size=16)
    ids, images = cases()[0]
    for prompt in (ids, ids[:-2] + [90, 91, 92]):
        output = llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"image": images}}, PARAMS)[0]
        assert_matches(output, reference(hf_model, output.prompt_token_ids, images))
    assert llm.kv_cache.num_hit_tokens == 16
    assert output.prompt_token_ids[15] == output.prompt_token_ids[16] == IMAGE_TOKEN_ID


def test_bidirectional_image_attention_matters(checkpoint, ours):
    """Guards the parity above: transformers without token_type_ids (causal image tokens) answers otherwise."""
    hf_model, _ = checkpoint
    output = ours[0]
    causal = hf_greedy(hf_model, output.prompt_token_ids, 4, pixel_values=hf_pixel_values(cases()[0][1]))
    assert abs(causal[1][0].max().item() - output.outputs[0].logprobs[0][output.outputs[0].token_ids[0]].logprob) > 1e-3
