"""`ownllm plan`: from an `ownllm bench` report and latency targets, how many concurrent users one machine serves,
the tokens it then makes per day, their cost per million at an hourly price, and how many machines N users need.

The rule: of the measured concurrency levels, the largest whose TTFT and ITL at the chosen percentile (p99 unless
--percentile p50) both meet their targets. There is no interpolation between levels: the answer is a level that
was measured, so the machine's true capacity lies between it and the next level up (bench more levels, e.g.
--concurrency 1,2,4,8,16,32,64, for a finer answer). Tokens are output tokens, at that level's aggregate rate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

PERCENTILES = ("p50", "p99")
SECONDS_PER_DAY = 86_400
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*")


def parse_duration(text: str, option: str) -> float:
    """'2s' -> 2.0, '500ms' -> 0.5, '0.1' (seconds) -> 0.1; ValueError naming the option otherwise."""
    match = _DURATION.fullmatch(text)
    seconds = float(match[1]) / (1000 if match[2] == "ms" else 1) if match else 0.0
    if seconds <= 0:
        raise ValueError(f"{option} must be a positive duration like 2s, 500ms or 0.1 (seconds), got {text!r}")
    return seconds


def load_report(path: Path) -> dict:
    """The bench report at path; one-line errors for a missing file, bad JSON or a file of another kind."""
    if not path.is_file():
        raise FileNotFoundError(f"--from {path}: no such file (write one with `ownllm bench --json {path}`)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--from {path} is not valid JSON: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("levels"), list) or not report["levels"]:
        raise ValueError(f"--from {path} is not an `ownllm bench` report: it has no concurrency levels")
    return report


@dataclass(frozen=True)
class Level:
    concurrency: int
    tokens_per_s: float
    ttft_s: float  # at the plan's percentile
    itl_s: float


@dataclass(frozen=True)
class Plan:
    percentile: str
    ttft_target_s: float
    itl_target_s: float
    levels: tuple[Level, ...]
    price_per_hour: float | None = None
    users: int | None = None

    def meets(self, level: Level) -> bool:
        return level.ttft_s <= self.ttft_target_s and level.itl_s <= self.itl_target_s

    @property
    def chosen(self) -> Level | None:
        """The largest measured level within both targets; None when none is."""
        return max((lv for lv in self.levels if self.meets(lv)), key=lambda lv: lv.concurrency, default=None)

    @property
    def closest(self) -> Level:
        """The level nearest to both targets (the smallest of its worse target ratio)."""
        return min(self.levels, key=lambda lv: max(lv.ttft_s / self.ttft_target_s, lv.itl_s / self.itl_target_s))

    @property
    def tokens_per_day(self) -> float | None:
        return self.chosen.tokens_per_s * SECONDS_PER_DAY if self.chosen else None

    @property
    def cost_per_million_tokens(self) -> float | None:
        if self.chosen is None or self.price_per_hour is None:
            return None
        return self.price_per_hour / (self.chosen.tokens_per_s * 3600) * 1e6

    @property
    def replicas(self) -> int | None:
        if self.chosen is None or self.users is None:
            return None
        return math.ceil(self.users / self.chosen.concurrency)

    def as_json(self) -> dict:
        chosen = self.chosen
        return {
            "percentile": self.percentile, "ttft_target_s": self.ttft_target_s, "itl_target_s": self.itl_target_s,
            "meets_targets": chosen is not None,
            "users_per_machine": chosen.concurrency if chosen else 0,
            "chosen_level": asdict(chosen) if chosen else None, "closest_level": asdict(self.closest),
            "tokens_per_s": chosen.tokens_per_s if chosen else None, "tokens_per_day": self.tokens_per_day,
            "price_per_hour": self.price_per_hour, "cost_per_million_tokens": self.cost_per_million_tokens,
            "users": self.users, "replicas": self.replicas,
            "levels": [{**asdict(lv), "meets_targets": self.meets(lv)} for lv in self.levels],
        }


def make_plan(report: dict, ttft_target_s: float, itl_target_s: float, percentile: str = "p99",
              price_per_hour: float | None = None, users: int | None = None, source: str = "the report") -> Plan:
    if percentile not in PERCENTILES:
        raise ValueError(f"--percentile must be one of {', '.join(PERCENTILES)}, got {percentile!r}")
    if price_per_hour is not None and price_per_hour < 0:
        raise ValueError(f"--price-per-hour must be >= 0, got {price_per_hour}")
    if users is not None and users < 1:
        raise ValueError(f"--users must be at least 1, got {users}")
    levels = tuple(sorted((_level(row, i, percentile, source) for i, row in enumerate(report["levels"])),
                          key=lambda lv: lv.concurrency))
    return Plan(percentile, ttft_target_s, itl_target_s, levels, price_per_hour, users)


def _level(row, index: int, percentile: str, source: str) -> Level:
    keys = ("concurrency", "output_tokens_per_s", f"ttft_{percentile}_s", f"itl_{percentile}_s")
    values = [row.get(key) if isinstance(row, dict) else None for key in keys]
    for key, value in zip(keys, values):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{source}: level {index + 1} has no positive number {key!r}; is it an `ownllm bench` "
                             "report?")
    return Level(int(values[0]), float(values[1]), float(values[2]), float(values[3]))
