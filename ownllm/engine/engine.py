"""Engine: prompts and SamplingParams in, RequestOutputs out, one step at a time.

It fans a request with n samples out into n engine Requests, drives the EngineCore and reports, after
each step, a RequestOutput for every request that progressed, shaped by its params' output_kind: all
so far ("cumulative"), what the step added ("delta"), or only the finished output ("final_only").
The offline LLM and the AsyncEngine both sit on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ownllm.config import ModelConfig
from ownllm.engine.core import EngineCore
from ownllm.multimodal import ImagePromptProcessor
from ownllm.outputs import RequestOutput
from ownllm.parsers.reasoning import ReasoningParser
from ownllm.request import FinishReason, Request
from ownllm.sampling_params import SamplingParams
from ownllm.tokenizer import Tokenizer


@dataclass
class _Parent:
    prompt: str | None
    prompt_token_ids: list[int]
    child_ids: list[str]
    forks: list[Request]  # samples not yet admitted
    output_kind: str
    held: list[Request]  # samples waiting for start_samples (SamplingParams.n_started)


class Engine:
    """model_config, generation_config and model_path describe the loaded model (build_engine sets them), and
    reasoning_parser and tool_parser_name how its answers are read (the output layer, parsers/events.py);
    image_processor turns a request's images into placeholder tokens and pixel values (None: a text-only model)."""

    def __init__(self, core: EngineCore, tokenizer: Tokenizer, model_config: ModelConfig | None = None,
                 generation_config: dict | None = None, model_path: Path | None = None,
                 reasoning_parser: ReasoningParser | None = None, tool_parser_name: str | None = None,
                 image_processor: ImagePromptProcessor | None = None) -> None:
        self.core = core
        self.runner = getattr(core.executor, "runner", None)  # in this process (None: tensor-parallel workers)
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.generation_config = generation_config or {}
        self.model_path = model_path
        self.reasoning_parser = reasoning_parser
        self.tool_parser_name = tool_parser_name
        self.image_processor = image_processor
        self.max_model_len = core.max_model_len
        self.output_processor = core.output_processor
        self._parents: dict[str, _Parent] = {}
        self._stopped_parents: set[str] = set()  # with samples stopped since the last step, which reports them

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None,
        priority: int = 0, images: Sequence[Any] = (),
    ) -> None:
        """images: PIL images (or encoded image bytes), one per image marker token in the prompt, in order."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        image_inputs = []
        if images:
            if self.image_processor is None:
                name = self.model_path.name if self.model_path is not None else "this model"
                raise ValueError(f"model {name} does not accept images")
            prompt_token_ids, image_inputs = self.image_processor.process(prompt_token_ids, images)
        children = [
            Request(f"{request_id}#{i}", list(prompt_token_ids), params.for_sample(i), prompt=prompt, priority=priority,
                    images=image_inputs)
            for i in range(params.n)
        ]
        self.core.add_request(children[0])  # validates; raises ValueError for a request it refuses
        for index, child in enumerate(children):
            self.output_processor.add(child, index)
        started = params.n_started or params.n
        self._parents[request_id] = _Parent(prompt, list(prompt_token_ids), [c.request_id for c in children],
                                            children[1:started], params.output_kind, children[started:])

    def _add_forks(self) -> None:
        """Admits samples 2..n once sample 1 has computed the prompt, so they share its cached prompt blocks."""
        for parent in self._parents.values():
            first = self.core.requests.get(parent.child_ids[0])
            if parent.forks and (first is None or first.num_computed_tokens >= first.num_prompt_tokens):
                for fork in parent.forks:
                    self.core.add_request(fork)
                parent.forks = []

    def start_samples(self, request_id: str, count: int) -> None:
        """Starts the next count of a request's held samples (SamplingParams.n_started): they are admitted like the
        first wave's forks, sharing the prompt's blocks while the prefix cache holds them. Unknown requests are
        ignored."""
        parent = self._parents.get(request_id)
        if parent is not None:
            parent.forks += parent.held[:count]
            del parent.held[:count]

    def stop_samples(self, request_id: str, indices: Iterable[int]) -> None:
        """Ends some of a request's samples at once (finish reason "abort"), freeing their blocks, while the others
        go on; the next step reports them. Unknown or finished requests and samples are ignored."""
        parent = self._parents.get(request_id)
        if parent is None:
            return
        for index in indices:
            child_id = parent.child_ids[index]
            waiting = next((q for q in (parent.forks, parent.held) if any(f.request_id == child_id for f in q)), None)
            if waiting is not None:  # not admitted yet: it never holds a block
                fork = next(f for f in waiting if f.request_id == child_id)
                waiting.remove(fork)
                fork.finish(FinishReason.ABORT)
            else:
                self.core.finish(child_id, FinishReason.ABORT)
        self._stopped_parents.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._parents)

    @property
    def num_waiting(self) -> int:
        return self.core.num_waiting

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def step(self) -> list[RequestOutput]:
        """Runs one engine step -> an output for each request that progressed (as its output_kind asks)."""
        self._add_forks()
        progressed = {request.request_id.rpartition("#")[0] for request in self.core.step()} | self._stopped_parents
        self._stopped_parents = set()
        outputs = (self._output(rid) for rid in list(self._parents) if rid in progressed)
        return [output for output in outputs if output is not None]

    def _output(self, request_id: str) -> RequestOutput | None:
        parent = self._parents[request_id]
        states = [self.output_processor.states[cid] for cid in parent.child_ids]
        error = next((s.request.error for s in states if s.request.error), None)
        if error is not None:  # one failed sample fails the request: the others stop too
            for waiting in parent.forks + parent.held:  # never admitted: the core does not know them
                waiting.finish(FinishReason.ABORT)
            parent.forks, parent.held = [], []
            for state in states:
                self.core.finish(state.request.request_id, FinishReason.ABORT)
        finished = not parent.forks and all(s.request.is_finished for s in states)
        if parent.output_kind == "final_only" and not finished:
            return None
        delta = parent.output_kind == "delta"
        outputs = [self.output_processor.completion(cid, delta) for cid in parent.child_ids]
        prompt_logprobs = self.output_processor.prompt_logprobs(parent.child_ids[0], delta)
        if finished:
            for child_id in parent.child_ids:
                self.output_processor.remove(child_id)
            del self._parents[request_id]
        return RequestOutput(request_id, parent.prompt, parent.prompt_token_ids, outputs, finished, error,
                             prompt_logprobs=prompt_logprobs)

    def abort(self, request_id: str) -> None:
        """Stops a request at once and frees everything it holds; unknown or finished ids are ignored."""
        parent = self._parents.pop(request_id, None)
        for child_id in parent.child_ids if parent else []:
            self._drop(child_id)

    def _drop(self, child_id: str) -> None:
        self.core.finish(child_id, FinishReason.ABORT)
        self.output_processor.remove(child_id)
