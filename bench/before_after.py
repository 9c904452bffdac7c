"""Batch-1 decode of two checkouts of ownllm on the same model, each in its own process, taking turns run by run.

    python bench/before_after.py OLD_CHECKOUT [--model PATH] [--prompt-tokens 128] [--new-tokens 128] [--rounds 4]

A change to the engine is checked for speed by running the checkout before it (e.g. a `git worktree` at the
parent commit) and this one alternately, so bandwidth drift hits both alike. Each run loads the model, warms up,
and times greedy decode after a prompt of random ids; the median of the rounds is printed with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, random, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from ownllm import LLM, SamplingParams
llm = LLM(sys.argv[1] or None, enable_prefix_caching=False)
prompt_tokens, new = int(sys.argv[2]), int(sys.argv[3])
params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
rng = random.Random(0)
speeds = []
for _ in range(3):  # the first warms up
    prompt = [rng.randrange(100, llm.config.vocab_size - 100) for _ in range(prompt_tokens)]
    first = None
    for _ in llm.stream_token_ids({"prompt_token_ids": prompt}, params):
        first = first or time.perf_counter()
    speeds.append((len(llm.last_output.token_ids) - 1) / (time.perf_counter() - first))
print(json.dumps(max(speeds[1:])))
"""


def run(checkout: Path, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", WORKER, args.model or "", str(args.prompt_tokens), str(args.new_tokens),
                          str(args.threads)], env=env, capture_output=True, text=True, check=True, cwd=checkout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the checkout to compare against")
    parser.add_argument("--model", help="default: the bundled model")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, checkout in (("before", args.old.resolve()), ("after", ROOT)):
            results[name].append(run(checkout, args))
        print({name: [round(s, 1) for s in speeds] for name, speeds in results.items()}, flush=True)
    before, after = (statistics.median(results[n]) for n in ("before", "after"))
    print(f"decode tok/s before {before:.1f}, after {after:.1f}: {after / before:.2f}x")


if __name__ == "__main__":
    main()
