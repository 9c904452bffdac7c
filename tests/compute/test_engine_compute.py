"""Compute requests on the real engine control plane with a scripted fake runner (no model, no torch): N samples
share the prompt's KV blocks (held once, ref count N; one prefill), early stop aborts the running samples at once
and frees their blocks, and the verifier scores samples by its scripted probability of "yes"."""

from __future__ import annotations

import math

import pytest
from tokenizers import Tokenizer as HFTokenizer

from ownllm.compute import ComputeParams
from ownllm.compute.offline import generate_with_compute
from ownllm.config import SchedulerConfig
from ownllm.distributed.executor import UniprocExecutor
from ownllm.engine.core import EngineCore
from ownllm.engine.engine import Engine
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.outputs import RunnerOutput, SampleLogprobs, SchedulerOutput
from ownllm.sampling_params import SamplingParams
from ownllm.tokenizer import Tokenizer
from tests.checkpoints import save_tiny_tokenizer

EOS = 2
PROMPT = list(range(10, 20))  # 10 tokens: two full blocks of 4, and 2 more


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(folder)
    backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    backend.add_tokens(["yes", "no"])  # one token each, for the verifier's answer
    backend.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_dir(folder)


class ScriptedRunner:
    """Sample i of a request ("id#i") says scripts[i] token by token with logprob -1 each, then EOS; a verifier
    request ("...-verify-P-I#0") says yes with probability verdicts[I]."""

    def __init__(self, scripts: list[list[int]], verdicts: list[float] | None = None, yes_no=(0, 0)) -> None:
        self.scripts, self.verdicts, self.yes_no = scripts, verdicts or [], yes_no
        self.known: dict[str, tuple[int, int]] = {}  # request id -> (num prompt tokens, num tokens)
        self.computed: dict[str, int] = {}
        self.outputs: list[SchedulerOutput] = []

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self.outputs.append(so)
        for new in so.new_requests:
            self.known[new.request_id] = (len(new.prompt_token_ids), len(new.prompt_token_ids) + len(new.output_token_ids))
            self.computed[new.request_id] = new.num_computed_tokens
        for cached in so.cached_requests:
            self.computed[cached.request_id] = cached.num_computed_tokens
        out = RunnerOutput(request_ids=so.request_ids)
        for request_id, num_new in so.num_scheduled_tokens.items():
            num_prompt, num_tokens = self.known[request_id]
            sampled, logprobs = [], []
            if self.computed[request_id] + num_new >= num_tokens:
                token, logprob = self._next(request_id, num_tokens - num_prompt)
                sampled, logprobs = [token], [logprob]
                self.known[request_id] = (num_prompt, num_tokens + 1)
            out.sampled_token_ids.append(sampled)
            out.logprobs.append(logprobs)
            out.num_accepted_draft_tokens.append(0)
        return out

    def _next(self, request_id: str, num_output: int) -> tuple[int, SampleLogprobs]:
        parent, _, _ = request_id.rpartition("#")
        if "-verify-" in parent:
            p_yes = self.verdicts[int(parent.rpartition("-")[2])]
            yes, no = self.yes_no
            return yes, SampleLogprobs(math.log(p_yes), 1, [(yes, math.log(p_yes)), (no, math.log(1 - p_yes))])
        script = self.scripts[int(request_id.rpartition("#")[2])]
        return (script[num_output] if num_output < len(script) else EOS), SampleLogprobs(-1.0, 0)

    def sampled(self, child_id: str) -> int:
        return sum(so.num_scheduled_tokens.get(child_id, 0) > 0 for so in self.outputs)


def make_engine(tokenizer, runner, num_blocks=64) -> Engine:
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16)
    core = EngineCore(UniprocExecutor(runner), KVCacheManager(num_blocks, 4), tokenizer, 200, config, eos_token_ids=[EOS])
    return Engine(core, tokenizer)


def scripts_of(tokenizer, texts: list[str], spacing: int = 3) -> list[list[int]]:
    """Each text's tokens after 4 + i * spacing space tokens, so sample i finishes `spacing` steps after sample i-1."""
    space = tokenizer.encode(" ", add_special_tokens=False)[0]
    return [[space] * (4 + i * spacing) + tokenizer.encode(text, add_special_tokens=False) for i, text in enumerate(texts)]


def no_verifier(p: int, answer: str) -> list[int]:
    raise AssertionError("no verifier was asked for")


def test_samples_share_the_prompt_blocks_and_one_prefill(tokenizer):
    runner = ScriptedRunner(scripts_of(tokenizer, ["1"] * 4, spacing=4))
    engine = make_engine(tokenizer, runner)
    engine.add_request("r", PROMPT, SamplingParams(n=4, max_tokens=50))
    engine.step()  # sample 0 computes the prompt
    engine.step()  # then the other three are admitted on its cached blocks
    kv = engine.core.kv_cache
    tables = [kv.block_ids(f"r#{i}") for i in range(4)]
    assert len({tuple(t[:2]) for t in tables}) == 1  # the two full prompt blocks: the same blocks for all
    assert [kv.pool.blocks[b].ref_cnt for b in tables[0][:2]] == [4, 4]
    assert len({t[2] for t in tables}) == 4  # each sample's own last block
    assert engine.core.num_prompt_tokens_total == 10 + 3 * 2  # one prefill; the forks compute only the tail
    while engine.has_unfinished():
        engine.step()
    assert kv.num_free_blocks == kv.num_blocks


def test_early_stop_aborts_the_running_samples_and_frees_their_blocks(tokenizer):
    runner = ScriptedRunner(scripts_of(tokenizer, ["so 42", "= 42", "7", "42.0", "42", "it is 8"]))
    engine = make_engine(tokenizer, runner)
    compute = ComputeParams("vote", 6, "number", early_stop=True)
    [result] = generate_with_compute(engine, [(None, PROMPT)], SamplingParams(max_tokens=50), compute,
                                     no_verifier, "c")
    summary = result.compute
    # waves: 4 of 6 start; after 42, 42, 7 (2 vs 1, 3 to come: 2 must be in flight) the fifth starts; after 42.0
    # and its 42 (4 vs 1, 1 to come) the vote is decided and the sixth, never started, is stopped
    assert (summary.answer, summary.samples_run, summary.samples_saved) == ("42", 5, 1)
    assert [(a.answer, a.count) for a in summary.answers] == [("42", 4), ("7", 1)]
    steps = {i: [k for k, so in enumerate(runner.outputs) if f"c-0#{i}" in so.num_scheduled_tokens] for i in range(6)}
    assert min(steps[4]) > max(steps[2]) and min(steps[4]) < max(steps[3])  # started when sample 2 finished
    assert not steps[5] and runner.sampled("c-0#5") == 0  # never scheduled: its tokens are all saved
    assert summary.completion_tokens == sum(runner.sampled(f"c-0#{i}") for i in range(6))  # one token a step
    assert result.outputs[0].finish_reason == "stop" and "42" in result.outputs[0].text
    assert not engine.has_unfinished()
    assert engine.core.kv_cache.num_free_blocks == engine.core.kv_cache.num_blocks


def test_held_samples_start_on_the_cached_prompt_blocks_and_stop_without_running(tokenizer):
    runner = ScriptedRunner(scripts_of(tokenizer, ["1"] * 4, spacing=4))
    engine = make_engine(tokenizer, runner)
    engine.add_request("r", PROMPT, SamplingParams(n=4, n_started=2, max_tokens=50))
    for _ in range(3):
        engine.step()
    kv = engine.core.kv_cache
    assert set(engine.core.requests) == {"r#0", "r#1"}  # the other two wait for start_samples
    engine.start_samples("r", 1)
    engine.step()
    assert set(engine.core.requests) == {"r#0", "r#1", "r#2"}
    tables = [kv.block_ids(f"r#{i}") for i in range(3)]
    assert len({tuple(t[:2]) for t in tables}) == 1 and [kv.pool.blocks[b].ref_cnt for b in tables[0][:2]] == [3, 3]
    assert engine.core.num_prompt_tokens_total == 10 + 2 * 2  # the late sample computed only the prompt's tail
    engine.stop_samples("r", [3])
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [o.finish_reason for o in outputs[-1].outputs] == ["stop", "stop", "stop", "abort"]
    assert runner.sampled("r#3") == 0 and kv.num_free_blocks == kv.num_blocks


def test_without_early_stop_every_sample_runs(tokenizer):
    runner = ScriptedRunner(scripts_of(tokenizer, ["42", "42", "42", "7"]))
    [result] = generate_with_compute(make_engine(tokenizer, runner), [(None, PROMPT)], SamplingParams(max_tokens=50),
                                     ComputeParams("vote", 4, "number"), no_verifier, "c")
    assert (result.compute.samples_run, result.compute.samples_saved, result.compute.agreement) == (4, 0, 0.75)


def test_best_of_verifier_picks_the_sample_the_verifier_believes(tokenizer):
    yes_no = (tokenizer.encode("yes", add_special_tokens=False)[0], tokenizer.encode("no", add_special_tokens=False)[0])
    runner = ScriptedRunner(scripts_of(tokenizer, ["1", "2", "3"]), verdicts=[0.3, 0.8, 0.6], yes_no=yes_no)
    prompts_seen = []

    def verifier_prompt(p: int, answer: str) -> list[int]:
        prompts_seen.append(answer.strip())
        return PROMPT + tokenizer.encode(answer, add_special_tokens=False)

    [result] = generate_with_compute(make_engine(tokenizer, runner), [(None, PROMPT)], SamplingParams(max_tokens=50),
                                     ComputeParams("best_of", 3, "number", scorer="verifier"), verifier_prompt, "c")
    assert sorted(prompts_seen) == ["1", "2", "3"]
    assert (result.compute.answer, result.compute.chosen_index) == ("2", 1)
    assert math.isclose(result.compute.score, 0.8)
