"""Replicas on Ray Serve (`ownllm serve --replicas`), measured at the client.

    python bench/ray_replicas.py                      # both parts on the bundled model; rewrites its RESULTS.md section
    python bench/ray_replicas.py --part threads --model 1b   # part (a) on the 1B random shape too (built once)
    python bench/ray_replicas.py --part prefix --no-write

(a) threads: the same cores as one engine with 2 threads (1 replica) or as 2 engines with 1 thread each (2
replicas), next to the plain server (no Ray, 2 threads): 16 streaming clients, greedy, EOS ignored; aggregate
output tokens/s, TTFT and ITL p50/p99 (bench/serve_load.py's client). The 1B shape has no chat template, so it is
driven through /v1/completions.
(b) prefix routing: 4 replicas with 1 thread each, 4 different ~1,000-token system prompts, 64 requests (16 per
prompt, shuffled with a fixed seed) from 8 clients; prefix-cache hit rate (hit / looked-up prompt tokens, summed
over the replicas' /metrics, this run only) and mean TTFT, with prefix-aware routing against Serve's default
power-of-two-choices router (--no-prefix-routing). Every configuration gets a fresh server (cold caches).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402
from bundled_decode import write_section  # noqa: E402
from serve_load import QUESTIONS, LevelResult, chat, free_port, long_system_prompt, run_level  # noqa: E402

STARTUP_SECONDS = 600
SECTION = "Ray Serve replicas"
THREAD_CONFIGS = {  # name -> (serve options, OMP_NUM_THREADS of the serving process)
    "1 process, 2 threads (no Ray)": ([], "2"),
    "1 replica x 2 threads": (["--replicas", "1", "--threads-per-replica", "2"], "1"),
    "2 replicas x 1 thread": (["--replicas", "2", "--threads-per-replica", "1"], "1"),
}
PREFIX_CONFIGS = {
    "prefix-aware routing": ["--replicas", "4", "--threads-per-replica", "1"],
    "power of two choices (Serve's default)": ["--replicas", "4", "--threads-per-replica", "1", "--no-prefix-routing"],
}


@contextmanager
def serving(model: str | None, options: list[str], omp_threads: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "ownllm", "serve", "--port", str(port), *(["--model", model] if model else []),
               *options]
    log = log_dir / f"serve-{port}.log"
    with open(log, "w") as out:  # its own session: a signal to it never reaches the Ray processes it starts
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": omp_threads})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ownllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"ownllm serve not ready after {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")


def prefix_totals(url: str) -> tuple[float, float]:
    """(prompt tokens looked up in the prefix cache, of them found), summed over the replicas."""
    queries = hits = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("ownllm_prefix_cache_queries_total"):
            queries += float(value)
        elif name.startswith("ownllm_prefix_cache_hits_total"):
            hits += float(value)
    return queries, hits


async def prefix_run(url: str, num_prompts: int, per_prompt: int, clients: int, max_tokens: int,
                     rules: int) -> list[float]:
    """-> each request's TTFT; requests pulled from one shuffled queue by `clients` clients."""
    systems = [long_system_prompt(rules) for _ in range(num_prompts)]
    jobs = [(s, QUESTIONS[i % len(QUESTIONS)]) for s in systems for i in range(per_prompt)]
    random.Random(0).shuffle(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def worker() -> None:
            while not queue.empty():
                system, question = queue.get_nowait()
                messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
                ttfts.append((await chat(client, messages, max_tokens)).ttft)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return ttfts


def part_threads(args, model: str | None, label: str, log_dir: Path) -> list[str]:
    rows = []
    for name, (options, omp) in THREAD_CONFIGS.items():
        print(f"{label}, {name}:", flush=True)
        with serving(model, options + args.serve_options, omp, log_dir) as url:
            asyncio.run(run_level(url, 2, 1, 2))  # warm-up (both replicas, by load)
            level: LevelResult = asyncio.run(run_level(url, args.clients, args.requests_per_client, args.max_tokens))
        print(f"  {level.tokens_per_s:.1f} tok/s, TTFT p50 {level.ttft(0.5):.3f}s", flush=True)
        rows.append(f"| {label} | {name} | {level.num_requests} | {level.tokens_per_s:.1f} | {level.ttft(0.5):.3f} | "
                    f"{level.ttft(0.99):.3f} | {level.itl(0.5) * 1e3:.1f} | {level.itl(0.99) * 1e3:.1f} |")
    return rows


def part_prefix(args, log_dir: Path) -> list[str]:
    rows = []
    for name, options in PREFIX_CONFIGS.items():
        print(f"prefix, {name}:", flush=True)
        with serving(None, options + args.serve_options, "1", log_dir) as url:
            asyncio.run(run_level(url, 4, 1, 2))  # warm-up on short prompts, no shared system prompt
            queries, hits = prefix_totals(url)
            ttfts = asyncio.run(prefix_run(url, 4, 16, args.prefix_clients, args.prefix_max_tokens, args.prefix_rules))
            queries_after, hits_after = prefix_totals(url)
        rate = (hits_after - hits) / (queries_after - queries)
        print(f"  hit rate {rate:.1%}, mean TTFT {statistics.mean(ttfts):.3f}s", flush=True)
        rows.append(f"| {name} | {len(ttfts)} | {rate:.1%} | {statistics.mean(ttfts):.3f} | "
                    f"{serve_load.percentile(ttfts, 0.5):.3f} | {serve_load.percentile(ttfts, 0.99):.3f} |")
    return rows


def one_b_model() -> str:
    from harness_models import CACHE, BUILD_VERSION, ensure_built

    ensure_built("llama-3.2-1b", hf_only=True)
    return str(CACHE / f"llama-3.2-1b-v{BUILD_VERSION}" / "hf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["threads", "prefix", "both"], default="both")
    parser.add_argument("--model", choices=["bundled", "1b"], default="bundled", help="part (a): 1b adds the 1B shape")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefix-clients", type=int, default=8)
    parser.add_argument("--prefix-max-tokens", type=int, default=8)
    parser.add_argument("--prefix-rules", type=int, default=80, help="80 rules: ~1,000 tokens of SmolLM2")
    parser.add_argument("--serve-option", dest="serve_options", action="append", default=[],
                        help="passed on to every `ownllm serve` (repeat), e.g. --serve-option=--kv-cache-memory=256MiB")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    lines = [f"Command: `python bench/ray_replicas.py {' '.join(sys.argv[1:])}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (load average {{load}} at the end: other work "
             "shares them). Timings at the client; every configuration on a fresh server.", ""]
    with tempfile.TemporaryDirectory() as logs:
        log_dir = Path(logs)
        if args.part in ("threads", "both"):
            rows = part_threads(args, None, "SmolLM2-135M (bundled)", log_dir)
            if args.model == "1b":
                serve_load.RAW = True  # random weights, no chat template: /v1/completions
                rows += part_threads(args, one_b_model(), "1B shape (random bf16)", log_dir)
                serve_load.RAW = False
            lines += [f"(a) {args.clients} streaming clients x {args.requests_per_client} requests, "
                      f"{args.max_tokens} new tokens each (greedy, EOS ignored):", "",
                      "| model | serving | requests | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) | "
                      "ITL p99 (ms) |", "|---|---|---|---|---|---|---|---|", *rows, ""]
        if args.part in ("prefix", "both"):
            rows = part_prefix(args, log_dir)
            lines += [f"(b) 4 replicas x 1 thread, bundled model; 4 system prompts of ~1,000 tokens, 64 requests in "
                      f"random order from {args.prefix_clients} clients, {args.prefix_max_tokens} new tokens each:",
                      "", "| routing | requests | prefix-cache hit rate | mean TTFT (s) | TTFT p50 (s) | TTFT p99 (s) |",
                      "|---|---|---|---|---|---|", *rows, ""]
    body = "\n".join(lines).replace("{load}", f"{os.getloadavg()[0]:.1f}") + "\n"
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
