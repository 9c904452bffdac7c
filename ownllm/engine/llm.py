"""LLM: the offline Python API, shaped like vLLM's (`LLM(model).generate(prompts, SamplingParams(...))`).

It wires a checkpoint to a ModelRunner, an EngineCore and an OutputProcessor, and drives the
engine until the requests it submitted are done. `stream` yields text as it is generated, for the CLI.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

from ownllm.engine.core import EngineCore
from ownllm.engine.output_processor import OutputProcessor
from ownllm.loader import load_checkpoint
from ownllm.outputs import CompletionOutput, RequestOutput
from ownllm.request import FinishReason, Request
from ownllm.sampling_params import SamplingParams

PromptType = str | Sequence[int] | dict[str, Any]
_GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LLM:
    def __init__(self, model: str | None = None, dtype: str | None = None) -> None:
        from ownllm.worker.model_runner import ModelRunner

        checkpoint = load_checkpoint(model, dtype)
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.generation_config = checkpoint.generation_config
        self.model_path = checkpoint.path
        self.runner = ModelRunner(checkpoint)
        self.engine = EngineCore(self.runner, self.tokenizer.eos_token_ids, self.config.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def default_sampling_params(self) -> SamplingParams:
        """The model's own sampling defaults from generation_config.json, as vLLM applies them."""
        values = {k: self.generation_config[k] for k in _GENERATION_CONFIG_KEYS if k in self.generation_config}
        if self.generation_config.get("do_sample") is False:
            values["temperature"] = 0.0
        return SamplingParams(**values)

    # ---- inputs

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        ids = list(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in ids):
            raise ValueError(f"token ids must be integers in [0, {self.config.vocab_size})")
        return None, ids

    @staticmethod
    def _as_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            return [prompts]
        return list(prompts)

    def _submit(self, prompt: PromptType, params: SamplingParams) -> tuple[str, str | None, list[int], list[str]]:
        text, ids = self._prompt_ids(prompt)
        request_id = str(next(self._ids))
        child_ids = [f"{request_id}-{i}" for i in range(params.n)]
        for i, child_id in enumerate(child_ids):
            request = Request(child_id, ids, params.for_sample(i), prompt=text)
            self.engine.add_request(request)
            self.output_processor.add(request, i)
        return request_id, text, ids, child_ids

    # ---- the engine loop

    def _step(self) -> None:
        for request, result in self.engine.step():
            self.output_processor.process(request, result)
        self.engine.release_finished()

    def _collect(self, child_ids: list[str]) -> list[CompletionOutput]:
        outputs = [self.output_processor.completion(cid) for cid in child_ids]
        for cid in child_ids:
            self.output_processor.remove(cid)
        return outputs

    def generate(
        self, prompts: PromptType | Sequence[PromptType], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        prompts = self._as_list(prompts)
        params = sampling_params or self.default_sampling_params()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        submitted = []
        try:
            for prompt, p in zip(prompts, params_list):
                submitted.append(self._submit(prompt, p))
            while self.engine.has_unfinished():
                self._step()
        except BaseException:
            self._abort([cid for *_, child_ids in submitted for cid in child_ids])
            raise
        return [
            RequestOutput(rid, text, ids, self._collect(child_ids), finished=True)
            for rid, text, ids, child_ids in submitted
        ]

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None, *,
        tools: list[dict] | None = None, add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.chat_prompt(c, tools, add_generation_prompt, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params)

    def chat_prompt(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        ids = self.tokenizer.encode_chat(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
        )
        return {"prompt_token_ids": ids}

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the text of one request as it is generated; closing the iterator aborts the request."""
        params = sampling_params or self.default_sampling_params()
        if params.n != 1:
            raise ValueError("stream() takes one sample (n=1)")
        _, _, _, (child_id,) = self._submit(prompt, params)
        self.last_output: CompletionOutput | None = None
        try:
            while child_id in self.engine.requests:
                self._step()
                delta = self.output_processor.take_delta(child_id)
                if delta:
                    yield delta
            self.last_output = self._collect([child_id])[0]
        finally:
            self._abort([child_id])

    def _abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self.engine.finish(request_id, FinishReason.ABORT)
            self.output_processor.remove(request_id)
