"""`ownllm bench`: the report has every field, its figures are positive and agree with each other (aggregate tokens/s
is the tokens over the wall time recorded, no TTFT exceeds its request's latency...), and bad options are one-line
errors before any model loads. On a tiny random checkpoint in-process, and on the bundled model through the CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from ownllm.capacity.bench import BenchSettings, Progress, parse_concurrency, percentile, run_bench
from tests.checkpoints import build_checkpoint
from tests.test_errors import assert_one_line_error, run_cli

MACHINE_FIELDS = {"cpu", "cpu_flags", "physical_cores", "logical_cpus", "torch_threads", "memory_gib", "torch",
                  "python", "os", "device", "gpu"}
MODEL_FIELDS = {"name", "path", "architecture", "parameters", "quantization", "dtype"}
LEVEL_FIELDS = {"concurrency", "num_requests", "wall_s", "output_tokens", "prompt_tokens", "output_tokens_per_s",
                "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "requests"}


def check_report(report: dict, concurrency: list[int], prompt_tokens: int, new_tokens: int) -> None:
    assert MACHINE_FIELDS <= report["machine"].keys() and MODEL_FIELDS <= report["model"].keys()
    assert report["machine"]["physical_cores"] >= 1 and report["machine"]["torch_threads"] >= 1
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    settings = report["settings"]
    assert (settings["concurrency"], settings["prompt_tokens"], settings["new_tokens"]) == \
        (concurrency, prompt_tokens, new_tokens)
    assert report["load_s"] > 0
    single = report["batch1"]
    assert single["ttft_s"] > 0 and single["decode_s"] > 0
    assert single["prefill_tokens_per_s"] == pytest.approx(prompt_tokens / single["ttft_s"])
    assert single["decode_tokens_per_s"] == pytest.approx((new_tokens - 1) / single["decode_s"])
    assert [row["concurrency"] for row in report["levels"]] == concurrency
    for row in report["levels"]:
        assert row.keys() == LEVEL_FIELDS
        c = row["concurrency"]
        assert row["num_requests"] == len(row["requests"]) == c
        assert row["output_tokens"] == sum(r["output_tokens"] for r in row["requests"]) == c * new_tokens
        assert row["prompt_tokens"] == c * prompt_tokens
        assert row["output_tokens_per_s"] == pytest.approx(row["output_tokens"] / row["wall_s"])
        for r in row["requests"]:
            assert 0 < r["ttft_s"] < r["latency_s"] <= row["wall_s"] + 1e-9
        ttfts = [r["ttft_s"] for r in row["requests"]]
        assert min(ttfts) <= row["ttft_p50_s"] <= row["ttft_p99_s"] <= max(ttfts)
        assert 0 < row["itl_p50_s"] <= row["itl_p99_s"] <= max(r["latency_s"] for r in row["requests"])


def test_percentile_interpolates_between_ranks():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([4.0, 1.0, 2.0, 3.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == 99.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=64)
    return folder


def test_tiny_model_report(tiny):
    phases, advanced = [], []
    settings = BenchSettings((1, 3), prompt_tokens=8, new_tokens=4)
    report = run_bench(str(tiny), None, None, settings, Progress(phases.append, lambda: advanced.append(1)))
    check_report(report, [1, 3], 8, 4)
    assert report["model"]["name"] == str(tiny) and report["model"]["architecture"] == "LlamaForCausalLM"
    assert phases == ["loading the model", "warm-up", "batch 1", "1 concurrent", "3 concurrent"]
    assert len(advanced) == settings.num_requests == 1 + 3 + 1 + 3
    json.dumps(report)  # plain JSON all through


def test_prompt_and_answer_must_fit_the_context(tiny):
    with pytest.raises(ValueError, match="--prompt-tokens 60 \\+ --new-tokens 8 do not fit the model's context of "
                                         "64 tokens"):
        run_bench(str(tiny), None, None, BenchSettings((1,), 60, 8), Progress())


@pytest.mark.parametrize("make, words", [
    (lambda: parse_concurrency("1,x"), "--concurrency must be comma-separated whole numbers like 1,4,16,64, got '1,x'"),
    (lambda: parse_concurrency(","), "--concurrency must be comma-separated whole numbers like 1,4,16,64, got ','"),
    (lambda: BenchSettings((0, 4)), "--concurrency needs levels of at least 1, got 0,4"),
    (lambda: BenchSettings(prompt_tokens=0), "--prompt-tokens must be at least 1, got 0"),
    (lambda: BenchSettings(new_tokens=1),
     "--new-tokens must be at least 2 (decode speed and ITL need a second token), got 1"),
])
def test_bad_settings(make, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        make()


def test_concurrency_sorted_without_repeats():
    assert parse_concurrency("16, 1,4,4") == (1, 4, 16)


@pytest.mark.parametrize("options, words", [
    (("--concurrency", "1,x"), "--concurrency must be comma-separated whole numbers like 1,4,16,64, got '1,x'"),
    (("--new-tokens", "1"), "--new-tokens must be at least 2"),
    (("--json", "/no/such/folder/bench.json"), "--json /no/such/folder/bench.json: the folder /no/such/folder does "
                                               "not exist"),
])
def test_bad_options_before_the_model_loads(tmp_path, options, words):
    assert_one_line_error(run_cli("bench", "--model", str(tmp_path / "no-such-model"), *options), words)


def test_plot_without_matplotlib(tmp_path):
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    path = os.pathsep.join(filter(None, [str(blocked.parent), os.environ.get("PYTHONPATH")]))
    result = run_cli("bench", "--model", str(tmp_path / "no-such-model"), "--plot", str(tmp_path / "b.png"),
                     env={"PYTHONPATH": path})
    assert_one_line_error(result, "the plot needs matplotlib: pip install 'ownllm[plot]'")


@pytest.mark.slow
def test_bundled_model_through_the_cli(tmp_path):
    pytest.importorskip("matplotlib")
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_cli("bench", "--concurrency", "1,2", "--prompt-tokens", "16", "--new-tokens", "8",
                     "--json", str(report_path), "--plot", str(plot_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    check_report(report, [1, 2], 16, 8)
    assert (report["model"]["name"], report["model"]["quantization"]) == ("smollm2-135m-instruct", "Q4_1")
    assert "concurrent streams" in result.stdout and "TTFT p99" in result.stdout
    assert plot_path.read_bytes().startswith(b"\x89PNG")
    planned = run_cli("plan", "--from", str(report_path), "--ttft", "1000s", "--itl", "1000s", "--json", "-")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["users_per_machine"] == 2
