"""LLM: the offline Python API, shaped like vLLM's (`LLM(model).generate(prompts, SamplingParams(...))`).

It builds its engine with build_engine (like AsyncEngine and `ownllm serve`) and drives it until the
requests it submitted are done: `generate` asks for final outputs only, `stream` for per-step deltas and
yields text as it is generated, for the CLI.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Iterator, Sequence

from ownllm.compute.offline import generate_with_compute
from ownllm.compute.params import DEFAULT_TEMPERATURE, ComputeParams
from ownllm.compute.verifier import verifier_messages, verifier_text
from ownllm.config import BackendConfig, CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from ownllm.engine.build import build_engine, default_sampling_params
from ownllm.engine.embedder import EmbedInput, Embedder, EmbeddingOutput, is_embedding_model
from ownllm.multimodal.chat import split_images
from ownllm.outputs import CompletionOutput, RequestOutput
from ownllm.sampling_params import SamplingParams

PromptType = str | Sequence[int] | dict[str, Any]


class LLM:
    """vLLM-style offline API. `device`: "cpu" (default) or "cuda"; on CUDA the plain-torch paths run, and
    GGUF weights are dequantized to the compute dtype. Engine options: `kv_cache_memory` (bytes of KV cache;
    default min(2 GiB, a quarter of free memory)), `block_size`, `enable_prefix_caching`,
    `max_num_batched_tokens` (the per-step token budget, which is also the prefill chunk size),
    `max_num_seqs`, `num_kv_blocks` (tests), `speculative_config` (a dict with vLLM's keys, or its JSON:
    {"method": "ngram", "num_speculative_tokens": 4}, {"method": "draft_model", "model": PATH, ...}, {"method": "mtp"}),
    `attention_backend` ("torch" or "cpu_kernels"), `moe_backend` ("fast" or "reference"), `mla_backend`
    ("auto", "expanded" or "absorbed"), `quant_method` ("kernels" or "dequantized") (each by default the fastest
    that runs here; the others are the plain-torch references tests compare against), `structured_outputs_backend`
    ("llguidance" or "xgrammar"), `tensor_parallel_size` (worker processes the model is split across,
    torch.distributed between them), `mmproj` (llama.cpp's vision projector file beside a .gguf text model: LLaVA and
    Gemma 3), `limit_images_per_prompt` (the most images one prompt may carry; default the model's own limit)."""

    def __init__(
        self, model: str | None = None, dtype: str | None = None, *, kv_cache_memory: int | None = None,
        block_size: int = 16, enable_prefix_caching: bool = True, max_num_batched_tokens: int = 512,
        max_num_seqs: int = 64, num_kv_blocks: int | None = None, device: str | None = None,
        speculative_config: dict | str | None = None, attention_backend: str | None = None,
        moe_backend: str | None = None, mla_backend: str | None = None, quant_method: str | None = None,
        structured_outputs_backend: str = "llguidance",
        tensor_parallel_size: int = 1, mmproj: str | None = None, limit_images_per_prompt: int | None = None,
    ) -> None:
        if tensor_parallel_size > 1 and is_embedding_model(model):
            raise ValueError("tensor parallel (tensor_parallel_size > 1) does not support embedding models")
        self.embedder = Embedder.from_model(model, dtype, device) if is_embedding_model(model) else None
        if self.embedder is not None:  # an encoder: embed() only, no generation engine
            self.engine = None
            self.config, self.tokenizer, self.generation_config = self.embedder.config, self.embedder.tokenizer, {}
            self.model_path, self.max_model_len = self.embedder.model_path, self.embedder.max_model_len
            return
        self.engine = build_engine(EngineConfig(
            model, dtype, device,
            CacheConfig(block_size, kv_cache_memory, enable_prefix_caching=enable_prefix_caching,
                        num_blocks=num_kv_blocks),
            SchedulerConfig(max_num_batched_tokens, max_num_seqs),
            SpeculativeConfig.parse(speculative_config),
            BackendConfig(attention_backend, moe_backend, mla_backend, quant_method),
            structured_outputs_backend=structured_outputs_backend,
            tensor_parallel_size=tensor_parallel_size, mmproj=mmproj,
            limit_images_per_prompt=limit_images_per_prompt,
        ))
        self.runner = self.engine.runner
        self.config = self.engine.model_config
        self.tokenizer = self.engine.tokenizer
        self.generation_config = self.engine.generation_config
        self.model_path = self.engine.model_path
        self.kv_cache = self.engine.core.kv_cache
        self.max_model_len = self.engine.max_model_len
        self.last_output: CompletionOutput | None = None
        self._ids = itertools.count()

    def embed(self, inputs: EmbedInput | Sequence[EmbedInput], *, truncate: bool = False,
              dimensions: int | None = None) -> list[EmbeddingOutput]:
        """Embeddings of one text (or token-id list) or several, pooled and normalized as the model's
        sentence-transformers settings say. `truncate` cuts inputs longer than the model takes (else refused);
        `dimensions` shortens the vectors of matryoshka models."""
        if self.embedder is None:
            raise ValueError(f"model {self.model_path} is not an embedding model; embed() needs one, e.g. a "
                             "sentence-transformers BertModel folder")
        return self.embedder.embed(inputs, truncate, dimensions)

    def _check_generates(self) -> None:
        if self.embedder is not None:
            raise ValueError(f"model {self.model_path} is an embedding model: use embed(), it cannot generate text")

    def default_sampling_params(self) -> SamplingParams:
        """The model's own sampling defaults from generation_config.json, as vLLM applies them."""
        return default_sampling_params(self.generation_config)

    @staticmethod
    def prompt_images(prompt: PromptType) -> list[Any]:
        """The images of {"prompt" or "prompt_token_ids": ..., "multi_modal_data": {"image": img or [imgs]}}."""
        data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if not data:
            return []
        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise ValueError(f"multi_modal_data takes only 'image', got {', '.join(map(repr, unknown))}")
        images = data.get("image")
        return list(images) if isinstance(images, (list, tuple)) else [images]

    def prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text if any, token ids) for a string, a list of token ids or {"prompt_token_ids": [...]}."""
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

    def _add(self, prompt: PromptType, params: SamplingParams, output_kind: str) -> str:
        self._check_generates()
        text, ids = self.prompt_ids(prompt)
        params = replace(params, output_kind=output_kind)
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, ids, params, prompt=text, images=self.prompt_images(prompt))
        return request_id

    def generate(
        self, prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
        compute: ComputeParams | dict | None = None,
    ) -> list[RequestOutput]:
        """`compute` ({"strategy": "vote", "samples": 8, "answer": "number", ...}, see ComputeParams): each prompt
        samples that many answers from one shared prefill and returns the chosen one, with the summary in
        `RequestOutput.compute`."""
        prompts = self._as_list(prompts)
        if compute is not None:
            return self._generate_with_compute(prompts, sampling_params, compute)
        params = sampling_params or self.default_sampling_params()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        request_ids: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompts, params_list):
                request_ids.append(self._add(prompt, p, "final_only"))
            while self.engine.has_unfinished():
                finished.update((o.request_id, o) for o in self.engine.step() if o.finished)
        finally:
            for request_id in request_ids:
                self.engine.abort(request_id)  # a no-op for finished requests
        return [finished[rid] for rid in request_ids]

    def _generate_with_compute(self, prompts: list[PromptType], sampling_params: SamplingParams | None,
                               compute: ComputeParams | dict,
                               conversations: list[list[dict]] | None = None) -> list[RequestOutput]:
        self._check_generates()
        compute = ComputeParams.of(compute)
        if isinstance(sampling_params, Sequence):
            raise ValueError("compute takes one SamplingParams for all prompts")
        params = sampling_params or replace(self.default_sampling_params(), temperature=DEFAULT_TEMPERATURE)
        if params.n != 1:
            raise ValueError("compute cannot be combined with n > 1: compute.samples sets the number of samples")
        items = [self.prompt_ids(p) for p in prompts]

        def verifier_prompt(p: int, answer: str) -> list[int]:
            if conversations is not None:
                return self.tokenizer.encode_chat(verifier_messages(conversations[p], answer))
            text = items[p][0] if items[p][0] is not None else self.tokenizer.decode(items[p][1])
            return self.tokenizer.encode(verifier_text(text, answer))

        return generate_with_compute(self.engine, items, params, compute, verifier_prompt, str(next(self._ids)))

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None, *,
        tools: list[dict] | None = None, add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
        compute: ComputeParams | dict | None = None,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.chat_prompt(c, tools, add_generation_prompt, chat_template_kwargs) for c in conversations]
        if compute is not None:
            return self._generate_with_compute(prompts, sampling_params, compute, conversations)
        return self.generate(prompts, sampling_params)

    def chat_prompt(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> dict[str, Any]:
        """The prompt of a conversation; image content parts (image_url with a data: or http(s) URL, or image /
        image_pil with a PIL image) go to multi_modal_data."""
        self._check_generates()
        messages, sources = split_images(messages)
        ids = self.tokenizer.encode_chat(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
        )
        if not sources:
            return {"prompt_token_ids": ids}
        from ownllm.multimodal.fetch import load_image_url  # Pillow: only when images come

        images = [load_image_url(image, None) if isinstance(image, str) else image for _, image in sources]
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the text of one request as it is generated; closing the iterator aborts the request.
        The finished output is left in `self.last_output`."""
        for delta in self._deltas(prompt, sampling_params, "stream"):
            if delta.text:
                yield delta.text

    def stream_token_ids(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[list[int]]:
        """As stream, the token ids each engine step adds, also where they add no text (a special token, half of
        a character): what a benchmark times token by token."""
        for delta in self._deltas(prompt, sampling_params, "stream_token_ids"):
            yield delta.token_ids

    def _deltas(self, prompt: PromptType, sampling_params: SamplingParams | None,
                caller: str) -> Iterator[CompletionOutput]:
        """One request's CompletionOutput deltas, step by step (see stream)."""
        params = sampling_params or self.default_sampling_params()
        if params.n != 1:
            raise ValueError(f"{caller}() takes one sample (n=1)")
        request_id = self._add(prompt, params, "delta")
        self.last_output = None
        token_ids: list[int] = []
        text = ""
        try:
            while self.engine.has_unfinished():
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    delta = output.outputs[0]
                    token_ids += delta.token_ids
                    text += delta.text
                    yield delta
                    if output.finished:
                        self.last_output = replace(delta, text=text, token_ids=token_ids)
                        return
        finally:
            self.engine.abort(request_id)
