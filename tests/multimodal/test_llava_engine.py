"""LLaVA through the engine: the encoder runs once per image (a resent image hits the encoder cache), text-only
requests do no encoder work, and the prefix cache never shares a block of placeholders between different images."""

from __future__ import annotations

import pytest

from ownllm import LLM, SamplingParams
from tests.multimodal.images import synthetic
from tests.multimodal.llava_checkpoint import IMAGE_TOKEN_ID, build_llava

PROMPT = [1, 5, 9, 17, 33, IMAGE_TOKEN_ID, 44, 61]  # the image's 16 placeholders at [5, 21)
PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    build_llava(folder)
    return folder


def counting_llm(folder, **kwargs) -> tuple[LLM, list[int]]:
    """An LLM whose model counts the images it encodes."""
    llm = LLM(str(folder), dtype="float32", block_size=4, **kwargs)
    model, counts = llm.runner.model, []
    encode = model.embed_images

    def embed_images(pixel_values):
        counts.append(len(pixel_values))
        return encode(pixel_values)

    model.embed_images = embed_images
    return llm, counts


def with_image(img, prompt=PROMPT):
    return {"prompt_token_ids": prompt, "multi_modal_data": {"image": img}}


def test_an_image_is_encoded_once_for_requests_and_resends(folder):
    llm, counts = counting_llm(folder)
    a, b = synthetic(40, 30, seed=1), synthetic(64, 64, seed=2)
    llm.generate(with_image(a), PARAMS)
    # the prefix cache holds [0, 20); position 20 is still a placeholder, its row comes from the encoder cache
    llm.generate(with_image(a.copy(), PROMPT[:-1] + [70, 71]), PARAMS)
    assert counts == [1]
    llm.generate([with_image(b), with_image(b, [1, IMAGE_TOKEN_ID, 80])], PARAMS)
    assert counts == [1, 1]


def test_text_only_requests_do_no_encoder_work(folder):
    llm, counts = counting_llm(folder)
    llm.generate([[1, 5, 9, 17], [1, 33, 44]], PARAMS)
    assert counts == [] and llm.runner.encoder_outputs == {}


def test_same_text_with_another_image_shares_no_placeholder_block(folder):
    llm, counts = counting_llm(folder)
    uncached = LLM(str(folder), dtype="float32", block_size=4, enable_prefix_caching=False)
    a, b = synthetic(40, 30, seed=1), synthetic(30, 40, seed=3)
    out_a = llm.generate(with_image(a), PARAMS)[0].outputs[0]
    hits_before = llm.kv_cache.num_hit_tokens
    out_b = llm.generate(with_image(b), PARAMS)[0].outputs[0]
    assert llm.kv_cache.num_hit_tokens - hits_before == 4  # block [0, 4) only: [4, 8) holds placeholders
    assert counts == [1, 1]
    assert out_b.token_ids == uncached.generate(with_image(b), PARAMS)[0].outputs[0].token_ids
    assert (out_a.token_ids, out_a.logprobs) != (out_b.token_ids, out_b.logprobs)  # the image matters


@pytest.mark.parametrize("layout", ["hub", "transformers-v5-modeling"])
def test_checkpoints_with_other_tensor_names_load_the_same(folder, tmp_path, layout):
    """llava-hf's hub files keep the tower under vision_tower.vision_model.*; transformers' modeling names are
    model.language_model.*, model.vision_tower.*, model.multi_modal_projector.* and lm_head.weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    def rename(name: str) -> str:
        if layout == "hub":
            return name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
            if name.startswith(old):
                return new + name[len(old):]
        return name

    for file in folder.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / file.name)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    img = synthetic(40, 30, seed=1)
    expected = LLM(str(folder), dtype="float32").generate(with_image(img), PARAMS)[0].outputs[0].token_ids
    assert LLM(str(tmp_path), dtype="float32").generate(with_image(img), PARAMS)[0].outputs[0].token_ids == expected


def test_a_step_whose_encoder_fails_once_is_retried_to_the_same_answer(folder):
    """The engine reruns a failed step one request at a time, each with its own images to encode (fault_isolation)."""
    llm, counts = counting_llm(folder)
    img = synthetic(40, 30, seed=4)
    prompts = [with_image(img), [1, 5, 9, 17]]
    expected = [o.outputs[0].token_ids for o in LLM(str(folder), dtype="float32").generate(prompts, PARAMS)]
    encode, failures = llm.runner.model.embed_images, []

    def fails_once(pixel_values):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected encoder fault")
        return encode(pixel_values)

    llm.runner.model.embed_images = fails_once
    outputs = llm.generate(prompts, PARAMS)
    assert failures and [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason != "error" for o in outputs)
