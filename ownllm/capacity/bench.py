"""`ownllm bench`: what one model serves on this machine. Load time; prefill and decode tokens/s at batch 1;
then, at each concurrency level, aggregate output tokens/s, time to first token (TTFT) and inter-token latency
(ITL) at p50 and p99. Everything lands in one JSON report (see `run_bench`), which `ownllm plan` reads.

How it measures: in-process, through AsyncEngine, the engine loop and per-request streams that `ownllm serve`'s
routes consume (server/serving.py run()), built from `serve`'s defaults (EngineConfig: 64 sequences a step, a
512-token step budget, the KV cache sized the same way, prefix caching on). What a user of the server waits for
is that engine: its steps, its batching of the concurrent streams, its scheduling of prefills among decodes, its
detokenization. Timings are taken where a route would read them, at the stream, so each one includes the hop
from the engine thread to the asyncio loop. Left out is the HTTP leg (JSON rendering, the socket), a small cost
per chunk on localhost that `bench/serve_load.py` measures against a real server; leaving it out keeps the
command self-contained (no port, no second process to start or leave behind) and its figures steadier.

The workload: every request gets its own prompt of exactly --prompt-tokens tokens (distinct from its first block
on, so no request reuses another's KV cache: a prefix-cache hit would flatter prefill), greedy decoding of exactly
--new-tokens tokens (EOS ignored). At concurrency c, c streams start together and each sends one request; the
level's aggregate tokens/s is all output tokens over the wall time from the start to the last token. TTFT runs from
a request's send to its first token; ITL is the gap between consecutive tokens of one request (a step that
delivers k tokens at once counts k gaps of a k-th of its interval). Percentiles interpolate linearly between the
closest ranks (numpy's default).
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ownllm.sampling_params import SamplingParams

DEFAULT_CONCURRENCY = (1, 4, 16, 64)
BATCH1_REPEATS = 3  # batch-1 prefill and decode: the median of this many requests
REPORT_VERSION = 1
_WORDS = ("river mountain quiet engine paper window garden silver thunder orange pencil ocean market winter "
          "candle forest bridge mirror planet shadow violin harbor meadow lantern copper desert falcon marble "
          "compass velvet glacier orchard beacon").split()


@dataclass
class RequestTiming:
    ttft_s: float
    latency_s: float  # send to last token
    output_tokens: int


@dataclass(frozen=True)
class Progress:
    """What the bench reports as it goes: phase(text) when a phase starts, advance() after each request."""

    phase: Callable[[str], None] = lambda text: None
    advance: Callable[[], None] = lambda: None


@dataclass
class BenchSettings:
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    prompt_tokens: int = 128
    new_tokens: int = 64

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"--concurrency needs levels of at least 1, got {','.join(map(str, self.concurrency))}")
        if self.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens must be at least 1, got {self.prompt_tokens}")
        if self.new_tokens < 2:
            raise ValueError(f"--new-tokens must be at least 2 (decode speed and ITL need a second token), "
                             f"got {self.new_tokens}")

    @property
    def num_requests(self) -> int:
        """Requests the whole bench sends: a warm-up, the batch-1 runs, then every level's streams."""
        return 1 + BATCH1_REPEATS + sum(self.concurrency)


def parse_concurrency(text: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16), sorted, without repeats; ValueError naming the option otherwise."""
    try:
        levels = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ValueError(f"--concurrency must be comma-separated whole numbers like 1,4,16,64, got {text!r}") from None
    if not levels:
        raise ValueError(f"--concurrency must be comma-separated whole numbers like 1,4,16,64, got {text!r}")
    return levels


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, linear between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Prompts:
    """Distinct prompts of exactly num_tokens tokens: the i-th opens with its own number and random words."""

    def __init__(self, tokenizer, num_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.num_tokens = num_tokens
        self.count = 0

    def next(self) -> list[int]:
        rng = random.Random(self.count)
        words = f"Request {self.count}: " + " ".join(rng.choice(_WORDS) for _ in range(self.num_tokens))
        self.count += 1
        ids = self.tokenizer.encode(words, add_special_tokens=False)
        while len(ids) < self.num_tokens:  # a tokenizer that merges words: pad with more of them
            ids += self.tokenizer.encode(" " + " ".join(rng.choice(_WORDS) for _ in range(self.num_tokens)),
                                         add_special_tokens=False)
        return ids[:self.num_tokens]


async def timed_request(engine, prompt_ids: list[int], new_tokens: int, itls: list[float]) -> RequestTiming:
    """Streams one greedy request of new_tokens tokens; appends its inter-token gaps to itls."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, output_kind="delta")
    started = time.perf_counter()
    first = last = None
    num_tokens = 0
    async for output in engine.generate(prompt_ids, params):
        count = len(output.outputs[0].token_ids)
        if not count:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        else:
            itls.extend([(now - last) / count] * count)
        last = now
        num_tokens += count
    return RequestTiming(first - started, last - started, num_tokens)


async def batch1(engine, prompts: Prompts, new_tokens: int, progress: Progress) -> dict:
    """Prefill and decode speed of one request alone: the median of BATCH1_REPEATS runs."""
    runs = []
    for _ in range(BATCH1_REPEATS):
        runs.append(await timed_request(engine, prompts.next(), new_tokens, []))
        progress.advance()
    ttft = statistics.median(r.ttft_s for r in runs)
    decode = statistics.median(r.latency_s - r.ttft_s for r in runs)
    return {"prefill_tokens_per_s": prompts.num_tokens / ttft, "ttft_s": ttft,
            "decode_tokens_per_s": (new_tokens - 1) / decode, "decode_s": decode, "runs": BATCH1_REPEATS}


async def level(engine, concurrency: int, prompts: Prompts, new_tokens: int, progress: Progress) -> dict:
    """concurrency streams started together, one request each."""
    itls: list[float] = []

    async def stream(prompt_ids: list[int]) -> RequestTiming:
        timing = await timed_request(engine, prompt_ids, new_tokens, itls)
        progress.advance()
        return timing

    started = time.perf_counter()
    timings = await asyncio.gather(*(stream(prompts.next()) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    output_tokens = sum(t.output_tokens for t in timings)
    ttfts = [t.ttft_s for t in timings]
    return {
        "concurrency": concurrency, "num_requests": concurrency, "wall_s": wall, "output_tokens": output_tokens,
        "prompt_tokens": concurrency * prompts.num_tokens, "output_tokens_per_s": output_tokens / wall,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50), "itl_p99_s": percentile(itls, 99),
        "requests": [asdict(t) for t in timings],
    }


def run_bench(model: str | None, dtype: str | None, device: str | None, settings: BenchSettings,
              progress: Progress) -> dict:
    """Loads the model, measures, and returns the report (the JSON `ownllm bench` writes)."""
    from ownllm.config import EngineConfig, resolve_device
    from ownllm.engine.async_engine import AsyncEngine
    from ownllm.loader.resolve import resolve_model

    device = resolve_device(device)
    path = resolve_model(model)
    config = EngineConfig(str(path), dtype, device)  # `ownllm serve`'s defaults
    progress.phase("loading the model")
    started = time.perf_counter()
    engine = AsyncEngine.from_config(config)
    load_s = time.perf_counter() - started
    try:
        needed = settings.prompt_tokens + settings.new_tokens
        if needed > engine.max_model_len:
            raise ValueError(f"--prompt-tokens {settings.prompt_tokens} + --new-tokens {settings.new_tokens} do not "
                             f"fit the model's context of {engine.max_model_len} tokens")
        figures = asyncio.run(_measure(engine, settings, progress))
    finally:
        engine.shutdown()
    return {
        "ownllm_bench": REPORT_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(device), "model": model_facts(model, path, engine.model_config.dtype),
        "settings": {**asdict(settings), "concurrency": list(settings.concurrency), "sampling": "greedy, EOS ignored",
                     "max_num_seqs": config.scheduler.max_num_seqs,
                     "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                     "prefix_caching": config.cache.enable_prefix_caching},
        "load_s": load_s, **figures,
    }


async def _measure(engine, settings: BenchSettings, progress: Progress) -> dict:
    prompts = Prompts(engine.tokenizer, settings.prompt_tokens)
    progress.phase("warm-up")
    await timed_request(engine, prompts.next(), 2, [])  # first-call costs (allocations, lazy set-up) land here
    progress.advance()
    progress.phase("batch 1")
    single = await batch1(engine, prompts, settings.new_tokens, progress)
    levels = []
    for concurrency in settings.concurrency:
        progress.phase(f"{concurrency} concurrent")
        levels.append(await level(engine, concurrency, prompts, settings.new_tokens, progress))
    return {"batch1": single, "levels": levels}


def machine_facts(device: str) -> dict:
    import torch

    cpuinfo = _cpuinfo()
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    cores = {line for line in _paired(cpuinfo, "physical id", "core id")}
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    return {
        "cpu": next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                    platform.processor() or platform.machine()),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
        "physical_cores": len(cores) or os.cpu_count(), "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "memory_gib": memory_gib,
        "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform(),
        "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
    }


def model_facts(model: str | None, path: Path, dtype: str) -> dict:
    from ownllm.loader.resolve import BUNDLED_MODEL_NAME
    from ownllm.model_info import model_info

    info = model_info(path)
    return {"name": model or BUNDLED_MODEL_NAME, "path": str(path), "architecture": info.architecture,
            "parameters": info.parameters, "quantization": info.quantization, "dtype": dtype}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def _paired(lines: list[str], first: str, second: str):
    """(first, second) value pairs of each processor block of /proc/cpuinfo."""
    current = None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == first:
            current = value.strip()
        elif key.strip() == second and current is not None:
            yield current, value.strip()
