"""Answer extractors: a sample's text -> its final answer as a normalized string (None when it has none), so that
equal answers written differently (1,000 / 1000 / 1000.0) vote together. Named by the `compute.answer` field:
number, boxed, choice, json:FIELD, regex:PATTERN, text. Pure string work; never sees the engine."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Callable

Extractor = Callable[[str], "str | None"]
EXTRACTOR_NAMES = "number, boxed, choice, json:FIELD, regex:PATTERN or text"

# a number not glued to a word: -1,234.5 / 1000 / .5 / 3/4 (a minus sign only where it cannot be a hyphen)
_NUMBER = re.compile(
    r"(?<![\w./])(-)?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?(?:/(\d+)(?![\d.]))?|(?<![\w.])(-)?(\.\d+)")
_CHOICE_STATED = re.compile(r"(?:[Aa]nswer|ANSWER)(?:\s+is)?\s*[:\-]?\s*(?:\*\*)?\(?([A-E])\)?(?![A-Za-z])")
_CHOICE_BRACKETED = re.compile(r"\(([A-E])\)")
_CHOICE_LINE = re.compile(r"^[\W_]*([A-E])(?:[).:]|[\W_]*$)")


def normalize_number(text: str) -> str | None:
    """'1,000' / '1000.0' / '$1000' / '1e3' -> '1000'; '-0.50' -> '-0.5'; '3/4' -> '0.75'; None if not a number."""
    text = text.strip().lstrip("$").rstrip("%").replace(",", "").strip()
    try:
        if "/" in text:
            return _normalize_fraction(Fraction(text))
        value = Decimal(text)
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _normalize_fraction(value: Fraction) -> str:
    """A fraction with a finite decimal form as that decimal ('3/4' -> '0.75'), else reduced ('2/6' -> '1/3')."""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    return normalize_number(str(Decimal(value.numerator) / Decimal(value.denominator)))


def normalize_text(text: str) -> str | None:
    """Case, spacing, surrounding quotes or emphasis and a final full stop do not change an answer."""
    text = " ".join(text.split()).strip("*_`\"' ").rstrip(".").strip().lower()
    return text or None


def number(text: str) -> str | None:
    """The last number in the text."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, whole, decimals, denominator, small_sign, small = matches[-1].groups()
    if small is not None:
        return normalize_number((small_sign or "") + "0" + small)
    written = (sign or "") + whole + (decimals or "") + (f"/{denominator}" if denominator else "")
    return normalize_number(written)


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces may nest); a number in it is normalized as one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            content = text[begin:i].strip().strip("$").strip()
            return normalize_number(content) or normalize_text(content)
    return None


def choice(text: str) -> str | None:
    """A letter A-E: the last one stated as the answer ("the answer is (B)"), else the last bracketed "(C)",
    else the last line that is only a letter ("D", "**D**", "D) ...")."""
    for pattern in (_CHOICE_STATED, _CHOICE_BRACKETED):
        matches = pattern.findall(text)
        if matches:
            return matches[-1]
    for line in reversed(text.strip().splitlines()):
        match = _CHOICE_LINE.match(line.strip())
        if match:
            return match.group(1)
    return None


def json_field(path: str) -> Extractor:
    """The field (dotted path) of the whole text as a JSON object, else of the last object in the text."""
    keys = path.split(".")

    def extract(text: str) -> str | None:
        for value in _json_objects(text):
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                return _normalize_value(value)
        return None

    return extract


def _json_objects(text: str) -> list[Any]:
    """The whole text as JSON if it is; else every object found in it, the last first."""
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        pass
    decoder, found = json.JSONDecoder(), []
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            found.append(decoder.raw_decode(text, start)[0])
        except json.JSONDecodeError:
            continue
    return found[::-1]


def _normalize_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return normalize_number(repr(value))
    if isinstance(value, str):
        return normalize_number(value) or normalize_text(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def regex(pattern: str) -> Extractor:
    """The first group (else the whole match) of the pattern's last match, stripped."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"compute.answer has an invalid regex {pattern!r}: {error}") from None

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        found = matches[-1].group(1) if compiled.groups else matches[-1].group(0)
        return (found or "").strip() or None

    return extract


def text(answer: str) -> str | None:
    """The whole answer, normalized."""
    return normalize_text(answer)


_PLAIN = {"number": number, "boxed": boxed, "choice": choice, "text": text}


def make_extractor(name: str) -> Extractor:
    if not isinstance(name, str):
        raise ValueError(f"compute.answer must be {EXTRACTOR_NAMES}, got {name!r}")
    kind, colon, argument = name.partition(":")
    if kind in _PLAIN and not colon:
        return _PLAIN[kind]
    if kind == "json" and argument:
        return json_field(argument)
    if kind == "regex" and argument:
        return regex(argument)
    raise ValueError(f"compute.answer must be {EXTRACTOR_NAMES}, got {name!r}")
