"""Which request broke a step: when the runner raises on a batch, its requests are run again one at a time, so
the one whose own work raises (a model forward or sampler fault on its tokens) is named and the others go on.

Why one at a time rather than failing the batch: a fault is rare and usually tied to one request's data (its
tokens, its sampling options), and every other request in the batch is innocent; rerunning each alone costs
a few single-request forwards once, and is the only way to tell them apart without the runner reporting
per-row errors. Each retry sends its request to the runner as new (the runner first drops what it kept of
it), rebuilt from the engine's own record (tokens, blocks, computed count), because a step that raised may
have left the runner's copy half updated. The KV cache needs no repair: a step only writes the slots of the
tokens it computes, and a retry computes the same tokens into the same slots. Plain Python: no torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from ownllm.engine.kv_cache import KVCacheManager
from ownllm.outputs import NewRequestData, RunnerOutput, SchedulerOutput
from ownllm.request import Request

if TYPE_CHECKING:
    from ownllm.distributed.executor import Executor

logger = logging.getLogger(__name__)


def execute_one_by_one(executor: Executor, so: SchedulerOutput, requests: dict[str, Request], kv_cache: KVCacheManager,
                       bitmask: Callable[[SchedulerOutput], Any]) -> tuple[RunnerOutput, dict[str, Exception]]:
    """Runs each request of the failed step `so` alone -> (the merged output of those that ran, in batch order;
    {request id: the error its own run raised}). `bitmask` gives a step its grammar masks (each retry its own)."""
    merged = RunnerOutput()
    failed: dict[str, Exception] = {}
    finished_ids = set(so.finished_request_ids)  # the step's own news for the runner, sent with the first retry
    for request_id, num_scheduled in so.num_scheduled_tokens.items():
        request = requests[request_id]
        alone = SchedulerOutput(
            new_requests=[NewRequestData(request_id, request.prompt_token_ids, list(request.output_token_ids),
                                         request.sampling_params, kv_cache.block_ids(request_id),
                                         request.num_computed_tokens, request.images)],
            num_scheduled_tokens={request_id: num_scheduled},
            encoder_inputs={request_id: so.encoder_inputs[request_id]} if request_id in so.encoder_inputs else {},
            freed_encoder_hashes=so.freed_encoder_hashes,  # freeing twice is harmless
            draft_token_ids={request_id: so.draft_token_ids[request_id]} if request_id in so.draft_token_ids else {},
            finished_request_ids=finished_ids | {request_id}, propose_drafts=so.propose_drafts)
        finished_ids = set()
        alone.allowed_token_bitmask = bitmask(alone)
        try:
            output = executor.execute_model(alone)
        except Exception as error:
            logger.error("request %s failed on its own", request_id, exc_info=error)
            failed[request_id] = error
            continue
        merged.request_ids += output.request_ids
        merged.sampled_token_ids += output.sampled_token_ids
        merged.logprobs += output.logprobs
        merged.num_accepted_draft_tokens += output.num_accepted_draft_tokens
        merged.draft_token_ids.update(output.draft_token_ids)
        merged.prompt_logprobs.update(output.prompt_logprobs)
    return merged, failed
