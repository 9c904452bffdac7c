"""Two ownllm trees' servers under the same streaming load, alternating round by round (a change's before / after).

    git archive main | tar -x -C /tmp/before
    python bench/serve_ab.py --trees before=/tmp/before,after=. --concurrency 1,16,64 --max-tokens 64 --rounds 2

Each round starts each tree's `ownllm serve` in turn (its own directory first on the path, so that tree's ownllm is
the one that runs), sends one warm-up request, then measures every concurrency level with bench/serve_load.py's
clients (streaming greedy chat, EOS ignored, one request per client, timings at the client) and stops it. The table
gives each round's aggregate output tok/s, and TTFT and ITL percentiles over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", required=True, help="name=path,name=path: the ownllm checkouts to compare")
    parser.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", type=Path, help="default: the bundled model")
    args = parser.parse_args()
    trees = [(name, str(Path(path).resolve())) for name, path in (t.split("=", 1) for t in args.trees.split(","))]
    if args.model is None:
        from ownllm.loader.resolve import bundled_model_path

        args.model = bundled_model_path()
    results = {name: {c: [] for c in args.concurrency} for name, _ in trees}
    for round_ in range(args.rounds):
        for name, tree in trees:
            os.chdir(tree)  # `python -m ownllm` imports from the working directory first
            os.environ["PYTHONPATH"] = tree
            with serve_load.launched("ownllm", args.model, args.threads) as url:
                asyncio.run(serve_load.run_level(url, 1, 1, 2))  # warm-up
                for c in args.concurrency:
                    level = asyncio.run(serve_load.run_level(url, c, 1, args.max_tokens))
                    results[name][c].append(level)
                    print(f"round {round_} {name:>8} {c:>3} clients: {level.tokens_per_s:7.1f} tok/s, TTFT p50 "
                          f"{level.ttft(0.5):.3f} s, ITL p50 {1e3 * level.itl(0.5):.1f} ms, load average "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
    print("| server | clients | output tok/s (each round) | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for name, _ in trees:
        for c in args.concurrency:
            levels = results[name][c]
            requests = [r for level in levels for r in level.results]
            ttfts = [r.ttft for r in requests]
            itls = [x for r in requests for x in r.itls]
            pct = serve_load.percentile
            print(f"| {name} | {c} | {' / '.join(f'{level.tokens_per_s:.1f}' for level in levels)} | "
                  f"{pct(ttfts, 0.5):.3f} / {pct(ttfts, 0.99):.3f} | {1e3 * pct(itls, 0.5):.1f} / "
                  f"{1e3 * pct(itls, 0.99):.1f} |")


if __name__ == "__main__":
    main()
