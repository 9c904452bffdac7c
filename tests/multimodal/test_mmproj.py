"""`--mmproj`: a text GGUF plus llama.cpp's vision projector file load as one LLaVA or Gemma 3 model. Tiny random
checkpoints saved by transformers are written as llama.cpp's converters write them (tests/multimodal/mmproj_writer.py),
and ownllm on text.gguf + mmproj.gguf gives the greedy tokens and top-5 logprobs (within 1e-3, float32) that it gives on
the Hugging Face folder, which the parity tests hold to transformers, with 1 to 3 images of different sizes and
without. Files that do not fit are refused with the words a user reads. llama.cpp (llama-cpp-python's libmtmd) reads
the same files: its image embeddings agree with ours for Gemma 3, and for LLaVA once its placement of the CLS
position (after the patches, unlike transformers) is emulated."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from ownllm import LLM, SamplingParams
from ownllm.loader import load_checkpoint
from tests.checkpoints import build_checkpoint
from tests.gguf_writer import write_gguf
from tests.multimodal import test_gemma3_parity, test_llava_parity
from tests.multimodal.gemma3_checkpoint import build_gemma3
from tests.multimodal.images import synthetic
from tests.multimodal.llava_checkpoint import build_llava
from tests.multimodal.mmproj_writer import (
    GEMMA3_F16, LLAVA_F16, write_gemma3_mmproj, write_llava_mmproj, write_text_gguf,
)

NEW_TOKENS = 32
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
# what llama.cpp hard-codes for gemma3 text GGUFs: every 6th layer global, local rope theta 10000, scale head_dim**-0.5
GEMMA3_TEXT = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                   rope_local_base_freq=10000.0, query_pre_attn_scalar=32)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(HF folder, text.gguf, mmproj.gguf) of a tiny LLaVA reading hidden states [-3, -1] (concatenated)."""
    folder = tmp_path_factory.mktemp("llava-mmproj")
    hf_model = build_llava(folder, f16_exact=LLAVA_F16, vision_feature_layer=[-3, -2])
    text = write_text_gguf(hf_model, folder, folder.parent / f"{folder.name}-text.gguf", "LlamaForCausalLM")
    mmproj = write_llava_mmproj(hf_model, folder.parent / f"{folder.name}-mmproj.gguf")
    return folder, text, mmproj, hf_model


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3-mmproj")
    hf_model = build_gemma3(folder, text=GEMMA3_TEXT, f16_exact=GEMMA3_F16)
    text = write_text_gguf(hf_model, folder, folder.parent / f"{folder.name}-text.gguf", "Gemma3ForCausalLM")
    mmproj = write_gemma3_mmproj(hf_model, folder.parent / f"{folder.name}-mmproj.gguf")
    return folder, text, mmproj, hf_model


def run_both(folder, text, mmproj, requests):
    ours_hf = LLM(str(folder), dtype="float32").generate(requests, PARAMS)
    ours_gguf = LLM(str(text), dtype="float32", mmproj=str(mmproj)).generate(requests, PARAMS)
    return ours_hf, ours_gguf


def assert_same(hf_outputs, gguf_outputs):
    for a, b in zip(hf_outputs, gguf_outputs, strict=True):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for token, first, second in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert set(first) == set(second)
            for candidate in first:
                assert abs(first[candidate].logprob - second[candidate].logprob) < 1e-3, (token, candidate)


def test_llava_from_text_gguf_and_mmproj_matches_the_folder(llava):
    folder, text, mmproj, _ = llava
    cases = test_llava_parity.prompts(test_llava_parity.image_set())
    requests = [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}} for ids, images in cases]
    ours_hf, ours_gguf = run_both(folder, text, mmproj, requests)
    assert [o.prompt_token_ids.count(test_llava_parity.IMAGE_TOKEN_ID) for o in ours_gguf] == [16, 32, 48, 0]
    assert_same(ours_hf, ours_gguf)


def test_llava_mmproj_checkpoint_is_the_hf_layout(llava):
    """The file's layers stop at the deepest feature layer, its fc1/fc2 names are swapped back, and the config says
    what the folder's does."""
    folder, text, mmproj, hf_model = llava
    checkpoint = load_checkpoint(str(text), "float32", mmproj=str(mmproj))
    hf = checkpoint.config.hf_config
    assert checkpoint.config.architecture == "LlavaForConditionalGeneration"
    assert (hf["vision_config"]["num_hidden_layers"], hf["vision_feature_layer"]) == (2, [1, 2])
    assert hf["image_token_index"] == test_llava_parity.IMAGE_TOKEN_ID
    fc1 = checkpoint.tensors["model.vision_tower.encoder.layers.0.mlp.fc1.weight"]
    tower = hf_model.model.vision_tower
    assert fc1.equal(getattr(tower, "vision_model", tower).encoder.layers[0].mlp.fc1.weight)
    assert checkpoint.preprocessor_config["crop_size"] == {"height": 32, "width": 32}


def test_gemma3_from_text_gguf_and_mmproj_matches_the_folder(gemma3):
    folder, text, mmproj, _ = gemma3
    requests = [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
                for ids, images in test_gemma3_parity.cases()]
    ours_hf, ours_gguf = run_both(folder, text, mmproj, requests)
    assert [o.prompt_token_ids.count(test_gemma3_parity.IMAGE_TOKEN_ID) for o in ours_gguf] == [16, 32, 48, 0]
    assert_same(ours_hf, ours_gguf)


def test_mmproj_refusals_name_the_problem(llava, gemma3, tmp_path):
    folder, llava_text, llava_mmproj, _ = llava
    _, gemma3_text, gemma3_mmproj, gemma3_model = gemma3
    with pytest.raises(ValueError) as error:
        LLM(str(folder), mmproj=str(llava_mmproj))
    assert str(error.value) == (f"--mmproj goes with a .gguf text model, but {folder} is a checkpoint folder; a "
                                "Hugging Face checkpoint folder carries its vision tower itself")
    other = write_gemma3_mmproj(gemma3_model, tmp_path / "qwen.gguf", projector_type="qwen2vl_merger")
    with pytest.raises(ValueError) as error:
        LLM(str(gemma3_text), mmproj=str(other))
    assert str(error.value) == (f"{other}: projector type 'qwen2vl_merger' (clip.projector_type) is not supported; "
                                "supported: mlp, gemma3 (LLaVA and Gemma 3)")
    with pytest.raises(ValueError) as error:
        LLM(str(llava_text), mmproj=str(gemma3_mmproj))
    assert str(error.value) == (f"--mmproj {gemma3_mmproj} is a 'gemma3' projector (Gemma3ForConditionalGeneration), "
                                f"which does not go with {llava_text}, a LlamaForCausalLM text model")
    wide = tmp_path / "wide-text.gguf"
    build_checkpoint(tmp_path / "wide", "LlamaForCausalLM", hidden_size=96, vocab_size=392)
    write_gguf(tmp_path / "wide", wide)
    with pytest.raises(ValueError) as error:
        LLM(str(wide), mmproj=str(llava_mmproj))
    assert str(error.value) == (f"--mmproj {llava_mmproj} does not fit {wide}: the projector writes embeddings of size "
                                "64 but the text model's hidden size is 96")
    next_ = write_llava_mmproj(llava[3], tmp_path / "llava-next.gguf", **{"clip.vision.image_grid_pinpoints": [32, 64, 64, 32]})
    with pytest.raises(ValueError) as error:
        LLM(str(llava_text), mmproj=str(next_))
    assert str(error.value) == (f"{next_}: LLaVA-NeXT (1.6) projectors, which split images into a grid of tiles "
                                "(clip.vision.image_grid_pinpoints), are not supported; LLaVA 1.5's are")
    with pytest.raises(ValueError) as error:
        LLM(str(llava_text), mmproj=str(llava_text))
    assert str(error.value) == (f"{llava_text} is not a multimodal projector (mmproj) file: its general.architecture "
                                "is 'llama', expected 'clip'")


# --- llama.cpp (llama-cpp-python's libmtmd) on the same files -----------------------------------------------------


def llama_cpp_image_embeddings(text, mmproj, image) -> np.ndarray:
    """llama.cpp's projector output for one image: [image tokens, text hidden] (libmtmd: tokenize a media marker
    with the image, encode the image chunk, read the output embeddings)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
    model = llama_cpp.Llama(model_path=str(text), n_ctx=256, n_threads=1, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 1, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), model.model, params)
    assert ctx is not None
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")), dtype=np.uint8)  # [H, W, 3]
    bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb))
    chunks = mtmd.mtmd_input_chunks_init()
    marker = mtmd.mtmd_default_marker()
    text_input = mtmd.mtmd_input_text(marker, len(marker), False, True)
    try:
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text_input), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                num_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(num_tokens * model.n_embd(),))
                return out.reshape(num_tokens, -1).copy()
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
    raise AssertionError("llama.cpp made no image chunk")


def our_image_embeddings(llm, image) -> torch.Tensor:
    pixel_values = torch.from_numpy(llm.engine.image_processor.preprocess(image))
    with torch.no_grad():
        return llm.runner.model.embed_images([pixel_values])[0]


def llava_with_cls_last(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What llama.cpp's clip_graph_llava computes (libmtmd in llama-cpp-python 0.3.36): the CLS embedding appended
    after the patches, position embeddings in that order (patch i gets row i, CLS row n), output rows 1..n (patches
    1..n-1, then CLS), and the projector's GELU in its tanh form. transformers (and ownllm) put CLS first and drop
    it. -> [patches, text hidden]"""
    tower, projector = model.vision_tower, model.multi_modal_projector
    with torch.no_grad():
        patches = tower.embeddings.patch_embedding(pixel_values[None]).flatten(2).transpose(1, 2)  # [1, n, hidden]
        num = patches.shape[1]
        cls = tower.embeddings.class_embedding.expand(1, 1, -1)
        x = tower.pre_layrnorm(torch.cat([patches, cls], dim=1) + tower.embeddings.position_embedding.weight[:num + 1])
        states = [x]
        for layer in tower.encoder.layers:
            states.append(layer(states[-1]))
        features = torch.cat([states[i % len(states)] for i in model.feature_layers], dim=-1)[0, 1:num + 1]
        return projector.linear_2(torch.nn.functional.gelu(projector.linear_1(features), approximate="tanh"))


def test_gemma3_image_embeddings_agree_with_llama_cpp(gemma3):
    """The same mmproj file through llama.cpp's clip.cpp: the projector's output for an image of the tower's size
    (so that no resampling differs) agrees within llama.cpp's F16 rounding of activations."""
    _, text, mmproj, _ = gemma3
    llm = LLM(str(text), dtype="float32", mmproj=str(mmproj))
    image = synthetic(32, 32, seed=3)
    theirs, ours = llama_cpp_image_embeddings(text, mmproj, image), our_image_embeddings(llm, image).numpy()
    assert theirs.shape == ours.shape == (16, 64)
    assert np.abs(theirs - ours).max() < 5e-3 * np.abs(ours).max()


def test_llava_image_embeddings_agree_with_llama_cpp_up_to_its_cls_placement(llava):
    """llama.cpp reads the LLaVA mmproj as ownllm does (layers, swapped fc1/fc2, feature layers, projector) but places
    CLS after the patches (llava_with_cls_last): emulating that placement, ours agree with llama.cpp's; its
    embeddings differ from transformers' layout, so ownllm keeps transformers' (which LLaVA was trained with)."""
    _, text, mmproj, _ = llava
    llm = LLM(str(text), dtype="float32", mmproj=str(mmproj))
    image = synthetic(32, 32, seed=3)
    pixel_values = torch.from_numpy(llm.engine.image_processor.preprocess(image))
    theirs = llama_cpp_image_embeddings(text, mmproj, image)
    emulated = llava_with_cls_last(llm.runner.model, pixel_values).numpy()
    assert theirs.shape == emulated.shape == (16, 64)
    assert np.abs(theirs - emulated).max() < 5e-3 * np.abs(emulated).max()
    assert np.abs(theirs - our_image_embeddings(llm, image).numpy()).max() > 0.1  # the placement matters
