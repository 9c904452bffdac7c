"""Where `ownllm serve`'s time goes under streaming load: the engine thread's step split into its parts, and the CPU
time of every thread of the server process, at each concurrency level.

    python bench/serve_profile.py --concurrency 1,16,64 --max-tokens 64
    python bench/serve_profile.py --offline 16             # LLM.chat on 16 prompts, same split (no server)

The server runs in this process (uvicorn on its own thread, the engine on its thread, as `ownllm serve` runs them);
the clients are bench/serve_load.py in a child process, so they take no share of this interpreter. Parts of the
step are timed by wrapping the functions that do them (wall seconds and the engine thread's CPU seconds):
schedule, build_inputs (the flat batch), forward (the model; "decode" when every sequence computes one row, else
"prefill", which then holds that step's decode rows too), logits (lm head), sample (sampler + draft
acceptance), fold-in (EngineCore folding tokens in: detokenization and stop checks), outputs (Engine's
RequestOutputs), deliver (handing them to the asyncio loop). Thread CPU comes from /proc (no overhead): the engine
thread, the event loop thread (HTTP, SSE, JSON) and OpenMP's workers. Run it with OMP_NUM_THREADS=1 on a loaded
machine: the engine thread's CPU time then counts its work alone (OpenMP workers spinning at a barrier would count
too). Timings under load are development figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("schedule", "build_inputs", "forward (decode)", "forward (prefill)", "logits", "sample", "fold-in", "outputs", "deliver")


class Timers:
    def __init__(self) -> None:
        self.wall = defaultdict(float)
        self.cpu = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - wall
                self.cpu[name] += time.thread_time() - cpu
                self.calls[name] += 1
        return timed

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.calls.clear()


def instrument(engine, timers: Timers) -> None:
    """engine: an Engine (offline) whose core runs a ModelRunner in this process."""
    import ownllm.worker.model_runner as model_runner

    core, runner = engine.core, engine.runner
    engine.step = timers.wrap("step", engine.step)
    engine._output = timers.wrap("outputs", engine._output)
    core.scheduler.schedule = timers.wrap("schedule", core.scheduler.schedule)
    core._update = timers.wrap("fold-in", core._update)
    decode, prefill = (timers.wrap(name, runner.model.forward) for name in ("forward (decode)", "forward (prefill)"))

    def forward(input_ids, meta, *args, **kwargs):  # a decode step computes one row per sequence
        return (decode if len(input_ids) == len(meta.seq_lens) else prefill)(input_ids, meta, *args, **kwargs)

    runner.model.forward = forward
    runner.model.compute_logits = timers.wrap("logits", runner.model.compute_logits)
    model_runner.build_inputs = timers.wrap("build_inputs", model_runner.build_inputs)
    model_runner.sample_and_verify = timers.wrap("sample", model_runner.sample_and_verify)


def thread_cpu(names: dict[int, str]) -> dict[str, float]:
    """CPU seconds of each thread of this process: those in `names` (native id -> name) by name, the others (OpenMP's
    workers) summed under 'omp/other'."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[names.get(int(tid), "omp/other")] += (int(fields[11]) + int(fields[12])) / ticks
    return out


def report(label: str, timers: Timers, seconds: float, cpu: dict[str, float] | None, tokens: tuple[int, int]) -> None:
    """tokens: (prompt tokens computed, tokens generated) in the run."""
    steps = timers.calls["step"] or 1
    total = timers.wall["step"]
    print(f"== {label}: {seconds:.2f} s wall, {steps} steps, {1e3 * total / steps:.2f} ms a step, {tokens[0]} prompt "
          f"tokens computed, {tokens[1]} generated ({tokens[1] / seconds:.1f} tok/s); engine-thread CPU "
          f"{1e3 * timers.cpu['step'] / max(tokens[1], 1):.2f} ms a generated token")
    print(f"   engine steps take {100 * total / seconds:.0f}% of the wall time; engine-thread CPU "
          f"{1e3 * timers.cpu['step'] / steps:.2f} ms a step")
    print("   part              ms/step(wall) share  ms/step(engine-thread CPU, share)")
    accounted = accounted_cpu = 0.0  # the parts do not nest in one another
    for part in PARTS:
        if part in timers.wall:
            wall = timers.wall[part]
            accounted += wall
            accounted_cpu += timers.cpu[part]
            print(f"   {part:<17} {1e3 * wall / steps:>8.2f}  {100 * wall / total:>4.0f}%   "
                  f"{1e3 * timers.cpu[part] / steps:.2f} ({100 * timers.cpu[part] / timers.cpu['step']:.0f}%)")
    other = timers.cpu["step"] - accounted_cpu
    print(f"   {'other':<17} {1e3 * (total - accounted) / steps:>8.2f}  {100 * (total - accounted) / total:>4.0f}%   "
          f"{1e3 * other / steps:.2f} ({100 * other / timers.cpu['step']:.0f}%)")
    if cpu:
        print("   thread CPU seconds: " + ", ".join(f"{k} {v:.2f} ({100 * v / seconds:.0f}% of a core)"
                                                    for k, v in sorted(cpu.items())))


def token_counts(engine, since: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    core = engine.core
    return core.num_prompt_tokens_total - since[0], core.num_generation_tokens_total - since[1]


def run_offline(num_prompts: int, max_tokens: int, model: str | None) -> None:
    from ownllm import LLM, SamplingParams
    from bench.serve_load import QUESTIONS

    llm = LLM(model) if model else LLM()
    timers = Timers()
    instrument(llm.engine, timers)
    prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.chat(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    for _ in range(2):
        timers.reset()
        before = token_counts(llm.engine)
        start = time.perf_counter()
        llm.chat(prompts, params)
        seconds = time.perf_counter() - start
        report(f"offline LLM.chat, {num_prompts} prompts", timers, seconds, None, token_counts(llm.engine, before))


def run_server(levels: list[int], max_tokens: int, requests_per_client: int, model: str | None) -> None:
    import uvicorn

    from ownllm.config import EngineConfig
    from ownllm.server.launch import ServeSpec, build_server
    from ownllm.server.serving import ServerSettings
    from bench.serve_load import free_port

    server = build_server(ServeSpec(EngineConfig(model=model), model or "smollm2-135m-instruct", ServerSettings()))
    timers = Timers()
    engine = server.engine
    ready = threading.Event()

    def install() -> None:  # on the engine thread, between steps
        instrument(engine.engine, timers)
        engine._deliver = timers.wrap("deliver", engine._deliver)
        ready.set()

    engine._send(install)
    ready.wait()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    names = {engine._thread.native_id: "engine", thread.native_id: "event-loop", threading.main_thread().native_id: "main"}
    client = [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--url", url, "--max-tokens", str(max_tokens),
              "--requests-per-client", str(requests_per_client), "--no-write", "--prefix-rules", "1"]
    for level in levels:
        timers.reset()
        before = thread_cpu(names)
        counted = token_counts(engine.engine)
        start = time.perf_counter()
        result = subprocess.run([*client, "--concurrency", str(level)], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - start
        after = thread_cpu(names)
        rows = [line for line in result.stdout.splitlines() if line.startswith("| server | ") and "clients" not in line]
        print(rows[0] if rows else result.stdout[-2000:] + result.stderr[-2000:])
        report(f"server, {level} clients (includes the client's warm-up and prefix probe)", timers, seconds,
               {k: after[k] - before.get(k, 0.0) for k in after}, token_counts(engine.engine, counted))
    uv.should_exit = True
    thread.join(timeout=10)
    server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--offline", type=int, help="run LLM.chat on this many prompts instead of a server")
    parser.add_argument("--model", help="default: the bundled model")
    args = parser.parse_args()
    if args.offline:
        run_offline(args.offline, args.max_tokens, args.model)
    else:
        run_server(args.concurrency, args.max_tokens, args.requests_per_client, args.model)


if __name__ == "__main__":
    main()
