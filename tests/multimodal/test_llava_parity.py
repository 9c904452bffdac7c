"""LLaVA, ownllm vs transformers in float32 on tiny random checkpoints: 1 to 3 images of different sizes in one
prompt, and a batch mixing requests with and without images: identical greedy tokens for 32 new tokens and top-5
logprobs within 1e-3. Chunked prefill that cuts through an image gives the same."""

from __future__ import annotations

import pytest

from ownllm import LLM, SamplingParams
from tests.checkpoints import assert_matches_reference, hf_greedy
from tests.multimodal.images import real_images, synthetic
from tests.multimodal.llava_checkpoint import IMAGE_TOKEN_ID, build_llava, hf_pixel_values

NEW_TOKENS = 32
TOKENS_PER_IMAGE = {"default": 16, "full": 17}
VARIANTS = {
    "llama-default-layer-2": ("LlamaForCausalLM", {}),
    "mistral-full-layers-list": ("MistralForCausalLM", dict(vision_feature_select_strategy="full",
                                                            vision_feature_layer=[-3, -1])),
}


def image_set():
    photos = real_images()
    return [photos["dog.jpg"], synthetic(50, 90, "RGBA", seed=1), photos["pasta.jpeg"].convert("L")]


def prompts(images):
    """(token ids with one <image> marker per image, images): 1, 2 and 3 images, and none."""
    text = [[5, 9, 17, 33], [44, 61], [70, 71, 72]]
    return [
        ([1, *text[0], IMAGE_TOKEN_ID, *text[1]], images[:1]),
        ([1, IMAGE_TOKEN_ID, *text[0], IMAGE_TOKEN_ID, *text[2]], images[1:]),
        ([1, *text[1], IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, *text[0], IMAGE_TOKEN_ID, 7], images),
        ([1, *text[0], *text[2]], []),
    ]


def expand(ids: list[int], num_tokens: int) -> list[int]:
    """What LlavaProcessor makes of a prompt: each <image> repeated once per image token."""
    return [t for token in ids for t in ([token] * num_tokens if token == IMAGE_TOKEN_ID else [token])]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    text_arch, overrides = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = build_llava(folder, text_arch, **overrides)
    strategy = overrides.get("vision_feature_select_strategy", "default")
    return hf_model, folder, TOKENS_PER_IMAGE[strategy]


_REFERENCES: dict = {}


def reference(hf_model, case: int, num_tokens: int):
    """transformers' greedy run of prompts()[case], computed once per model."""
    key = (id(hf_model), case)
    if key not in _REFERENCES:
        ids, images = prompts(image_set())[case]
        inputs = {"pixel_values": hf_pixel_values(images)} if images else {}
        _REFERENCES[key] = hf_greedy(hf_model, expand(ids, num_tokens), NEW_TOKENS, **inputs)
    return _REFERENCES[key]


def assert_matches(output, ref):
    assert_matches_reference(output.outputs[0].token_ids, output.outputs[0].logprobs, ref)


PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)


def test_images_and_text_in_one_batch_match_transformers(pair):
    hf_model, folder, num_tokens = pair
    llm = LLM(str(folder), dtype="float32")
    cases = prompts(image_set())
    outputs = llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}} for ids, images in cases],
                           PARAMS)
    for case, ((ids, _), output) in enumerate(zip(cases, outputs)):
        assert output.prompt_token_ids == expand(ids, num_tokens)
        assert_matches(output, reference(hf_model, case, num_tokens))


def test_chunked_prefill_through_images_matches_transformers(pair):
    """Chunks of 6 tokens: every image's 16 or 17 placeholders are split over several steps."""
    hf_model, folder, num_tokens = pair
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=6)
    ids, images = prompts(image_set())[2]
    output = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, PARAMS)[0]
    assert_matches(output, reference(hf_model, 2, num_tokens))
