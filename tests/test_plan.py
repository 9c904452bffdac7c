"""`ownllm plan` on a bench report with round figures (tests/data/bench_sample.json): the arithmetic is checked
against numbers worked out by hand, written here as literals.

The sample's levels (output tokens/s; TTFT p50/p99; ITL p50/p99):
  1: 40 tok/s;  50ms / 80ms;  20ms / 30ms
  4: 120 tok/s; 300ms / 600ms; 30ms / 50ms
 16: 300 tok/s; 1.2s / 2.5s;  60ms / 90ms
 64: 480 tok/s; 3.0s / 6.0s;  120ms / 200ms
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ownllm.capacity.plan import load_report, make_plan, parse_duration
from tests.test_errors import assert_one_line_error, run_cli

SAMPLE = Path(__file__).parent / "data" / "bench_sample.json"


@pytest.fixture(scope="module")
def report() -> dict:
    return load_report(SAMPLE)


@pytest.mark.parametrize("text, seconds", [("2s", 2.0), ("500ms", 0.5), ("0.1", 0.1), (".5s", 0.5),
                                           ("100 ms", 0.1), ("1.5s", 1.5), ("3", 3.0)])
def test_durations(text, seconds):
    assert parse_duration(text, "--ttft") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["2x", "-1s", "0", "0ms", "", "ms", "1e3", "2 s s"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match=f"--ttft must be a positive duration like 2s, 500ms or 0.1 \\(seconds\\), "
                                         f"got '{text}'"):
        parse_duration(text, "--ttft")


def test_p99_within_2s_and_100ms(report):
    # 16 streams miss TTFT p99 (2.5s > 2s): the largest level within both targets is 4, at 120 tokens/s
    plan = make_plan(report, 2.0, 0.1, "p99", price_per_hour=0.50, users=100)
    assert plan.chosen.concurrency == 4
    assert plan.chosen.tokens_per_s == 120.0
    assert plan.tokens_per_day == 10_368_000  # 120 x 86,400
    assert plan.cost_per_million_tokens == pytest.approx(1.1574074074)  # $0.50 / (120 x 3,600 = 432,000 tokens)
    assert plan.replicas == 25  # ceil(100 / 4)


def test_p50_allows_more_streams(report):
    # at p50, 16 streams meet both (1.2s, 60ms); 64 miss TTFT (3.0s)
    plan = make_plan(report, 2.0, 0.1, "p50", price_per_hour=0.50, users=100)
    assert plan.chosen.concurrency == 16
    assert plan.tokens_per_day == 25_920_000  # 300 x 86,400
    assert plan.cost_per_million_tokens == pytest.approx(0.4629629630)  # $0.50 / 1,080,000 tokens
    assert plan.replicas == 7  # ceil(100 / 16) = ceil(6.25)


def test_itl_target_decides(report):
    # TTFT 10s lets every level through; ITL p99 <= 100ms stops 64 (200ms): 16 streams, 300 tokens/s
    plan = make_plan(report, 10.0, 0.1)
    assert plan.chosen.concurrency == 16
    assert plan.cost_per_million_tokens is None and plan.replicas is None
    assert make_plan(report, 10.0, 0.2).chosen.concurrency == 64  # a target met exactly counts as met
    assert make_plan(report, 10.0, 0.2, users=64).replicas == 1
    assert make_plan(report, 10.0, 0.2, users=65).replicas == 2


def test_no_level_meets(report):
    plan = make_plan(report, 0.01, 0.1)
    assert plan.chosen is None and plan.tokens_per_day is None and plan.replicas is None
    assert plan.closest.concurrency == 1  # 80ms is the lowest TTFT p99


def test_cli_table_and_json(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("plan", "--from", str(SAMPLE), "--ttft", "2s", "--itl", "100ms", "--price-per-hour", "0.50",
                     "--users", "100", "--json", str(out))
    assert result.returncode == 0, result.stderr
    for words in ("Within TTFT p99 <= 2.00s and ITL p99 <= 100ms", "concurrent users per machine", "10,368,000",
                  "$1.157", "machines for 100 users"):
        assert words in result.stdout, result.stdout
    written = json.loads(out.read_text())
    assert written["meets_targets"] is True
    assert (written["users_per_machine"], written["tokens_per_day"], written["replicas"]) == (4, 10_368_000, 25)
    assert written["cost_per_million_tokens"] == pytest.approx(1.1574074074)
    assert [lv["meets_targets"] for lv in written["levels"]] == [True, True, False, False]


def test_cli_json_to_stdout_with_bare_seconds():
    result = run_cli("plan", "--from", str(SAMPLE), "--ttft", "3", "--itl", "0.1", "--json", "-")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert (written["users_per_machine"], written["tokens_per_day"]) == (16, 25_920_000)


def test_cli_cannot_meet():
    result = run_cli("plan", "--from", str(SAMPLE), "--ttft", "10ms", "--itl", "100ms")
    assert result.returncode == 1
    assert ("This machine cannot meet TTFT p99 <= 10ms and ITL p99 <= 100ms at any measured concurrency "
            "(1, 4, 16, 64). The best it reaches: TTFT p99 80ms and ITL p99 30ms at 1 concurrent stream.") \
        in " ".join(result.stdout.split())


@pytest.mark.parametrize("content, words", [
    (None, "no such file"),
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2"),
    ('{"results": []}', "is not an `ownllm bench` report: it has no concurrency levels"),
    ('{"levels": [{"concurrency": 1}]}', "level 1 has no positive number 'output_tokens_per_s'"),
])
def test_bad_reports(tmp_path, content, words):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(words)):
        make_plan(load_report(path), 2.0, 0.1, source=f"--from {path}")


@pytest.mark.parametrize("options, words", [
    (dict(percentile="p90"), "--percentile must be one of p50, p99, got 'p90'"),
    (dict(users=0), "--users must be at least 1, got 0"),
    (dict(price_per_hour=-1.0), "--price-per-hour must be >= 0, got -1.0"),
])
def test_bad_options(report, options, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        make_plan(report, 2.0, 0.1, **options)


@pytest.mark.parametrize("args, words", [
    (("--from", "{folder}/missing.json"), "--from {folder}/missing.json: no such file"),
    (("--from", "{folder}/broken.json"), "--from {folder}/broken.json is not valid JSON"),
    (("--from", str(SAMPLE), "--itl", "soon"),
     "--itl must be a positive duration like 2s, 500ms or 0.1 (seconds), got 'soon'"),
    (("--from", str(SAMPLE), "--percentile", "p90"), "--percentile must be one of p50, p99, got 'p90'"),
])
def test_cli_one_line_errors(tmp_path, args, words):
    (tmp_path / "broken.json").write_text("{not json")
    args = [arg.format(folder=tmp_path) for arg in args]
    assert_one_line_error(run_cli("plan", *args), words.format(folder=tmp_path))
