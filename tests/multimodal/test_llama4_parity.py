"""Llama4ForConditionalGeneration, ownllm vs transformers in float32 on a tiny random checkpoint: 1 to 3 images of
different sizes (1 to 4 tiles plus the global one) in one prompt and a request without images, in one batch:
identical greedy tokens for 32 new tokens and top-5 logprobs within 1e-3. transformers gets its own preprocessing's
pixel values (llama4_reference.py). Chunked prefill that cuts through tiles gives the same; each tile is encoded
once (a resent image hits the encoder cache) and text-only requests do no encoder work."""

from __future__ import annotations

import pytest

from ownllm import LLM, SamplingParams
from tests.checkpoints import assert_matches_reference, hf_greedy
from tests.multimodal.images import real_images, synthetic
from tests.multimodal.llama4_checkpoint import (IMAGE_END_ID, IMAGE_ID, IMAGE_START_ID, PATCH_ID, PREPROCESSOR,
                                                TILE_X_ID, TILE_Y_ID, TOKENS_PER_TILE, build_llama4)
from tests.multimodal.llama4_reference import hf_pixel_values

NEW_TOKENS = 32
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)


def image_set():
    photos = real_images()
    return [photos["dog.jpg"], synthetic(50, 90, "RGBA", seed=1), photos["pasta.jpeg"].convert("L")]


def cases():
    """(token ids with one <|image|> per image, images): 1, 2 and 3 images, and none."""
    images = image_set()
    text = [[5, 9, 17, 33], [44, 61], [70, 71, 72]]
    return [
        ([1, *text[0], IMAGE_ID, *text[1]], images[:1]),
        ([1, IMAGE_ID, *text[0], IMAGE_ID, *text[2]], images[1:]),
        ([1, *text[1], IMAGE_ID, IMAGE_ID, *text[0], IMAGE_ID, 7], images),
        ([1, *text[0], *text[2]], []),
    ]


def expected_prompt(ids: list[int], grids: list[tuple[int, int]]) -> list[int]:
    """Llama4Processor's expansion of each <|image|>, written out from its _prompt_split_image."""
    out, pending = [], iter(grids)
    patches = [PATCH_ID] * TOKENS_PER_TILE
    for token in ids:
        if token != IMAGE_ID:
            out.append(token)
            continue
        rows, cols = next(pending)
        out.append(IMAGE_START_ID)
        if rows * cols > 1:
            for _ in range(rows):
                for col in range(cols):
                    out += patches + ([TILE_X_ID] if col < cols - 1 else [])
                out.append(TILE_Y_ID)
        out += [IMAGE_ID, *patches, IMAGE_END_ID]
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama4-mm")
    return build_llama4(folder), folder


@pytest.fixture(scope="module")
def ours(checkpoint):
    _, folder = checkpoint
    llm = LLM(str(folder), dtype="float32")
    return llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": images}} for ids, images in cases()],
                        PARAMS)


_REFERENCES: dict = {}


def reference(hf_model, case: int):
    """transformers' greedy run of cases()[case] with its own pixel values -> (expanded prompt, (tokens, logprobs))."""
    if case not in _REFERENCES:
        import torch

        ids, images = cases()[case]
        inputs, grids = {}, []
        if images:
            pixel_values, grids = hf_pixel_values(images, **PREPROCESSOR)
            inputs = {"pixel_values": torch.cat(pixel_values)}
        prompt = expected_prompt(ids, grids)
        _REFERENCES[case] = prompt, hf_greedy(hf_model, prompt, NEW_TOKENS, **inputs)
    return _REFERENCES[case]


def assert_matches(output, ref):
    assert_matches_reference(output.outputs[0].token_ids, output.outputs[0].logprobs, ref)


def test_images_and_text_in_one_batch_match_transformers(checkpoint, ours):
    hf_model, _ = checkpoint
    tiles = []
    for case, output in enumerate(ours):
        prompt, ref = reference(hf_model, case)
        assert output.prompt_token_ids == prompt
        assert_matches(output, ref)
        tiles.append(prompt.count(PATCH_ID) // TOKENS_PER_TILE)
    # dog.jpg: 2x2 tiles + the global one; the 50x90 image: 2x1 + 1; pasta.jpeg: 2x2 + 1
    assert tiles == [5, 3 + 5, 5 + 3 + 5, 0]


def test_chunked_prefill_through_tiles_matches_transformers(checkpoint):
    """Chunks of 10 tokens: every tile's 16 <|patch|> rows are split over steps."""
    hf_model, folder = checkpoint
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=10)
    ids, images = cases()[2]
    output = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, PARAMS)[0]
    assert_matches(output, reference(hf_model, 2)[1])


def test_images_matter(checkpoint, ours):
    """Guards the parity above: another image at the same place answers otherwise."""
    _, folder = checkpoint
    ids, _ = cases()[0]
    other = LLM(str(folder), dtype="float32").generate(
        {"prompt_token_ids": ids, "multi_modal_data": {"image": [synthetic(512, 512, seed=7)]}}, PARAMS)[0]
    assert other.prompt_token_ids == ours[0].prompt_token_ids  # the same grid, so the same prompt
    first = ours[0].outputs[0]
    assert (other.outputs[0].token_ids, other.outputs[0].logprobs[0]) != (first.token_ids, first.logprobs[0])


def counting_llm(folder) -> tuple[LLM, list[int]]:
    llm = LLM(str(folder), dtype="float32")
    model, counts = llm.runner.model, []
    encode = model.embed_images

    def embed_images(pixel_values):
        counts.append(len(pixel_values))
        return encode(pixel_values)

    model.embed_images = embed_images
    return llm, counts


def test_each_tile_is_encoded_once_and_text_only_requests_encode_nothing(checkpoint):
    _, folder = checkpoint
    llm, counts = counting_llm(folder)
    llm.generate([[1, 5, 9, 17], [1, 33, 44]], PARAMS)
    assert counts == [] and llm.runner.encoder_outputs == {}
    ids, images = cases()[0]
    request = {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
    llm.generate(request, PARAMS)
    assert sum(counts) == 5  # 2x2 tiles and the global one
    llm.generate({"prompt_token_ids": ids[:-1] + [90], "multi_modal_data": {"image": [images[0].copy()]}}, PARAMS)
    assert sum(counts) == 5  # resent: every tile's rows come from the encoder cache or the prefix cache


def test_a_checkpoint_whose_tokenizer_lacks_the_image_tokens_serves_text_and_refuses_images(tmp_path):
    from tests.checkpoints import save_tiny_tokenizer

    build_llama4(tmp_path)
    save_tiny_tokenizer(tmp_path)  # the plain tiny tokenizer, without Llama 4's image tokens
    llm = LLM(str(tmp_path), dtype="float32")
    assert len(llm.generate([[1, 5, 9]], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="lacks the image tokens <\\|image_start\\|>"):
        llm.generate({"prompt_token_ids": [1, 5], "multi_modal_data": {"image": [synthetic(20, 20)]}}, PARAMS)


def test_same_text_with_another_image_shares_only_the_blocks_before_its_tiles(checkpoint):
    """Both images cut into 2x2 tiles, so the two prompts are the same tokens; the prefix cache salts each tile's
    <|patch|> blocks with that tile's hash, so only [0, 4) (text) is shared, and the answer is the uncached one."""
    _, folder = checkpoint
    llm = LLM(str(folder), dtype="float32", block_size=4)
    ids, images = cases()[0]
    other = synthetic(512, 512, seed=7)
    first = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images}}, PARAMS)[0]
    hits_before = llm.kv_cache.num_hit_tokens
    second = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [other]}}, PARAMS)[0]
    assert second.prompt_token_ids == first.prompt_token_ids
    assert llm.kv_cache.num_hit_tokens - hits_before == 4  # [4, 8) holds <|image_start|> and the first patches
    uncached = LLM(str(folder), dtype="float32", enable_prefix_caching=False)
    alone = uncached.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [other]}}, PARAMS)[0]
    assert second.outputs[0].token_ids == alone.outputs[0].token_ids


def test_chat_with_image_parts_expands_like_the_token_ids(checkpoint):
    """llm.chat renders the image part as <|image|> through the chat template; the engine expands it as it expands
    the marker in token ids (the tiles of the batch test's first image), with the same answer."""
    _, folder = checkpoint
    llm = LLM(str(folder), dtype="float32")
    image = image_set()[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}]
    chat = llm.chat(messages, params)[0]
    rendered = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    ids = llm.tokenizer.encode_chat(rendered, add_generation_prompt=True)
    assert ids.count(IMAGE_ID) == 1
    by_ids = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [image]}}, params)[0]
    assert chat.prompt_token_ids == by_ids.prompt_token_ids == expected_prompt(ids, [(2, 2)])
    assert chat.outputs[0].token_ids == by_ids.outputs[0].token_ids
