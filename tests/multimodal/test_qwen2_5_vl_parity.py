"""Qwen2_5_VLForConditionalGeneration, ownllm vs transformers in float32 on a tiny random checkpoint: 1 to 3 images
of different sizes in one prompt and a request without images, in one batch: identical greedy tokens for 32 new
tokens and top-5 logprobs within 1e-3. transformers gets mm_token_type_ids, so it computes the M-RoPE positions
(get_rope_index) as Qwen2_5_VLProcessor's inputs make it. Chunked prefill (chunks of 7 tokens) cuts through the
images' tokens; a prefix-cache hit ends inside an image; a text-only request runs no encoder; the vision tower alone
matches transformers' get_image_features."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import assert_matches_reference, hf_greedy
from tests.multimodal.images import real_images, synthetic
from tests.multimodal.qwen2_5_vl_checkpoint import (IMAGE_TOKEN_ID, VISION_END_ID, VISION_START_ID, build_qwen2_5_vl,
                                                    hf_image_inputs)

NEW_TOKENS = 32
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
IMAGE = [VISION_START_ID, IMAGE_TOKEN_ID, VISION_END_ID]  # what the chat template writes per image


def images():
    photos = real_images()
    return [photos["dog.jpg"], synthetic(50, 90, "RGBA", seed=1), photos["pasta.jpeg"].convert("L"),
            synthetic(17, 23, "RGB", seed=2)]


def cases():
    """(token ids with <|vision_start|><|image_pad|><|vision_end|> per image, images): 1, 2 and 3 images, none."""
    pics = images()
    text = [[5, 9, 17, 33], [44, 61], [70, 71, 72]]
    return [
        ([1, *text[0], *IMAGE, *text[1]], pics[:1]),
        ([1, *IMAGE, *text[0], *IMAGE, *text[2]], pics[1:3]),
        ([1, *text[1], *IMAGE, *IMAGE, *text[0], *IMAGE, 7], [pics[3], pics[0], pics[1]]),
        ([1, *text[0], *text[2]], []),
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    return build_qwen2_5_vl(folder), folder


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint[1]), dtype="float32")


@pytest.fixture(scope="module")
def ours(llm):
    return llm.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": pics}} for ids, pics in cases()],
                        PARAMS)


_REFERENCES: dict = {}


def reference(hf_model, expanded: list[int], pics):
    """transformers' greedy run of our expanded prompt (its image tokens typed 1, as Qwen2_5_VLProcessor types
    them), computed once per prompt."""
    key = (tuple(expanded), len(pics))
    if key not in _REFERENCES:
        inputs = {}
        if pics:
            inputs = {**hf_image_inputs(pics), "mm_token_type_ids": (torch.tensor([expanded]) == IMAGE_TOKEN_ID).int()}
        _REFERENCES[key] = hf_greedy(hf_model, expanded, NEW_TOKENS, **inputs)
    return _REFERENCES[key]


def assert_matches(output, ref):
    assert_matches_reference(output.outputs[0].token_ids, output.outputs[0].logprobs, ref)


def test_images_and_text_in_one_batch_match_transformers(checkpoint, ours):
    hf_model, _ = checkpoint
    for (ids, pics), output in zip(cases(), ours):
        expanded = output.prompt_token_ids
        grids = hf_image_inputs(pics)["image_grid_thw"] if pics else torch.zeros(0, 3, dtype=torch.long)
        assert expanded.count(IMAGE_TOKEN_ID) == int(grids.prod(-1).sum()) // 4
        assert_matches(output, reference(hf_model, expanded, pics))
    sizes = {int(g.prod()) // 4 for g in hf_image_inputs(images())["image_grid_thw"]}
    assert len(sizes) >= 3  # images of different token counts


def test_chunked_prefill_through_images_and_prefix_cache_hits_keep_parity(checkpoint):
    """Chunks of 7 tokens end inside the images; then a prompt that parts from the first after its image, so that its
    prefix-cache hit (one block of 16) ends inside the image."""
    hf_model, folder = checkpoint
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=7, block_size=16)
    ids, pics = [1, 5, 9, *IMAGE, 44, 61], images()[:1]  # the image's tokens at [4, 4 + 25)
    for prompt in (ids, ids[:-2] + [90, 91, 92]):
        output = llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"image": pics}}, PARAMS)[0]
        assert_matches(output, reference(hf_model, output.prompt_token_ids, pics))
    assert llm.kv_cache.num_hit_tokens == 16
    assert output.prompt_token_ids[15] == output.prompt_token_ids[16] == IMAGE_TOKEN_ID
    ids, pics = cases()[2]
    output = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": pics}}, PARAMS)[0]
    assert_matches(output, reference(hf_model, output.prompt_token_ids, pics))


def test_mrope_positions_matter(checkpoint, ours):
    """Guards the parity above: transformers without mm_token_type_ids (plain 1D positions) answers otherwise."""
    hf_model, _ = checkpoint
    output = ours[1]
    plain = hf_greedy(hf_model, output.prompt_token_ids, 4, **hf_image_inputs(cases()[1][1]))
    first = output.outputs[0]
    assert abs(plain[1][0].max().item() - first.logprobs[0][first.token_ids[0]].logprob) > 1e-3


def test_vision_tower_matches_transformers(checkpoint, llm):
    """Each image's rows out of our tower equal transformers' get_image_features (window attention, the full block,
    the merger and the reverse permutation), for grids with partial windows."""
    hf_model, _ = checkpoint
    model, processor = llm.runner.model, llm.engine.image_processor
    pics = images()
    inputs = hf_image_inputs(pics)
    with torch.no_grad():
        expected = hf_model.get_image_features(**inputs).pooler_output
        got = model.embed_images([torch.from_numpy(processor.preprocess(p)) for p in pics])
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    # guards the above: every block attending globally (no windows) gives other rows for a many-window image
    tower, windowed = model.visual, model.visual.fullatt_block_indexes
    try:
        tower.fullatt_block_indexes = set(range(len(tower.blocks)))
        everywhere = model.embed_images([torch.from_numpy(processor.preprocess(pics[0]))])[0]
    finally:
        tower.fullatt_block_indexes = windowed
    assert (everywhere - expected[0]).abs().max() > 1e-3


def test_text_only_requests_run_no_encoder_and_rotate_plainly(checkpoint):
    """Text-only requests to the vision model: no image encoded, no 3D positions built (the step's rope gets
    meta.positions, the text model's path), and the same tokens as transformers."""
    hf_model, folder = checkpoint
    llm = LLM(str(folder), dtype="float32")
    model, encoded, positions = llm.runner.model, [], []
    encode, hidden_states = model.embed_images, model.hidden_states

    def counting(pixel_values):
        encoded.append(len(pixel_values))
        return encode(pixel_values)

    def recording(input_ids, meta, inputs_embeds=None):
        positions.append(meta.mrope_positions)
        return hidden_states(input_ids, meta, inputs_embeds)

    model.embed_images, model.hidden_states = counting, recording
    prompts = [[1, 5, 9, 17, 33], [1, 44, 61, 70]]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS)
    assert encoded == [] and llm.runner.encoder_outputs == {}
    assert positions and all(p is None for p in positions)
    for prompt, output in zip(prompts, outputs):
        assert_matches(output, reference(hf_model, prompt, []))


def test_chat_with_images_renders_the_vision_markers(checkpoint, llm):
    """llm.chat with image parts: the template's <|vision_start|><|image_pad|><|vision_end|> per image expands as the
    hand-written prompt does, and answers as transformers does."""
    hf_model, _ = checkpoint
    pics = images()[1:3]
    messages = [{"role": "user", "content": [{"type": "image", "image": pics[0]}, {"type": "text", "text": "the dog"},
                                             {"type": "image", "image": pics[1]}]}]
    output = llm.chat(messages, PARAMS)[0]
    expanded = output.prompt_token_ids
    starts = [i for i, t in enumerate(expanded) if t == VISION_START_ID]
    ends = [i for i, t in enumerate(expanded) if t == VISION_END_ID]
    assert len(starts) == len(ends) == 2
    assert all(t == IMAGE_TOKEN_ID for s, e in zip(starts, ends) for t in expanded[s + 1:e])
    assert expanded.count(IMAGE_TOKEN_ID) == int(hf_image_inputs(pics)["image_grid_thw"].prod(-1).sum()) // 4
    assert_matches(output, reference(hf_model, expanded, pics))


def test_preempted_image_requests_resume_with_their_positions(checkpoint, ours):
    """A KV pool too small for the three image requests at once: requests are preempted and recomputed (their
    prompts and generated tokens again, the 3D positions rebuilt from the prompt and its delta), and still answer
    as transformers does."""
    hf_model, folder = checkpoint
    llm = LLM(str(folder), dtype="float32", num_kv_blocks=10, block_size=16, enable_prefix_caching=False)
    requests = [{"prompt_token_ids": ids, "multi_modal_data": {"image": pics}} for ids, pics in cases()[:3]]
    outputs = llm.generate(requests, PARAMS)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for (_, pics), output, alone in zip(cases(), outputs, ours):
        assert output.prompt_token_ids == alone.prompt_token_ids
        assert_matches(output, reference(hf_model, output.prompt_token_ids, pics))
