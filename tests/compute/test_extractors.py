"""Answer extractors on tricky strings: numbers written many ways, nested boxes, choices among distractors,
JSON fields, regex groups, and the refusals that name compute.answer."""

from __future__ import annotations

import pytest

from ownllm.compute.extractors import make_extractor, normalize_number


@pytest.mark.parametrize("text, expected", [
    ("The total is 1,000 apples.", "1000"),
    ("so 1000.0", "1000"),
    ("It costs $1,234.50 in all", "1234.5"),
    ("First 12, then 7, finally 42.", "42"),
    ("x = -4", "-4"),
    ("pages 3-4", "4"),  # a hyphen, not a minus sign
    ("about .5 of it", "0.5"),
    ("3/4 of the cake", "0.75"),
    ("1/3 of the cake", "1/3"),
    ("a rise of 12%", "12"),
    ("-0.0", "0"),
    ("abc123 has no free-standing number", None),
    ("no digits here", None),
    ("1,2,3", "3"),
])
def test_number_takes_the_last_number_normalized(text, expected):
    assert make_extractor("number")(text) == expected


def test_normalize_number_makes_equal_numbers_equal():
    assert {normalize_number(s) for s in ("1,000", "1000", "1000.0", "$1000", "1e3", "1000.000")} == {"1000"}
    assert normalize_number("seven") is None


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}", "42"),
    (r"\boxed{1} wait, no: \boxed{ 1,000.0 }", "1000"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{$x+1$}", "x+1"),
    (r"\boxed{Paris}.", "paris"),
    (r"\boxed{unclosed", None),
    ("no box", None),
])
def test_boxed(text, expected):
    assert make_extractor("boxed")(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("A train leaves at noon. The answer is (C).", "C"),
    ("Answer: B", "B"),
    ("the answer is **D**", "D"),
    ("The answer is Apple pie, which is (E)", "E"),  # 'A' of Apple is not a choice
    ("Between (A) and (B), I pick (B)", "B"),
    ("Thinking...\nA", "A"),
    ("Thinking...\nD) 42", "D"),
    ("A cat sat.", None),
    ("The answer is a number", None),
])
def test_choice(text, expected):
    assert make_extractor("choice")(text) == expected


def test_json_field():
    extract = make_extractor("json:answer")
    assert extract('{"reasoning": "5+5", "answer": 10.0}') == "10"
    assert extract('Here: {"answer": "Yes."} and {"answer": "No"}') == "no"  # the last object
    assert extract('{"answer": true}') == "true"
    assert extract('{"other": 1}') is None and extract("not json") is None
    assert make_extractor("json:result.value")('{"result": {"value": "1,500"}}') == "1500"


def test_regex_takes_the_first_group_of_the_last_match():
    extract = make_extractor(r"regex:Answer: (\w+)")
    assert extract("Answer: cat ... Answer: dog") == "dog"
    assert extract("nothing") is None
    assert make_extractor(r"regex:\d+")("a 1 b 22") == "22"


def test_text_normalizes_case_space_quotes_and_full_stop():
    extract = make_extractor("text")
    assert extract('  "Paris   is\n the capital."  ') == extract("paris is the capital") == "paris is the capital"
    assert extract("  ") is None


@pytest.mark.parametrize("name, message", [
    ("numbers", "compute.answer must be number, boxed, choice, json:FIELD, regex:PATTERN or text, got 'numbers'"),
    ("json:", "compute.answer must be number, boxed, choice, json:FIELD, regex:PATTERN or text, got 'json:'"),
    ("regex:(", "compute.answer has an invalid regex '(': missing ), unterminated subpattern at position 0"),
])
def test_unknown_extractor_is_refused_by_name(name, message):
    with pytest.raises(ValueError) as error:
        make_extractor(name)
    assert str(error.value) == message
