"""Start-up: the time from a fresh Python process to a model ready to generate, ownllm next to llama.cpp, the
same GGUF file, the two taking turns run by run (so drift on a shared machine hits both alike).

    python bench/startup.py [--model PATH] [--rounds 5] [--threads 2]

Each run is a new process that imports its tool and loads the model (imports count: a user pays them too),
then reports the seconds since it started; the file's pages are warm after the first round. Prints the
medians and ownllm's ratio (its time over llama.cpp's: <= 1.0 is as fast or faster) and writes the "Start-up"
section of bench/RESULTS.md. Default model: the bundled SmolLM2-135M-Instruct Q4_1.

Then the load alone: one more process imports both tools and loads the model with each in turn, `--rounds`
times after a first load each (not counted), timing only `LLM(model)` and `Llama(...)`: what is left of the
start-up once `import torch` (most of a fresh ownllm process) is paid.

The processes may cache bytecode (PYTHONDONTWRITEBYTECODE is dropped for them): an installed package has its
.pyc files, as llama_cpp and torch here do, while a source checkout run with that variable set compiles all of
ownllm on every start (~0.1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bundled_decode import write_section  # noqa: E402

LOADERS = {
    "ownllm": "from ownllm import LLM; LLM({model!r})",
    "llama.cpp": "from llama_cpp import Llama; Llama(model_path={model!r}, n_ctx=2048, n_threads={threads}, verbose=False)",
}
TIMED = "import time; started = time.perf_counter(); {load}; print(time.perf_counter() - started)"
# the load alone: both tools imported first, then each loads in turn (round 0 not counted); one JSON line
IN_PROCESS = """import gc, json, time
from ownllm import LLM
from llama_cpp import Llama
import ownllm.engine.build, ownllm.loader.gguf, ownllm.worker.model_runner
loads = {{{loads}}}
times = {{tool: [] for tool in loads}}
for round_ in range({rounds} + 1):
    for tool, load in loads.items():
        started = time.perf_counter()
        model = load()
        if round_:
            times[tool].append(time.perf_counter() - started)
        del model
        gc.collect()
print(json.dumps(times))
"""


def child_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def load_seconds(tool: str, model: str, threads: int) -> float:
    code = TIMED.format(load=LOADERS[tool].format(model=model, threads=threads))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=child_env()).stdout
    return float(out.strip().splitlines()[-1])


def in_process_seconds(model: str, threads: int, rounds: int) -> dict[str, list[float]]:
    """{tool: seconds of each counted load} from one process that has imported both tools."""
    loads = ", ".join(f"{tool!r}: lambda: {LOADERS[tool].format(model=model, threads=threads).split('; ')[-1]}"
                      for tool in LOADERS)
    code = IN_PROCESS.format(loads=loads, rounds=rounds)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=child_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(times: dict[str, list[float]]) -> tuple[str, float]:
    """The markdown table of medians and runs, and ownllm's ratio to llama.cpp."""
    median = {tool: statistics.median(values) for tool, values in times.items()}
    rows = [f"| {tool} | {median[tool]:.2f} | {', '.join(f'{t:.2f}' for t in times[tool])} |" for tool in times]
    return "\n".join(["| tool | median s | runs |", "|---|---|---|", *rows]), median["ownllm"] / median["llama.cpp"]


def main() -> None:
    from ownllm.loader.resolve import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF file (default: the bundled model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    model = str(resolve_model(args.model))
    times: dict[str, list[float]] = {tool: [] for tool in LOADERS}
    for round_ in range(args.rounds + 1):  # round 0 warms the page cache, the kernel cache and the bytecode caches
        for tool in LOADERS:
            seconds = load_seconds(tool, model, args.threads)
            if round_:
                times[tool].append(seconds)
            print(f"round {round_} {tool}: {seconds:.2f} s", flush=True)
    fresh, ratio = table(times)
    loaded, load_ratio = table(in_process_seconds(model, args.threads, args.rounds))
    body = (f"`python bench/startup.py --rounds {args.rounds}` on {Path(model).name}, {platform.processor() or platform.machine()}, "
            f"{args.threads} threads: from a fresh process (imports included) to a loaded model.\n\n{fresh}\n\n"
            f"ownllm / llama.cpp: **{ratio:.2f}x** the time (<= 1.0 is the floor).\n\n"
            f"The load alone, in one process that has imported both (`LLM(model)` / `Llama(...)`, taking turns):\n\n"
            f"{loaded}\n\nownllm / llama.cpp: **{load_ratio:.2f}x** the time.")
    print(body)
    if not args.no_write:
        write_section("Start-up", body)


if __name__ == "__main__":
    main()
