"""Load on an OpenAI-compatible server: ownllm serve next to llama-cpp-python's server on the same GGUF.

    python bench/serve_load.py                              # starts both on the bundled model, writes RESULTS.md
    python bench/serve_load.py --start ownllm --concurrency 1,4 --max-tokens 16
    python bench/serve_load.py --url http://127.0.0.1:8000  # a server that is already running (not written)

For each concurrency level, that many clients (asyncio + httpx) each send `--requests-per-client`
streaming greedy chat requests, one after another, and the tool reports requests/s, output tokens/s,
time to first token and inter-token latency (p50 / p99), after one warm-up request. A prefix-cache
probe then times the first token of a request whose ~1,000-token system prompt an earlier request
already sent, against a request with a fresh system prompt of the same length. Timings are taken at
the client, from the SSE chunks; output tokens are the server's usage counts (one per content chunk
where none is sent). With both servers, the ownllm / llama.cpp ratios are listed; the section
"Serving load" of bench/RESULTS.md is rewritten.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled_decode import write_section  # noqa: E402

QUESTIONS = [
    "Write a long story about a lighthouse keeper.", "Explain how a bicycle works, in detail.",
    "Describe the water cycle step by step.", "Write a letter to a friend about your holiday.",
    "List twenty animals and one fact about each.", "Explain why the sky is blue to a child.",
]
STARTUP_SECONDS = 300


@dataclass
class RequestResult:
    ttft: float
    latency: float
    num_tokens: int
    itls: list[float] = field(default_factory=list)


@dataclass
class LevelResult:
    concurrency: int
    num_requests: int
    seconds: float
    results: list[RequestResult]

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return sum(r.num_tokens for r in self.results) / self.seconds

    def ttft(self, q: float) -> float:
        return percentile([r.ttft for r in self.results], q)

    def itl(self, q: float) -> float:
        return percentile([x for r in self.results for x in r.itls], q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- one request, one level, the probe


OWNLLM_ARGS: list[str] = []  # --ownllm-dtype
SPECULATIVE_CONFIG: str | None = None  # --speculative-config: the "ownllm + spec" server's
RAW = False  # --raw: /v1/completions on the joined message texts (for models without a chat template)


async def chat(client: httpx.AsyncClient, messages: list[dict], max_tokens: int) -> RequestResult:
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if RAW:
        body["prompt"] = "\n".join(m["content"] for m in messages)
    else:
        body["messages"] = messages
    start = time.perf_counter()
    first = last = None
    itls, num_chunks, usage = [], 0, None
    route = "/v1/completions" if RAW else "/v1/chat/completions"
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[len("data: "):])
            usage = data.get("usage") or usage
            if any(choice.get("text") or choice.get("delta", {}).get("content") for choice in data.get("choices") or []):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itls.append(now - last)
                last = now
                num_chunks += 1
    end = time.perf_counter()
    num_tokens = usage["completion_tokens"] if usage else num_chunks
    return RequestResult((first or end) - start, end - start, num_tokens, itls)


async def run_level(url: str, concurrency: int, requests_per_client: int, max_tokens: int) -> LevelResult:
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        async def one_client(index: int) -> list[RequestResult]:
            return [await chat(client, [{"role": "user", "content": QUESTIONS[(index + i) % len(QUESTIONS)]}],
                               max_tokens) for i in range(requests_per_client)]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    return LevelResult(concurrency, len(results), seconds, results)


def long_system_prompt(num_rules: int = 80) -> str:
    """~1,000 tokens, unique to this call (its first line), so no earlier request shares it."""
    rules = " ".join(f"Rule {i}: answer politely, cite source number {i * 7}, and keep it short."
                     for i in range(num_rules))
    return f"Session {uuid.uuid4().hex}. You are a careful assistant. {rules}"


async def prefix_probe(url: str, num_rules: int) -> tuple[float, float]:
    """-> (first-token time with a fresh ~1,000-token system prompt, with one an earlier request sent)."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        shared = long_system_prompt(num_rules)

        async def ttft(system: str, question: str) -> float:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            return (await chat(client, messages, 1)).ttft

        await ttft(shared, QUESTIONS[0])  # fills the cache with the shared prompt
        warm = await ttft(shared, QUESTIONS[1])
        cold = await ttft(long_system_prompt(num_rules), QUESTIONS[1])
    return cold, warm


# ---- servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(kind: str, model: Path, port: int, threads: int) -> list[str]:
    if kind.startswith("ownllm"):
        spec = ["--speculative-config", SPECULATIVE_CONFIG] if kind == "ownllm + spec" else []
        return [sys.executable, "-m", "ownllm", "serve", "--model", str(model), "--port", str(port), *OWNLLM_ARGS, *spec]
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port), "--n_ctx", "4096",
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False",
            "--interrupt_requests", "False"]  # queue concurrent requests instead of cutting the running one


@contextmanager
def launched(kind: str, model: Path, threads: int, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    with launched_process(kind, model, threads, extra_args) as (url, _):
        yield url


@contextmanager
def launched_process(kind: str, model: Path, threads: int,
                     extra_args: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """The server of `kind` on `model` with `extra_args` added to its command line -> (its URL, its process). Its
    stderr goes to a file (a pipe nobody reads would stall a long run once full)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([*server_command(kind, model, port, threads), *extra_args], stdout=subprocess.DEVNULL,
                               stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_ready(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {process.returncode}: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {STARTUP_SECONDS}s")


def measure(url: str, args: argparse.Namespace) -> tuple[list[LevelResult], tuple[float, float]]:
    asyncio.run(run_level(url, 1, 1, 2))  # warm-up: a server's first request pays one-time costs
    levels = []
    for concurrency in args.concurrency:
        level = asyncio.run(run_level(url, concurrency, args.requests_per_client, args.max_tokens))
        print(f"  {concurrency:>3} clients: {level.requests_per_s:.2f} req/s, {level.tokens_per_s:.1f} tok/s, "
              f"TTFT p50 {level.ttft(0.5):.3f}s", flush=True)
        levels.append(level)
    probe = asyncio.run(prefix_probe(url, args.prefix_rules))
    print(f"  prefix probe: fresh {probe[0]:.3f}s, shared {probe[1]:.3f}s", flush=True)
    return levels, probe


# ---- report


def report(measured: dict[str, tuple[list[LevelResult], tuple[float, float]]], args: argparse.Namespace) -> str:
    names = list(measured)
    table = ["| server | clients | requests | req/s | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) "
             "| ITL p99 (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        for level in measured[name][0]:
            table.append(f"| {name} | {level.concurrency} | {level.num_requests} | {level.requests_per_s:.2f} | "
                         f"{level.tokens_per_s:.1f} | {level.ttft(0.5):.3f} | {level.ttft(0.99):.3f} | "
                         f"{level.itl(0.5) * 1e3:.1f} | {level.itl(0.99) * 1e3:.1f} |")
    lines = [*table, ""]
    if len(names) == 2:
        (a, (ours, _)), (b, (theirs, _)) = measured.items()
        lines += [f"| clients | output tok/s {a} / {b} | TTFT p50 {a} / {b} |", "|---|---|---|"]
        for mine, other in zip(ours, theirs):
            lines.append(f"| {mine.concurrency} | {mine.tokens_per_s / other.tokens_per_s:.2f}x | "
                         f"{mine.ttft(0.5) / other.ttft(0.5):.2f}x |")
        lines.append("")
    lines += ["| server | output tok/s at 16 clients / at 1 client |", "|---|---|"]
    for name in names:
        by_level = {level.concurrency: level.tokens_per_s for level in measured[name][0]}
        if 1 in by_level and 16 in by_level:
            lines.append(f"| {name} | {by_level[16] / by_level[1]:.2f}x |")
    lines += ["", "| server | TTFT, fresh ~1,000-token system prompt (s) | TTFT, shared with an earlier request (s) "
              "| speed-up |", "|---|---|---|---|"]
    for name in names:
        cold, warm = measured[name][1]
        lines.append(f"| {name} | {cold:.3f} | {warm:.3f} | {cold / warm:.1f}x |")
    command = " ".join(["python bench/serve_load.py", *sys.argv[1:]])
    header = [
        f"Command: `{command}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end: "
        f"other work shares them), llama.cpp threads {args.threads}; model "
        f"{args.model.name if not args.ownllm_model else f'{args.ownllm_model} (ownllm) / {args.model} (llama.cpp)'}; "
        f"{'raw completions' if RAW else 'streaming greedy chat'}, {args.max_tokens} new tokens (EOS ignored), "
        f"{args.requests_per_client} request(s) per client; timings at the client.", "",
    ]
    return "\n".join(header + lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="benchmark this running server instead of starting any")
    parser.add_argument("--start", choices=["both", "ownllm", "llama.cpp", "spec"], default="both",
                        help="spec: ownllm without and with --speculative-config, one after the other")
    parser.add_argument("--speculative-config", help="JSON for the 'ownllm + spec' server (with --start spec)")
    parser.add_argument("--model", type=Path, help="GGUF file both servers load (default: the bundled model)")
    parser.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--ownllm-model", type=Path, help="what ownllm serves instead of --model (e.g. the HF "
                        "checkpoint the GGUF was converted from)")
    parser.add_argument("--ownllm-dtype", help="ownllm serve --dtype")
    parser.add_argument("--raw", action="store_true", help="/v1/completions on plain text (no chat template needed)")
    parser.add_argument("--section", default="Serving load", help="bench/RESULTS.md section to (re)write")
    parser.add_argument("--prefix-rules", type=int, default=80, help="length of the prefix probe's system prompt: "
                        "80 rules are ~1,000 tokens for SmolLM2's tokenizer, 19 for the harness's byte-level one")
    args = parser.parse_args()
    global RAW, SPECULATIVE_CONFIG
    RAW = args.raw
    SPECULATIVE_CONFIG = args.speculative_config
    if args.start == "spec" and not SPECULATIVE_CONFIG:
        parser.error("--start spec needs --speculative-config")
    if args.ownllm_dtype:
        OWNLLM_ARGS.extend(["--dtype", args.ownllm_dtype])
    if args.model is None:
        from ownllm.loader.resolve import bundled_model_path

        args.model = bundled_model_path()
    return args


def main() -> None:
    args = parse_args()
    measured = {}
    if args.url:
        print(f"{args.url}:", flush=True)
        measured["server"] = measure(args.url, args)
    else:
        kinds = {"both": ["ownllm", "llama.cpp"], "spec": ["ownllm", "ownllm + spec"]}.get(args.start, [args.start])
        for kind in kinds:
            print(f"{kind}:", flush=True)
            model = args.ownllm_model if kind.startswith("ownllm") and args.ownllm_model else args.model
            with launched(kind, model, args.threads) as url:
                measured[kind] = measure(url, args)
    body = report(measured, args)
    print(body)
    if not args.url and not args.no_write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
