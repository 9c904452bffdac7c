"""Real `ownllm serve` processes for the server tests: a tiny random checkpoint, and the bundled model behind an
API key, each served once per session on a free loopback port and stopped at the end; `start_server` starts
others (auth, limits...)."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.checkpoints import build_checkpoint

TINY_NAME = "tiny"
TINY_CONTEXT = 4096  # long enough that a request left to run to the context takes seconds
STARTUP_SECONDS = 240
_num_started = itertools.count()


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def metrics(self, **headers: str) -> dict[str, float]:
        """/metrics as {sample name (with labels): value}."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def wait_idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Polls /metrics until nothing runs or waits and no KV block is held -> the last samples."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            busy = samples["ownllm_num_requests_running"] + samples["ownllm_num_requests_waiting"]
            if busy == 0 and samples.get("ownllm_kv_cache_blocks_used", 0) == 0:
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout}s: {samples}")
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def start_server(log_dir: Path, model: str | None, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None) -> Iterator[Server]:
    port = port or free_port()
    log = log_dir / f"serve-{port}-{next(_num_started)}.log"
    model_args = ["--model", model] if model else []
    command = [sys.executable, "-m", "ownllm", "serve", "--port", str(port), *model_args, *args]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"ownllm serve exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"ownllm serve did not become healthy in {STARTUP_SECONDS}s:\n{server.log.read_text()}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=TINY_CONTEXT)
    return folder


@pytest.fixture(scope="session")
def tiny64_model(tmp_path_factory) -> Path:
    """The same shape with a 64-token context: any generation ends within 64 tokens."""
    folder = tmp_path_factory.mktemp("tiny64-model")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=64)
    return folder


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tmp_path_factory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("logs"), str(tiny_model), "--served-model-name", TINY_NAME) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    """The offline engine on the same checkpoint: the reference for what the server returns."""
    from ownllm import LLM

    return LLM(str(tiny_model), kv_cache_memory=64 * 2**20)


BUNDLED_KEY = "bundled-key"


@pytest.fixture(scope="session")
def bundled_server(tmp_path_factory) -> Iterator[Server]:
    """`ownllm serve` on the bundled SmolLM2-135M-Instruct, behind the API key BUNDLED_KEY."""
    with start_server(tmp_path_factory.mktemp("logs"), None, env={"OWNLLM_API_KEY": BUNDLED_KEY}) as server:
        yield server
