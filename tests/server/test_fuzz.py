"""Schemathesis over /openapi.json: every route (OpenAI /v1, Ollama /api, /health, /metrics) gets valid and
invalid requests generated from its schema, against the app in process on a tiny random-weight model with a
64-token context (so every generation ends within 64 tokens). No answer may be a 5xx, no call may hang, and
afterwards the engine holds no request and no KV block."""

from __future__ import annotations

import concurrent.futures

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from ownllm.engine.async_embedder import AsyncEmbedder
from ownllm.engine.embedder import Embedder
from ownllm.server import ServerSettings, build_app
from tests.checkpoints import build_bert_checkpoint
from tests.server.inprocess import TINY_NAME, inprocess_engine, wait_idle

MAX_EXAMPLES = 60  # per route: valid and invalid requests
HUNG_SECONDS = 120  # a generation here takes well under a second; a call this long is stuck

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def engine(tiny64_model):
    with inprocess_engine(tiny64_model) as engine:
        yield engine


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    build_bert_checkpoint(folder, max_seq_length=64)
    embedder = AsyncEmbedder(Embedder.from_model(str(folder), name="tiny-bert"))
    yield embedder
    embedder.shutdown()


@pytest.fixture(scope="module")
def api_schema(engine, embedder, tiny64_model):
    app = build_app(engine, ServerSettings(model_path=tiny64_model), embedder)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


OPERATIONS = [
    "GET /v1/models", "GET /v1/models/{model_id}", "POST /v1/chat/completions", "POST /v1/completions",
    "POST /api/chat", "POST /api/generate", "POST /api/show", "GET /api/tags", "GET /api/ps", "GET /api/version",
    "GET /health", "GET /metrics", "GET /", "HEAD /", "POST /v1/embeddings", "POST /api/embed",
    "POST /api/embeddings", "POST /v1/messages", "POST /v1/messages/count_tokens", "POST /v1/responses",
    "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
]
_calls = concurrent.futures.ThreadPoolExecutor(max_workers=1)


def test_every_route_is_fuzzed(api_schema):
    assert sorted(result.ok().label for result in api_schema.get_all_operations()) == sorted(OPERATIONS)
    paths = api_schema.raw_schema["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate", "/api/show",
                 "/v1/embeddings", "/api/embed", "/api/embeddings", "/v1/messages", "/v1/messages/count_tokens",
                 "/v1/responses"):
        assert "requestBody" in paths[path]["post"], path


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_errors_and_no_hangs(api_schema, label):
    method, path = label.split(" ")
    operation = api_schema[path][method]

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.one_of(*(operation.as_strategy(mode) for mode in GenerationMode)))
    def check(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = TINY_NAME  # reach generation, not only the unknown-model 404
        call = _calls.submit(case.call)
        try:
            response = call.result(timeout=HUNG_SECONDS)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"{label} hung: no answer in {HUNG_SECONDS}s to {case.body!r}")
        assert response.status_code < 500, f"{label} -> {response.status_code} {response.text[:500]}\n{case.body!r}"

    check()


def test_nothing_left_behind(engine, api_schema):
    """Runs after the fuzzing (file order): every request fuzzed above has ended and freed its blocks."""
    wait_idle(engine)
