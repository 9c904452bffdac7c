"""Images through the APIs, on an in-process server around a tiny LLaVA: OpenAI image_url parts (data: URLs, and
http(s) URLs fetched under guard from --allowed-media-domains), Ollama `images` on /api/chat and /api/generate, and
offline llm.chat: each gives the tokens the offline engine gives for the same prompt and image, and usage counts the
image's placeholder tokens. Every refusal is a 400 with the exact words a user reads."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import threading

import httpx
import pytest

import ownllm.multimodal.fetch as fetch
from ownllm import LLM, SamplingParams
from ownllm.config import CacheConfig, EngineConfig
from ownllm.engine.async_engine import AsyncEngine
from ownllm.server import ServerSettings, build_app
from tests.checkpoints import build_checkpoint
from tests.multimodal.gemma3_checkpoint import BOI_TOKEN_ID, build_gemma3
from tests.multimodal.images import synthetic
from tests.multimodal.llava_checkpoint import IMAGE_TOKEN_ID, build_llava
from tests.server.inprocess import KV_CACHE_BYTES, TINY_NAME, inprocess_engine

MAX_TOKENS = 6
IMAGE = synthetic(48, 40, seed=5)


def png(image=IMAGE) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str = "what is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    build_llava(folder)
    return folder


@pytest.fixture(scope="module")
def engine(llava_folder):
    with inprocess_engine(llava_folder) as engine:
        yield engine


class ImageHost:
    """A local HTTP server with an image, a redirect to it, and an image too big; reached as images.test."""

    def __init__(self) -> None:
        body = png()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{self.server.server_port}/image.png")
                    self.end_headers()
                    return
                data = body if self.path == "/image.png" else body * 50
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.server.shutdown()


@pytest.fixture
def images_test_is_public(monkeypatch):
    """images.test resolves to the local image host as if it were a public address; other names resolve as usual."""
    real = fetch.public_address
    monkeypatch.setattr(fetch, "public_address", lambda host, port: "127.0.0.1" if host == "images.test"
                        else real(host, port))


def call(app, method: str, path: str, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://ownllm") as client:
            return await client.request(method, path, json=body, timeout=60)

    return asyncio.run(go())


@functools.cache
def offline_tokens(folder, text: str) -> list[int]:
    """The offline engine's greedy tokens for one user message of `text` with IMAGE in front of the text."""
    llm = LLM(str(folder), dtype="float32")
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": text}]}]
    return llm.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))[0].outputs[0].token_ids


def chat_tokens(response: httpx.Response, tokenizer) -> list[int]:
    assert response.status_code == 200, response.text
    return tokenizer.encode(response.json()["choices"][0]["message"]["content"], add_special_tokens=False)


GREEDY = {"model": TINY_NAME, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}


def test_openai_image_url_data_and_fetched_give_the_offline_answer(engine, llava_folder, image_host, images_test_is_public):
    app = build_app(engine, ServerSettings(allowed_media_domains=("images.test", "localhost")))
    url = f"http://images.test:{image_host.port}/image.png"
    texts = []
    for source in (data_url(png()), url):
        content = [{"type": "image_url", "image_url": {"url": source}}, {"type": "text", "text": "what is this?"}]
        response = call(app, "POST", "/v1/chat/completions", {**GREEDY, "messages": [{"role": "user", "content": content}],
                                                              "logprobs": True})
        assert response.status_code == 200, response.text
        texts.append([t["token"] for t in response.json()["choices"][0]["logprobs"]["content"]])
    tokenizer = engine.tokenizer
    assert texts[0] == texts[1] == [tokenizer.decode([t]) for t in offline_tokens(llava_folder, "what is this?")]


def test_ollama_images_on_chat_and_generate(engine, llava_folder):
    app = build_app(engine, ServerSettings())
    encoded = base64.b64encode(png()).decode()
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    chat = call(app, "POST", "/api/chat", {"model": TINY_NAME, "stream": False, "options": options, "messages": [
        {"role": "user", "content": "what is this?", "images": [encoded]}]})
    generate = call(app, "POST", "/api/generate", {"model": TINY_NAME, "stream": False, "options": options,
                                                   "prompt": "what is this?", "images": [encoded]})
    expected = engine.tokenizer.decode(offline_tokens(llava_folder, "what is this?"))
    assert chat.status_code == 200 and generate.status_code == 200, (chat.text, generate.text)
    assert chat.json()["message"]["content"] == generate.json()["response"] == expected
    assert "vision" in call(app, "POST", "/api/show", {"model": TINY_NAME}).json()["capabilities"]


def error(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    return body["error"]["message"] if "error" in body and isinstance(body["error"], dict) else body["error"]


def test_refusals_name_the_problem(engine, image_host, images_test_is_public):
    app = build_app(engine, ServerSettings(allowed_media_domains=("images.test", "localhost", "127.0.0.1"),
                                           max_image_bytes=len(png()) * 10))

    def chat(url: str, **extra) -> str:
        return error(call(app, "POST", "/v1/chat/completions", {**GREEDY, "messages": image_message(url), **extra}))

    part = "messages.0.content.1"
    assert chat(data_url(b"hello, not an image")) == \
        f"{part}: the image data is not a valid image (PNG, JPEG, WebP, GIF, BMP, ...)"
    assert chat(data_url(png() * 11)) == f"{part}: the image is {len(png()) * 11} bytes, over the limit of " \
        f"{len(png()) * 10} bytes"
    assert chat(f"http://images.test:{image_host.port}/big") == \
        f"{part}: the image is {len(png()) * 50} bytes, over the limit of {len(png()) * 10} bytes"
    assert chat("https://example.com/cat.png") == \
        f"{part}: the image URL's domain 'example.com' is not in --allowed-media-domains"
    assert chat("http://127.0.0.1:9/cat.png") == \
        f"{part}: the image URL's host '127.0.0.1' resolves to a private address (127.0.0.1)"
    assert "resolves to a private address" in chat(f"http://images.test:{image_host.port}/redirect")  # after a redirect
    nine = [{"type": "image_url", "image_url": {"url": data_url(png())}}] * 9
    assert error(call(app, "POST", "/v1/chat/completions", {**GREEDY, "messages": [{"role": "user", "content": nine}]})) \
        == "the model accepts at most 8 images per prompt (--limit-images-per-prompt), got 9"
    assert error(call(app, "POST", "/api/generate", {"model": TINY_NAME, "prompt": "hi", "images": ["%%%"]})) == \
        "images.0: the image is not valid base64"
    no_urls = build_app(engine, ServerSettings())
    assert error(call(no_urls, "POST", "/v1/chat/completions", {**GREEDY, "messages": image_message(
        "https://example.com/cat.png")})) == f"{part}: image URLs are not allowed on this server: send the image as " \
        "a data: URL, or start the server with --allowed-media-domains"


def test_an_image_to_a_text_only_model_is_refused_naming_it(tmp_path):
    build_checkpoint(tmp_path, "LlamaForCausalLM")
    with inprocess_engine(tmp_path) as text_engine:
        app = build_app(text_engine, ServerSettings())
        assert error(call(app, "POST", "/v1/chat/completions", {**GREEDY, "messages": image_message(data_url(png()))})) \
            == f"messages.0.content.1: model {TINY_NAME} does not accept images"
        encoded = base64.b64encode(png()).decode()
        assert error(call(app, "POST", "/api/chat", {"model": TINY_NAME, "messages": [
            {"role": "user", "content": "hi", "images": [encoded]}]})) == \
            f"messages.0.images.0: model {TINY_NAME} does not accept images"
    llm = LLM(str(tmp_path), dtype="float32")
    with pytest.raises(ValueError, match=f"^model {tmp_path.name} does not accept images$"):
        llm.generate({"prompt_token_ids": [1, 5], "multi_modal_data": {"image": IMAGE}})


def test_offline_prompt_forms_agree(llava_folder):
    """llm.generate with a prompt text or token ids and multi_modal_data, and llm.chat, give the same tokens."""
    llm = LLM(str(llava_folder), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    text = "<s>user: <image>what is this?<s>assistant: "  # what the chat template renders
    ids = llm.tokenizer.encode(text)
    assert ids.count(IMAGE_TOKEN_ID) == 1
    by_text = llm.generate({"prompt": text, "multi_modal_data": {"image": IMAGE}}, params)[0].outputs[0].token_ids
    by_ids = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [IMAGE]}}, params)[0].outputs[0]
    assert by_text == by_ids.token_ids
    assert by_text == offline_tokens(llava_folder, "what is this?")


def test_images_past_the_limit_the_context_or_a_step_are_refused(llava_folder, tmp_path):
    """--limit-images-per-prompt; a prompt whose image placeholders carry it past --max-model-len; and an image
    computed in one step (Gemma 3's) longer than --max-num-batched-tokens: each a 400 naming the limit."""
    config = EngineConfig(str(llava_folder), dtype="float32", cache=CacheConfig(memory_bytes=KV_CACHE_BYTES),
                          max_model_len=40, limit_images_per_prompt=1)
    engine = AsyncEngine.from_config(config, model_name=TINY_NAME)
    try:
        app = build_app(engine, ServerSettings())
        two = [{"type": "image_url", "image_url": {"url": data_url(png())}}] * 2
        assert error(call(app, "POST", "/v1/chat/completions", {**GREEDY, "messages": [{"role": "user", "content": two}]})) \
            == "the model accepts at most 1 image per prompt (--limit-images-per-prompt), got 2"
        encoded = base64.b64encode(png()).decode()
        assert error(call(app, "POST", "/api/generate", {"model": TINY_NAME, "prompt": "hi", "images": [encoded] * 2})) \
            == "the model accepts at most 1 image per prompt (--limit-images-per-prompt), got 2"
        text = "the quick brown fox " * 4
        messages = image_message(data_url(png()), text)
        num_text = len(engine.tokenizer.encode_chat([{"role": "user", "content": [
            {"type": "text", "text": text}, {"type": "image"}]}], add_generation_prompt=True))
        assert num_text < 40 <= num_text - 1 + 16  # the text fits the context; with the image's 16 tokens it does not
        assert error(call(app, "POST", "/v1/chat/completions", {**GREEDY, "messages": messages})) == (
            f"the prompt has {num_text - 1 + 16} tokens (16 of them for its 1 image) but the model's context is 40 "
            "tokens (room is needed for at least one new token)")
    finally:
        engine.shutdown()
    build_gemma3(tmp_path / "gemma3")
    llm = LLM(str(tmp_path / "gemma3"), dtype="float32", max_num_batched_tokens=12)
    with pytest.raises(ValueError) as refused:
        llm.generate({"prompt_token_ids": [2, 5, BOI_TOKEN_ID, 7], "multi_modal_data": {"image": IMAGE}})
    assert str(refused.value) == ("an image takes 16 tokens, which this model computes in one step, but a step "
                                  "computes at most 12 tokens (--max-num-batched-tokens)")


def test_usage_counts_the_image_placeholder_tokens(engine):
    """usage.prompt_tokens (OpenAI, streamed or not) and prompt_eval_count (Ollama) count the prompt the model read:
    the text's tokens, less the one <image> marker, plus the image's 16 placeholders."""
    app = build_app(engine, ServerSettings())
    content = [{"type": "image_url", "image_url": {"url": data_url(png())}}, {"type": "text", "text": "what is this?"}]
    num_text = len(engine.tokenizer.encode_chat([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what is this?"}]}], add_generation_prompt=True))
    expected = num_text - 1 + 16
    body = {**GREEDY, "messages": [{"role": "user", "content": content}]}
    usage = call(app, "POST", "/v1/chat/completions", body).json()["usage"]
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (expected, expected + MAX_TOKENS)
    streamed = call(app, "POST", "/v1/chat/completions", {**body, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert json.loads(events[-1])["usage"]["prompt_tokens"] == expected
    encoded = base64.b64encode(png()).decode()
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    chat = call(app, "POST", "/api/chat", {"model": TINY_NAME, "stream": False, "options": options, "messages": [
        {"role": "user", "content": "what is this?", "images": [encoded]}]})
    assert chat.json()["prompt_eval_count"] == expected
    generate = call(app, "POST", "/api/generate", {"model": TINY_NAME, "stream": False, "options": options,
                                                   "prompt": "what is this?", "images": [encoded]})
    assert generate.json()["prompt_eval_count"] == expected
    text_only = call(app, "POST", "/v1/chat/completions", {**GREEDY, "messages": [{"role": "user", "content": "hi"}]})
    assert text_only.json()["usage"]["prompt_tokens"] == len(engine.tokenizer.encode_chat(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True))
