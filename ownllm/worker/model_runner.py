"""ModelRunner: a SchedulerOutput in, a RunnerOutput out. Owns the model weights, the KV-cache pool, its own
per-request state (token ids, params, block ids, seeded generators) and the draft proposer.

New requests arrive once with all their data; afterwards a step names only how many tokens each computes,
its new blocks and the drafts it verifies. Each step flattens those tokens into one batch (drafts as decode
rows: see input_batch), runs the model once, samples every row that needs a token in one batched call,
accepts each request's drafts up to the first that differs from what the target sampled at that position
(an exact rejection rule for drafts proposed as single tokens: it keeps the target distribution), and asks
the proposer for the next drafts. Results are plain Python values: the engine above never touches a tensor.

Images: the runner keeps the vision encoder's outputs by image hash (encoder_outputs), encodes what the scheduler
names and drops what it evicts; a step whose tokens reach an image's placeholders runs the model on input
embeddings with the slice of the image's rows those positions cover written over them. A step without images
makes the plain text call.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
import time
from dataclasses import dataclass, field

import torch

from ownllm.config import BackendConfig, CacheConfig, ModelConfig, SpeculativeConfig
from ownllm.distributed.parallel_state import tp_group
from ownllm.layers.attention import PagedKVCache
from ownllm.layers.backends import LayerBackends
from ownllm.layers.quant import decode_step
from ownllm.loader import Checkpoint
from ownllm.models.registry import model_class
from ownllm.multimodal import ImageInput
from ownllm.outputs import RunnerOutput, SampleLogprobs, SchedulerOutput
from ownllm.sampling_params import SamplingParams
from ownllm.spec_decode import DraftLength
from ownllm.worker.input_batch import Span, build_inputs
from ownllm.worker.mrope import step_mrope_positions
from ownllm.worker.sampler import Sampler, SamplingMetadata, SamplingRow, token_logprobs

logger = logging.getLogger(__name__)
DEFAULT_KV_CACHE_BYTES = 2 * 2**30
PROMPT_LOGPROBS_ROWS = 256  # prompt rows turned into logits at once (a [rows, vocab] float32 tensor)


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


@dataclass
class RequestState:
    """What the runner keeps of a request between steps."""

    request_id: str
    token_ids: list[int]  # prompt, then every token sampled and accepted so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None
    drafts: list[int] = field(default_factory=list)  # verified this step
    draft_length: DraftLength | None = None  # how many tokens to draft next (when speculating)
    images: list[ImageInput] = field(default_factory=list)
    mrope: tuple | None = None  # M-RoPE models, a request with images: (prompt positions [3, P], delta past them)


class ModelRunner:
    """device: "cpu", or a CUDA device, where the weights, the KV pool and each step's tensors live; on a GPU
    only the plain-torch paths run (the kernels are CPU code). backends: the layer pieces' names, resolved here
    once (LayerBackends) for the model, its draft, and every forward's metadata."""

    def __init__(self, checkpoint: Checkpoint, cache_config: CacheConfig | None = None,
                 eos_token_ids: list[int] | None = None, max_num_seqs: int = 64, device: str = "cpu",
                 speculative_config: SpeculativeConfig | None = None, backends: BackendConfig | None = None) -> None:
        self.config: ModelConfig = checkpoint.config
        self.cache_config = cache_config or CacheConfig()
        self.dtype = getattr(torch, self.config.dtype)
        self.device = device
        self.backends = LayerBackends.resolve(backends or BackendConfig(), self.dtype, device)
        cls = model_class(self.config.architecture)
        self.model = cls.from_tensors(self.config, checkpoint.tensors, self.backends)
        if torch.device(device).type != "cpu":
            self.model.to(device)
        self.eos_token_ids = set(eos_token_ids or [])
        self.sampler = Sampler()
        self.kv_spec = cls.kv_cache_spec(self.config)
        self.block_size = self.cache_config.block_size
        self.num_blocks = tp_group().min(self._num_blocks(max_num_seqs))  # tensor parallel: every rank's room
        self.kv_cache = PagedKVCache(self.kv_spec, self.num_blocks, self.block_size, self.dtype, device)
        self.requests: dict[str, RequestState] = {}
        self.encoder_outputs: dict[str, torch.Tensor] = {}  # image hash -> [its placeholder tokens, hidden]
        self.step_seconds = 0.0  # a forward of the model (decayed mean)
        self.proposer = None
        self.num_speculative_tokens = speculative_config.num_speculative_tokens if speculative_config else 0
        if speculative_config is not None:
            from ownllm.spec_decode import build_proposer

            self.proposer = build_proposer(speculative_config, self, checkpoint)
        self.proposer_reads_hidden = getattr(self.proposer, "reads_hidden_states", False)
        self.uses_mrope = hasattr(self.model, "mrope_positions")  # 3D rotary positions (Qwen2.5-VL)

    def _num_blocks(self, max_num_seqs: int) -> int:
        """From the memory budget; without an explicit one, no more than max_num_seqs full contexts need."""
        cc = self.cache_config
        if cc.num_blocks is not None:
            return cc.num_blocks
        per_block = self.kv_spec.bytes_per_token(self.dtype) * cc.block_size
        if cc.memory_bytes:
            num_blocks = cc.memory_bytes // per_block
        else:
            budget = min(DEFAULT_KV_CACHE_BYTES, int(available_memory_bytes() * cc.memory_fraction))
            num_blocks = min(budget // per_block, max_num_seqs * -(-self.config.max_model_len // cc.block_size))
        if num_blocks < 1:
            raise ValueError(f"the KV cache memory holds no block of {per_block} bytes; give it more memory")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, cc.block_size, num_blocks * per_block / 2**30)
        return num_blocks

    def _update_states(self, so: SchedulerOutput) -> None:
        for request_id in so.finished_request_ids:
            self.requests.pop(request_id, None)
            if self.proposer is not None:
                self.proposer.free(request_id)
        for new in so.new_requests:
            seed = new.sampling_params.seed
            generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
            self.requests[new.request_id] = RequestState(
                new.request_id, new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids),
                new.sampling_params, list(new.block_ids), new.num_computed_tokens, generator,
                draft_length=DraftLength(self.num_speculative_tokens) if self.proposer is not None else None,
                images=list(new.images))
            if self.uses_mrope and new.images:
                self.requests[new.request_id].mrope = self.model.mrope_positions(len(new.prompt_token_ids), new.images)
        for cached in so.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids += cached.new_block_ids
            state.num_computed_tokens = cached.num_computed_tokens

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self._update_states(so)
        spans, sampling = [], []  # sampling: (state, index of its first sampled row in the batch)
        scheduled = []  # (state, span, index of its first row in the batch)
        num_rows = 0
        for request_id, num_new in so.num_scheduled_tokens.items():
            state = self.requests[request_id]
            state.drafts = so.draft_token_ids.get(request_id, [])
            start = state.num_computed_tokens
            tokens = state.token_ids[start : start + num_new] + state.drafts  # drafts follow a decoding request's last token
            spans.append(Span(tokens, start, state.block_ids, as_decode_rows=bool(state.drafts),
                              bidirectional=[(i.offset, i.end) for i in state.images
                                             if i.indivisible and i.offset < start + num_new and i.end > start]))
            scheduled.append((state, spans[-1], num_rows))
            num_rows += num_new
            if start + num_new >= len(state.token_ids) + len(state.drafts):
                sampling.append((state, num_rows - 1 - len(state.drafts)))
        input_ids, meta = build_inputs(spans, self.kv_cache, self.backends.attention, self.device)
        if self.uses_mrope:
            meta.mrope_positions = step_mrope_positions(
                ((state.mrope, span.start, len(span.token_ids)) for state, span, _ in scheduled), self.device)
        started = time.perf_counter()
        self._run_encoder(so)
        inputs_embeds = self._inputs_embeds(input_ids, scheduled)
        images = {} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}  # text-only: the plain call
        with decode_step(meta.is_decode_only):  # decode batches of any size take the integer kernels
            if self.proposer_reads_hidden:
                pre_norm = self.model.hidden_states(input_ids, meta, **images)  # [T, hidden] before the final norm
                hidden = self.model.model.norm(pre_norm)
            else:
                hidden = self.model(input_ids, meta, **images)  # [T, hidden]
        elapsed = time.perf_counter() - started  # a step's time, for the cost of a draft next to it
        self.step_seconds = 0.8 * self.step_seconds + 0.2 * elapsed if self.step_seconds else elapsed
        output = RunnerOutput(request_ids=list(so.num_scheduled_tokens))
        sampled = {}
        states = [state for state, _ in sampling]
        if sampling:
            rows = [first + j for state, first in sampling for j in range(len(state.drafts) + 1)]
            with decode_step(meta.is_decode_only):
                logits = self.model.compute_logits(hidden[rows]).float()  # [R, vocab]
            bitmask = so.allowed_token_bitmask  # grammar masks, filled during the forward: waited for here
            bitmask = bitmask.result() if isinstance(bitmask, Future) else bitmask
            sampled = sample_and_verify(self.sampler, logits, states, self.eos_token_ids, bitmask)
        for request_id in output.request_ids:
            tokens, logprobs, num_accepted = sampled.get(request_id, ([], [], 0))
            output.sampled_token_ids.append(tokens)
            output.logprobs.append(logprobs)
            output.num_accepted_draft_tokens.append(num_accepted)
        output.prompt_logprobs = self._prompt_logprobs(scheduled, hidden)
        if self.proposer_reads_hidden:
            self.proposer.observe(scheduled, pre_norm)
        if self.proposer is not None and states and so.propose_drafts:
            cost = self.proposer.cost_per_draft(self.step_seconds)
            for state in states:
                state.draft_length.cost_per_draft = cost
            output.draft_token_ids = self.proposer.propose(states)
        return output

    def _run_encoder(self, so: SchedulerOutput) -> None:
        """Drops the encoder outputs the scheduler evicted, then encodes the images it scheduled."""
        for image_hash in so.freed_encoder_hashes:
            self.encoder_outputs.pop(image_hash, None)
        self._encode([self.requests[rid].images[i] for rid, indices in so.encoder_inputs.items() for i in indices])

    def _encode(self, images: list[ImageInput]) -> None:
        todo = list({i.image_hash: i for i in images if i.image_hash not in self.encoder_outputs}.values())
        if not todo:
            return
        pixels = [torch.from_numpy(image.pixel_values).to(self.device, self.dtype) for image in todo]  # [3, H, W] each
        for image, rows in zip(todo, self.model.embed_images(pixels), strict=True):  # rows: [tokens, hidden]
            if rows.shape[0] != image.length:
                raise ValueError(f"an image encoded to {rows.shape[0]} rows for {image.length} placeholder tokens")
            self.encoder_outputs[image.image_hash] = rows  # [length, hidden]

    def _inputs_embeds(self, input_ids: torch.Tensor, scheduled: list) -> torch.Tensor | None:
        """The step's input embeddings with the rows of the images its tokens reach written over their
        placeholders (a chunk may hold any slice of an image), or None when it reaches no image."""
        writes = []  # (first batch row, image, first image row, rows)
        for state, span, first_row in scheduled:
            start, end = span.start, span.start + len(span.token_ids)
            for image in state.images:
                low, high = max(start, image.offset), min(end, image.end)
                if low < high:
                    writes.append((first_row + low - start, image, low - image.offset, high - low))
        if not writes:
            return None
        self._encode([image for _, image, _, _ in writes])  # only after a failed step's retry is one missing
        embeds = self.model.embed_input_ids(input_ids)  # [T, hidden], a new tensor
        for row, image, image_row, num in writes:
            embeds[row:row + num] = self.encoder_outputs[image.image_hash][image_row:image_row + num]
        return embeds

    def _prompt_logprobs(self, scheduled: list[tuple[RequestState, Span, int]],
                         hidden: torch.Tensor) -> dict[str, tuple[int, list[SampleLogprobs]]]:
        """For the requests that asked for prompt logprobs: the logprobs of the prompt tokens this step's rows
        predict (row of position p -> token p + 1), as {request id: (first position scored, logprobs)}."""
        results = {}
        for state, span, first_row in scheduled:
            k = state.params.prompt_logprobs
            end = min(span.start + len(span.token_ids) - len(state.drafts), state.num_prompt_tokens - 1)
            if k is None or span.start >= end:
                continue
            samples = []
            for start in range(span.start, end, PROMPT_LOGPROBS_ROWS):
                stop = min(start + PROMPT_LOGPROBS_ROWS, end)
                rows = hidden[first_row + start - span.start : first_row + stop - span.start]
                logits = self.model.compute_logits(rows).float()  # [rows, vocab]
                targets = torch.tensor(state.token_ids[start + 1 : stop + 1], device=logits.device)
                samples += token_logprobs(logits, targets, k)
            results[state.request_id] = (span.start + 1, samples)
        return results


def sample_and_verify(sampler: Sampler, logits: torch.Tensor, states: list[RequestState], eos_token_ids: set[int],
                      bitmask=None) -> dict[str, tuple[list[int], list[SampleLogprobs], int]]:
    """Samples every row (logits: [R, vocab], each state's 1 + len(drafts) rows in order), then accepts each
    request's drafts while they equal the token the target itself sampled at that position, and takes the
    target's token at the first difference (or after the last draft). With single-token drafts this is the
    exact rejection rule: a draft is kept with the target's probability of it, and a rejected position's token
    is a sample of the target restricted to the other tokens. -> {request id: (tokens, their logprobs, drafts
    accepted)}; the tokens join each state."""
    rows = [SamplingRow(state.params, state.token_ids, state.num_prompt_tokens, state.drafts[:j], state.generator)
            for state in states for j in range(len(state.drafts) + 1)]
    out = sampler(logits, SamplingMetadata.build(rows, logits.shape[-1], eos_token_ids, logits.device, bitmask))
    results, row = {}, 0
    for state in states:
        num_accepted = 0
        while num_accepted < len(state.drafts) and out.token_ids[row + num_accepted] == state.drafts[num_accepted]:
            num_accepted += 1
        taken = range(row, row + num_accepted + 1)
        tokens = [out.token_ids[i] for i in taken]
        state.token_ids += tokens
        if state.draft_length is not None:
            state.draft_length.update(len(state.drafts), num_accepted)
        results[state.request_id] = (tokens, [SampleLogprobs(out.logprobs[i], out.ranks[i], out.top_logprobs[i])
                                              for i in taken], num_accepted)
        row += len(state.drafts) + 1
    return results
