"""`ownllm run --image PATH "question"` and `/image PATH` in `ownllm chat` on a tiny LLaVA: the answer is the offline
engine's for the same image and question; a file that is not an image is one error line."""

from __future__ import annotations

import pytest

from ownllm import LLM, SamplingParams
from tests.multimodal.images import synthetic
from tests.multimodal.llava_checkpoint import CHAT_TEMPLATE, build_llava
from tests.multimodal.mmproj_writer import LLAVA_F16, write_llava_mmproj, write_text_gguf
from tests.test_errors import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # each case starts a Python process


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    build_llava(folder)
    image_path = folder / "picture.png"
    synthetic(60, 44, seed=7).save(image_path)
    llm = LLM(str(folder), dtype="float32")
    messages = [{"role": "user", "content": [{"type": "image", "image": synthetic(60, 44, seed=7)},
                                             {"type": "text", "text": "what is this?"}]}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].text
    return folder, image_path, expected


def test_run_with_an_image(setup):
    folder, image_path, expected = setup
    result = run_cli("run", "--model", str(folder), "--dtype", "float32", "--temperature", "0", "--max-tokens", "6",
                     "--image", str(image_path), "what is this?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected.rstrip("\n")


def test_chat_attaches_an_image_to_the_next_message(setup, tmp_path):
    folder, image_path, expected = setup
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "ownllm.cli", "chat", "--model", str(folder), "--dtype", "float32", "--temperature", "0",
         "--max-tokens", "6"], input=f"/image {image_path}\nwhat is this?\n/exit\n", capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(image picture.png attached to your next message)" in result.stderr
    assert expected.strip() and expected.strip() in result.stdout


def test_run_with_a_text_gguf_and_its_mmproj(tmp_path):
    """`ownllm run --model text.gguf --mmproj mmproj.gguf --image PATH` answers as the Hugging Face folder does."""
    folder = tmp_path / "llava"
    hf_model = build_llava(folder, f16_exact=LLAVA_F16)
    text = write_text_gguf(hf_model, folder, tmp_path / "text.gguf", "LlamaForCausalLM", CHAT_TEMPLATE)
    mmproj = write_llava_mmproj(hf_model, tmp_path / "mmproj.gguf")
    image_path = tmp_path / "picture.png"
    synthetic(60, 44, seed=7).save(image_path)
    options = ["--dtype", "float32", "--temperature", "0", "--max-tokens", "6", "--image", str(image_path)]
    from_folder = run_cli("run", "--model", str(folder), *options, "what is this?")
    from_gguf = run_cli("run", "--model", str(text), "--mmproj", str(mmproj), *options, "what is this?")
    assert from_folder.returncode == from_gguf.returncode == 0, (from_folder.stderr, from_gguf.stderr)
    assert from_gguf.stdout == from_folder.stdout and from_gguf.stdout.strip()
    missing = run_cli("run", "--model", str(text), "--mmproj", str(tmp_path / "nope.gguf"), "hi")
    assert_one_line_error(missing, f"--mmproj {tmp_path / 'nope.gguf'}: no such file")


def test_run_with_a_file_that_is_not_an_image(setup, tmp_path):
    folder, _, _ = setup
    (tmp_path / "notes.txt").write_text("not a picture")
    result = run_cli("run", "--model", str(folder), "--image", str(tmp_path / "notes.txt"), "what is this?")
    assert_one_line_error(result, "the image data is not a valid image (PNG, JPEG, WebP, GIF, BMP, ...)")
