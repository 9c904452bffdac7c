"""Generated arithmetic word problems in several families, each with its exact answer: no network, fixed seeds, and
two splits drawn from different seeds, "dev" (for tuning prompts and parameters; never a held-out question) and
"heldout" (for reporting, never tuned on). The same (family, split, index) is always the same problem."""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from ownllm.compute.extractors import normalize_number

SPLITS = ("dev", "heldout")
HELDOUT_SIZE = 500  # problems per family in the held-out split
PROMPT_SUFFIX = "\nWork it out step by step, then give the final answer as a number on the last line: 'Answer: N'."


@dataclass(frozen=True)
class Problem:
    family: str
    split: str
    index: int
    question: str
    answer: str  # normalized (extractors.normalize_number)

    @property
    def prompt(self) -> str:
        return self.question + PROMPT_SUFFIX

    def is_correct(self, answer: str | None) -> bool:
        return answer is not None and normalize_number(answer) == self.answer


def _chain(rng: random.Random) -> tuple[str, Fraction]:
    """2-4 operations on 2-3 digit numbers: receive, ship, multiply."""
    total = rng.randint(100, 999)
    steps = [f"A warehouse holds {total} boxes."]
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(("add", "sub", "mul") if total < 2000 else ("add", "sub"))
        if kind == "add":
            amount = rng.randint(10, 999)
            total += amount
            steps.append(f"A truck delivers {amount} more boxes.")
        elif kind == "sub" and total > 20:
            amount = rng.randint(10, min(total - 1, 999))
            total -= amount
            steps.append(f"Then {amount} boxes are shipped out.")
        else:
            factor = rng.randint(2, 4)
            total *= factor
            steps.append(f"Then the stock is multiplied by {factor} after a merger.")
    return " ".join(steps) + " How many boxes does the warehouse hold now?", Fraction(total)


def _percent(rng: random.Random) -> tuple[str, Fraction]:
    price, rate = 20 * rng.randint(2, 99), 5 * rng.randint(1, 18)
    if rng.random() < 0.5:
        return (f"A jacket costs ${price}. It is sold at {rate}% off. What is the sale price in dollars?",
                Fraction(price * (100 - rate), 100))
    return f"A town of {price * 10} people grows by {rate}%. How many people live there now?", \
        Fraction(price * 10 * (100 + rate), 100)


_UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
          ("kilograms", "grams", 1000), ("minutes", "seconds", 60)]


def _units(rng: random.Random) -> tuple[str, Fraction]:
    big, small, factor = rng.choice(_UNITS)
    whole, extra = rng.randint(2, 99), rng.randint(1, factor - 1)
    return (f"A measurement reads {whole} {big} and {extra} {small}. How many {small} is that in total?",
            Fraction(whole * factor + extra))


def _algebra(rng: random.Random) -> tuple[str, Fraction]:
    x, a, b = rng.randint(-20, 40), rng.randint(2, 12), rng.randint(1, 99)
    sign = rng.choice(("+", "-"))
    c = a * x + b if sign == "+" else a * x - b
    return f"Find x if {a}x {sign} {b} = {c}.", Fraction(x)


FAMILIES: dict[str, Callable[[random.Random], tuple[str, Fraction]]] = {
    "chain": _chain, "percent": _percent, "units": _units, "algebra": _algebra,
}


def problems(family: str, split: str = "heldout", count: int = HELDOUT_SIZE) -> list[Problem]:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be dev or heldout, got {split!r}")
    rng = random.Random(f"ownllm-tasks/{family}/{split}")
    held_out = {p.question for p in problems(family, "heldout")} if split == "dev" else set()
    result: list[Problem] = []
    while len(result) < count:
        question, value = FAMILIES[family](rng)
        if question not in held_out:  # dev never repeats a held-out problem
            result.append(Problem(family, split, len(result), question, normalize_number(str(value))))
    return result
