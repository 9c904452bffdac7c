"""Shutdown and restart of a real `ownllm serve`: SIGTERM stops it taking requests (503) while the running ones
finish, then it exits 0; past --shutdown-timeout the running ones are stopped and it still exits 0; after a
kill -9 in the middle of a request, `ownllm serve` on the same port serves at once."""

from __future__ import annotations

import json
import signal

import httpx

from tests.server.conftest import TINY_NAME, free_port, start_server

EXIT_SECONDS = 60
LONG = {"model": TINY_NAME, "prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
ENDLESS = {**LONG, "max_tokens": None}  # to the 4096-token context


def _stream_until_first_token(client: httpx.Client, body: dict):
    """-> (the open stream, its line iterator), once the answer has started."""
    stream = client.stream("POST", "/v1/completions", json=body)
    response = stream.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return stream, lines


def _completion_tokens(lines) -> tuple[int, str | None]:
    """Reads the rest of an SSE stream -> (number of text chunks, the finish reason)."""
    num_chunks, finish_reason = 1, None
    for line in lines:
        if line.startswith("data: {"):
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            num_chunks += 1
            finish_reason = choice["finish_reason"] or finish_reason
    return num_chunks, finish_reason


def test_sigterm_drains_then_exits_0(tiny_model, tmp_path):
    # a shutdown timeout far past the answer's time, however loaded the machine: this test is about draining
    with start_server(tmp_path, str(tiny_model), "--served-model-name", TINY_NAME, "--shutdown-timeout", "600") \
            as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        stream, lines = _stream_until_first_token(client, LONG)
        server.process.send_signal(signal.SIGTERM)
        refused = httpx.post(f"{server.url}/v1/chat/completions", timeout=10,
                             json={"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        num_chunks, finish_reason = _completion_tokens(lines)
        stream.__exit__(None, None, None)
        assert finish_reason == "length" and num_chunks > 100  # the running answer was let finish
        assert server.process.wait(timeout=EXIT_SECONDS) == 0, server.log.read_text()


def test_past_the_shutdown_timeout_running_requests_stop(tiny_model, tmp_path):
    with start_server(tmp_path, str(tiny_model), "--served-model-name", TINY_NAME, "--shutdown-timeout", "0.5",
                      "--max-num-seqs", "1") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        stream, lines = _stream_until_first_token(client, {**ENDLESS, "max_tokens": 4000})
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=EXIT_SECONDS) == 0, server.log.read_text()
        try:
            finish_reason = _completion_tokens(lines)[1]
        except httpx.HTTPError:  # cut off mid-stream
            finish_reason = None
        stream.__exit__(None, None, None)
        assert finish_reason is None  # stopped, not finished
    assert "stopping 1 running requests" in server.log.read_text()


def test_serves_again_at_once_after_kill_9(tiny_model, tmp_path):
    port = free_port()
    with start_server(tmp_path, str(tiny_model), "--served-model-name", TINY_NAME, port=port) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        _stream_until_first_token(client, ENDLESS)
        server.process.kill()
        server.process.wait(timeout=EXIT_SECONDS)
    with start_server(tmp_path, str(tiny_model), "--served-model-name", TINY_NAME, port=port) as server:
        response = httpx.post(f"{server.url}/v1/completions", timeout=60,
                              json={"model": TINY_NAME, "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2

