"""Writes the two local datasets of the lm-evaluation-harness tasks beside this file, from a fixed seed:

    python bench/lm_eval_tasks/make_data.py

- arithmetic_mc.jsonl: "What is a + b?" with four numeric choices, one right (multiple choice, scored by the
  loglikelihood of each choice after lm-eval's " " delimiter);
- sequence_gen.jsonl: "Continue the sequence: 12, 15, 18, 21," answered by greedy generation up to a comma or a
  newline (exact match).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUM_ITEMS = 100


def arithmetic_mc(rng: random.Random) -> list[dict]:
    items = []
    for _ in range(NUM_ITEMS):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        right = a + b
        wrong = rng.sample([n for n in range(max(2, right - 6), right + 7) if n != right], 3)
        choices = [right, *wrong]
        rng.shuffle(choices)
        items.append({"question": f"Question: What is {a} + {b}?\nAnswer:", "choices": [str(c) for c in choices],
                      "answer": choices.index(right)})
    return items


def sequence_gen(rng: random.Random) -> list[dict]:
    items = []
    for _ in range(NUM_ITEMS):
        start, step = rng.randint(1, 50), rng.randint(1, 5)
        terms = [start + step * i for i in range(5)]
        shown = ", ".join(map(str, terms[:4]))
        items.append({"question": f"Continue the sequence: {shown},", "answer": str(terms[4])})
    return items


def main() -> None:
    rng = random.Random(2026)
    for name, items in (("arithmetic_mc", arithmetic_mc(rng)), ("sequence_gen", sequence_gen(rng))):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))


if __name__ == "__main__":
    main()
