"""Engine: prompts and SamplingParams in, RequestOutputs out, one step at a time.

It fans a request with n samples out into n engine Requests, drives the EngineCore, folds sampled
tokens into text through the OutputProcessor and reports, after each step, a cumulative
RequestOutput for every request that progressed. The offline LLM and the AsyncEngine both sit on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ownllm.config import SchedulerConfig
from ownllm.engine.core import EngineCore, Runner
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.engine.output_processor import OutputProcessor
from ownllm.outputs import RequestOutput
from ownllm.request import FinishReason, Request
from ownllm.sampling_params import SamplingParams
from ownllm.tokenizer import Tokenizer


@dataclass
class _Parent:
    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]
    forks: list[Request]  # samples not yet admitted


class Engine:
    def __init__(self, runner: Runner, kv_cache: KVCacheManager, tokenizer: Tokenizer, max_model_len: int,
                 scheduler_config: SchedulerConfig | None = None) -> None:
        self.core = EngineCore(runner, kv_cache, tokenizer.eos_token_ids, max_model_len, scheduler_config)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.output_processor = OutputProcessor(tokenizer)
        self._parents: dict[str, _Parent] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
        priority: int = 0,
    ) -> None:
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        children = [
            Request(f"{request_id}#{i}", list(prompt_token_ids), params.for_sample(i), prompt=prompt, priority=priority)
            for i in range(params.n)
        ]
        self.core.add_request(children[0])  # validates; raises ValueError for a request it refuses
        for i, child in enumerate(children):
            self.output_processor.add(child, i)
        self._parents[request_id] = _Parent(prompt, list(prompt_token_ids), [c.request_id for c in children], children[1:])

    def _add_forks(self) -> None:
        """Admits samples 2..n once sample 1 has computed the prompt, so they share its cached prompt blocks."""
        for parent in self._parents.values():
            first = self.core.requests.get(parent.child_ids[0])
            if parent.forks and (first is None or first.num_computed_tokens >= first.num_prompt_tokens):
                for fork in parent.forks:
                    self.core.add_request(fork)
                parent.forks = []

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    @property
    def num_waiting(self) -> int:
        return self.core.num_waiting

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def step(self) -> list[RequestOutput]:
        """Runs one engine step -> a cumulative output for each request that progressed (finished ones last time)."""
        self._add_forks()
        progressed = set()
        for request, result in self.core.step():
            self.output_processor.process(request, result)
            progressed.add(request.request_id.rpartition("#")[0])
        self.core.release_finished()
        return [self._output(rid) for rid in list(self._parents) if rid in progressed]

    def _output(self, request_id: str) -> RequestOutput:
        parent = self._parents[request_id]
        outputs = [self.output_processor.completion(cid) for cid in parent.child_ids]
        finished = not parent.forks and all(o.finished for o in outputs)
        if finished:
            for child_id in parent.child_ids:
                self.output_processor.remove(child_id)
            del self._parents[request_id]
        return RequestOutput(request_id, parent.prompt, parent.prompt_token_ids, outputs, finished)

    def abort(self, request_id: str) -> None:
        """Stops a request at once and frees everything it holds; unknown or finished ids are ignored."""
        parent = self._parents.pop(request_id, None)
        for child_id in parent.child_ids if parent else []:
            self._drop(child_id)

    def _drop(self, child_id: str) -> None:
        self.core.finish(child_id, FinishReason.ABORT)
        self.output_processor.remove(child_id)
