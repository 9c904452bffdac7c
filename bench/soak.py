"""Soak: many streaming clients for minutes against one `ownllm serve`, and every finished answer checked.

    python bench/soak.py                                  # 64 clients, 10 minutes, writes "Soak" in RESULTS.md
    python bench/soak.py --clients 8 --minutes 1 --no-write   # a smoke run
    python bench/soak.py --url http://127.0.0.1:8000      # a server already running (no RSS figures, not written)

It starts `ownllm serve` on the bundled model with `--max-model-len 2048` (this script's `--max-model-len N` sets
it), so that prompts near the context limit are cheap to prefill, `--kv-cache-memory 256MiB` (the pool's pages are
mapped on first use, so a small one is all resident early and RSS growth is the server's own) and `--dtype
float32` (in bfloat16, greedy answers equal the request alone only up to near-ties that the batch decides).
Each client sends, one after another, requests drawn from a fixed, seeded pool: chat and completions, n up to 4,
logprobs, stop strings, prompts that leave only a few tokens of the context free, three system prompts shared by
many requests; all greedy (temperature 0) and streamed. A fifth of the clients close each stream at a random chunk
(a disconnect mid-answer). At the end, with the server idle:

- the KV pool must be back to all blocks free (`ownllm_kv_cache_blocks_used` in /metrics is 0);
- every completed answer must equal that request's answer alone: each distinct request that completed is sent
  again, by itself, and the texts, finish reasons and (with logprobs) tokens compared;
- errors (an HTTP status other than 200, a broken stream, a finish reason other than stop or length) must be 0;
- the server's resident memory (VmRSS, sampled every 5 s) must grow < 5% between minute 2 and the end of the load
  (for runs under 10 minutes: between 20% of the run and its end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundled_decode import write_section  # noqa: E402

CONTEXT = 2048  # the served --max-model-len
RSS_INTERVAL_S = 5.0
MAX_RSS_GROWTH = 0.05
LOGPROB_TOLERANCE = 1e-3  # logprobs are compared within this (texts and tokens exactly)
DISCONNECTING_SHARE = 0.2
SYSTEM_PROMPTS = [
    "You are a careful assistant. " + " ".join(f"Rule {i}: answer politely, cite source {i * 7}, keep it short."
                                                for i in range(12)),
    "You are a terse math tutor who shows every step. " + " ".join(
        f"Example {i}: {i} plus {i + 3} is {2 * i + 3}." for i in range(12)),
    "You write short poems about the sea. " + " ".join(f"Line {i}: the tide comes in, wave number {i}."
                                                       for i in range(12)),
]
QUESTIONS = [
    "Why is the sky blue?", "Name three rivers in Europe.", "What is 17 times 23?", "Write a haiku about tea.",
    "Explain photosynthesis in one sentence.", "List the planets of the solar system.",
    "What does a compiler do?", "Give me a recipe for pancakes.", "Who wrote Hamlet?",
    "Describe a lighthouse at night.", "How do bicycles stay upright?", "Translate 'good morning' into French.",
]
FILLERS = [
    "The old lighthouse keeper climbed the stairs again, counting each step as the storm grew louder. ",
    "In the quiet library, rows of dusty books waited for a reader who would open them one more time. ",
    "Numbers and letters mixed on the blackboard: 3 apples, 5 pears, and a question mark at the end. ",
]


@dataclass(frozen=True)
class SoakRequest:
    """One request of the pool: the route, its JSON body (streaming fields are added when sent), its kind."""

    route: str
    body: dict
    kind: str


@dataclass
class Answer:
    """One choice of a streamed response, folded from its chunks."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)  # with logprobs on
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class LoadResult:
    completed: dict[int, list[list[Answer]]] = field(default_factory=dict)  # pool index -> each response's answers
    num_requests: int = 0
    num_disconnected: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_completed(self) -> int:
        return sum(len(responses) for responses in self.completed.values())


class SoakError(Exception):
    pass


# ---- one streamed request


async def stream_answers(client: httpx.AsyncClient, request: SoakRequest,
                         disconnect_after: int | None = None) -> list[Answer] | None:
    """Sends the request streamed -> its answers by index, or None when it closed the stream after
    `disconnect_after` chunks (leaving the `async with` closes the connection mid-answer). Raises SoakError
    for anything a client should never see."""
    body = {**request.body, "stream": True}
    answers: dict[int, Answer] = {}
    num_chunks, done = 0, False
    async with client.stream("POST", request.route, json=body) as response:
        if response.status_code != 200:
            raise SoakError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if disconnect_after is not None and num_chunks >= disconnect_after:
                return None
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            data = json.loads(line.removeprefix("data: "))
            if "error" in data:
                raise SoakError(f"error event: {data['error']}")
            for choice in data["choices"]:
                _fold(choice, answers.setdefault(choice["index"], Answer()))
            num_chunks += 1
    if not done:
        raise SoakError("the stream ended without [DONE]")
    n = request.body.get("n", 1)
    if sorted(answers) != list(range(n)):
        raise SoakError(f"choices {sorted(answers)} for n={n}")
    for answer in answers.values():
        if answer.finish_reason not in ("stop", "length"):
            raise SoakError(f"finish_reason {answer.finish_reason!r}")
    return [answers[i] for i in range(n)]


def _fold(choice: dict, answer: Answer) -> None:
    """Adds one chunk's choice (completions or chat shape) to its answer."""
    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
    logprobs = choice.get("logprobs")
    if "delta" in choice:
        answer.text += choice["delta"].get("content") or ""
        for entry in (logprobs or {}).get("content") or []:
            answer.tokens.append(entry["token"])
            answer.logprobs.append(entry["logprob"])
    else:
        answer.text += choice.get("text") or ""
        if logprobs:
            answer.tokens += logprobs["tokens"]
            answer.logprobs += logprobs["token_logprobs"]


# ---- the request pool


def build_pool(url: str, model: str, context: int, seed: int = 0, size: int = 32) -> list[SoakRequest]:
    """`size` seeded requests of every kind; the long ones leave 1 to 24 tokens of `context` unused."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=1800) as client:
        lengths = PromptLengths(client, model)
        long_chat = _near_the_limit(lengths.chat, context, lambda text: (
            "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}]}))
        long_completion = _near_the_limit(lengths.completion, context, lambda text: (
            "/v1/completions", {"model": model, "prompt": text}))
    kinds = [
        ("chat", lambda: _chat(model, rng)),
        ("chat n>1 logprobs", lambda: _chat(model, rng, n=rng.randint(2, 4), logprobs=True,
                                            top_logprobs=rng.randint(0, 3))),
        ("chat stop", lambda: _chat(model, rng, stop=[".", "\n"])),
        ("completion", lambda: _completion(model, rng)),
        ("completion n>1 logprobs", lambda: _completion(model, rng, n=rng.randint(2, 4), logprobs=rng.randint(0, 3))),
        ("completion stop", lambda: _completion(model, rng, stop=[",", " the"])),
        ("long completion", lambda: long_completion(rng)),
        ("long chat", lambda: long_chat(rng)),
    ]
    pool = []
    for i in range(size):
        kind, make = kinds[i % len(kinds)]
        route, body = make()
        pool.append(SoakRequest(route, {**body, "temperature": 0}, kind))
    return pool


def _chat(model: str, rng: random.Random, **options) -> tuple[str, dict]:
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                {"role": "user", "content": rng.choice(QUESTIONS)}]
    return "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": rng.randint(8, 48), **options}


def _completion(model: str, rng: random.Random, **options) -> tuple[str, dict]:
    prompt = f"{rng.choice(SYSTEM_PROMPTS)}\nQuestion: {rng.choice(QUESTIONS)}\nAnswer:"
    return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": rng.randint(8, 48), **options}


class PromptLengths:
    """Prompt lengths in the server's own tokens, without running the model: a user message's through
    /v1/messages/count_tokens (the chat template applied), a plain text's as that less the template's share,
    which one short completion (usage.prompt_tokens) measures."""

    def __init__(self, client: httpx.Client, model: str) -> None:
        self.client, self.model = client, model
        probe = "Hello there."
        response = client.post("/v1/completions", json={"model": model, "prompt": probe, "max_tokens": 1})
        response.raise_for_status()
        self.template_tokens = self.chat(probe) - response.json()["usage"]["prompt_tokens"]

    def chat(self, text: str) -> int:
        response = self.client.post("/v1/messages/count_tokens", json={
            "model": self.model, "messages": [{"role": "user", "content": text}]})
        response.raise_for_status()
        return response.json()["input_tokens"]

    def completion(self, text: str) -> int:
        return self.chat(text) - self.template_tokens


def _near_the_limit(length_of, context: int, request_of):
    """-> make(rng): a (route, body) whose prompt, filler text repeated, leaves 1 to 24 tokens of `context`, and
    whose max_tokens takes all but 0 to 8 of those."""
    fitted = []
    for filler in FILLERS:
        repeats = 1
        while length_of(filler * (repeats + 1)) <= context - 24:
            repeats += 1
        fitted.append((filler * repeats, length_of(filler * repeats)))

    def make(rng: random.Random) -> tuple[str, dict]:
        text, length = rng.choice(fitted)
        room = context - length
        route, body = request_of(text)
        return route, {**body, "max_tokens": room - rng.randint(0, min(8, room - 1))}

    return make


# ---- the load, and the checks


async def run_clients(url: str, pool: list[SoakRequest], num_clients: int, seconds: float,
                      disconnecting_share: float = DISCONNECTING_SHARE, max_disconnect_chunk: int = 16,
                      seed: int = 0) -> LoadResult:
    """num_clients clients, each sending pool requests one after another until `seconds` have passed (then
    finishing the one in flight); the first `disconnecting_share` of them close each stream after a random
    0..max_disconnect_chunk chunks."""
    result = LoadResult()
    num_disconnecting = round(num_clients * disconnecting_share)
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=num_clients + 4, max_keepalive_connections=num_clients + 4)

    async def client_loop(client: httpx.AsyncClient, rng: random.Random, disconnects: bool) -> None:
        while time.monotonic() < deadline:
            index = rng.randrange(len(pool))
            after = rng.randint(0, max_disconnect_chunk) if disconnects else None
            result.num_requests += 1
            try:
                answers = await stream_answers(client, pool[index], after)
            except (SoakError, httpx.HTTPError, json.JSONDecodeError, KeyError) as error:
                result.errors.append(f"{pool[index].kind}: {type(error).__name__}: {error}")
                continue
            if answers is None:
                result.num_disconnected += 1
            else:
                result.completed.setdefault(index, []).append(answers)

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800), limits=limits) as client:
        await asyncio.gather(*(client_loop(client, random.Random(seed * 1000 + c), c < num_disconnecting)
                               for c in range(num_clients)))
    result.seconds = time.monotonic() - started
    return result


async def reference_answers(url: str, pool: list[SoakRequest], indexes) -> dict[int, list[Answer]]:
    """Each request sent alone, one after another -> its answers."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800)) as client:
        return {i: await stream_answers(client, pool[i]) for i in sorted(indexes)}


@dataclass
class Comparison:
    num_checked: int = 0  # answers compared
    mismatches: list[str] = field(default_factory=list)
    max_logprob_difference: float = 0.0


def compare(pool: list[SoakRequest], result: LoadResult, references: dict[int, list[Answer]]) -> Comparison:
    """Every completed answer against its request's answer alone: text, finish reason and tokens equal,
    logprobs within LOGPROB_TOLERANCE."""
    comparison = Comparison()
    for index, responses in sorted(result.completed.items()):
        for answers in responses:
            for choice, (answer, reference) in enumerate(zip(answers, references[index])):
                comparison.num_checked += 1
                differences = [name for name in ("text", "finish_reason", "tokens")
                               if getattr(answer, name) != getattr(reference, name)]
                gaps = [abs(a - b) for a, b in zip(answer.logprobs, reference.logprobs)]
                comparison.max_logprob_difference = max([comparison.max_logprob_difference, *gaps])
                if any(gap > LOGPROB_TOLERANCE for gap in gaps):
                    differences.append("logprobs")
                if differences:
                    comparison.mismatches.append(
                        f"pool[{index}] ({pool[index].kind}) choice {choice}: {', '.join(differences)} differ: "
                        f"{answer.text!r} vs alone {reference.text!r}")
    return comparison


def metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name: value} (unlabelled samples)."""
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Polls /metrics until no request runs or waits and no KV block is held, or `timeout` passes -> the last
    samples (the caller reads the blocks still held from them)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = metrics(url)
        busy = samples["ownllm_num_requests_running"] + samples["ownllm_num_requests_waiting"]
        if (busy == 0 and samples["ownllm_kv_cache_blocks_used"] == 0) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


# ---- resident memory


class RssSampler:
    """VmRSS of a process every RSS_INTERVAL_S seconds, in a thread: (seconds since start, KiB) pairs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with open(f"/proc/{self.pid}/status") as status:
                kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            self.samples.append((time.monotonic() - self._started, kib))
            if self._stop.wait(RSS_INTERVAL_S):
                return

    def growth(self, since: float) -> tuple[int, int, float]:
        """-> (KiB at the first sample from `since` seconds on, KiB at the last sample, relative growth)."""
        start = next((kib for t, kib in self.samples if t >= since), self.samples[-1][1])
        end = self.samples[-1][1]
        return start, end, end / start - 1


# ---- the run


def soak(url: str, args: argparse.Namespace, rss: RssSampler | None = None) -> tuple[str, bool]:
    """-> (the report, whether every check passed)."""
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    pool = build_pool(url, model["id"], model["max_model_len"], args.seed)
    print(f"pool: {len(pool)} requests; {args.clients} clients for {args.minutes} min", flush=True)
    result = asyncio.run(run_clients(url, pool, args.clients, args.minutes * 60, seed=args.seed))
    rss_figures = rss.growth(min(120.0, 0.2 * args.minutes * 60)) if rss else None
    idle = wait_idle(url)
    blocks_used, blocks_total = idle["ownllm_kv_cache_blocks_used"], idle["ownllm_kv_cache_blocks_total"]
    print(f"load done: {result.num_completed} completed, {result.num_disconnected} disconnected, "
          f"{len(result.errors)} errors; checking {len(result.completed)} distinct requests alone", flush=True)
    started = time.monotonic()
    references = asyncio.run(reference_answers(url, pool, result.completed))
    comparison = compare(pool, result, references)
    print(f"references took {time.monotonic() - started:.0f}s", flush=True)
    passed = (not result.errors and not comparison.mismatches and blocks_used == 0
              and (rss_figures is None or rss_figures[2] < MAX_RSS_GROWTH))
    return report(pool, result, comparison, (blocks_used, blocks_total), rss_figures, args, passed), passed


def report(pool, result: LoadResult, comparison: Comparison, blocks: tuple[float, float], rss, args,
           passed: bool) -> str:
    kinds = {}
    for index, responses in result.completed.items():
        kinds[pool[index].kind] = kinds.get(pool[index].kind, 0) + len(responses)
    lines = [
        f"Command: `{' '.join(['python bench/soak.py', *sys.argv[1:]])}`; bundled SmolLM2-135M-Instruct Q4_1 served "
        f"with `--max-model-len {args.max_model_len} --kv-cache-memory {args.kv_cache_memory}"
        f"{' --dtype ' + args.dtype if args.dtype else ''}`; {args.clients} streaming clients for {args.minutes} min "
        f"({result.seconds:.0f} s with the last answers), {round(args.clients * DISCONNECTING_SHARE)} of them closing "
        "each stream at a random chunk; all greedy.", "",
        "| figure | value |", "|---|---|",
        f"| requests sent | {result.num_requests} |",
        f"| completed / disconnected on purpose | {result.num_completed} / {result.num_disconnected} |",
        f"| errors | {len(result.errors)} |",
        f"| completed answers equal to the request alone (distinct requests re-sent) | "
        f"{comparison.num_checked - len(comparison.mismatches)} / {comparison.num_checked} ({len(result.completed)}) |",
        f"| largest logprob difference to the request alone | {comparison.max_logprob_difference:.2g} |",
        f"| KV blocks held once idle | {blocks[0]:.0f} of {blocks[1]:.0f} |",
    ]
    if rss:
        lines.append(f"| server RSS from minute {min(2.0, 0.2 * args.minutes):g} to the end of the load | "
                     f"{rss[0] / 1024:.0f} -> {rss[1] / 1024:.0f} MiB ({rss[2]:+.1%}) |")
    lines += [f"| verdict | {'pass' if passed else 'FAIL'} |", "",
              "Completed answers by kind: " + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))]
    for title, items in (("Errors", result.errors), ("Mismatches", comparison.mismatches)):
        if items:
            lines += ["", f"{title} (first 10):", *[f"- {item}" for item in items[:10]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=CONTEXT, help="the served context, which the long "
                        "prompts nearly fill (a smaller one makes them cheaper on a slow machine)")
    parser.add_argument("--url", help="soak this running server instead of starting one (no RSS, not written)")
    parser.add_argument("--kv-cache-memory", default="256MiB", help="the server's KV pool: its pages are mapped "
                        "on first use, in LRU order, so a small pool is all resident early and RSS growth after "
                        "minute 2 is the server's own")
    parser.add_argument("--dtype", default="float32", help="the server's --dtype: float32 by default, since in "
                        "bfloat16 an answer may take another token at a near-tie when its batch differs (see "
                        "RESULTS.md); '' for the server's own choice")
    parser.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: all CPUs)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    if args.url:
        body, passed = soak(args.url, args)
    else:
        import os

        from serve_load import launched_process

        from ownllm.loader.resolve import bundled_model_path

        with launched_process("ownllm", bundled_model_path(), args.threads or os.cpu_count(),
                              ("--max-model-len", str(args.max_model_len), "--kv-cache-memory", args.kv_cache_memory,
                               *(["--dtype", args.dtype] if args.dtype else []))) as (url, process), \
                RssSampler(process.pid) as rss:
            body, passed = soak(url, args, rss)
    print(body)
    if not args.url and not args.no_write:
        write_section("Soak", body)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
