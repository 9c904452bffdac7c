"""Compute requests on the offline engine: each prompt runs as one request of N samples (one shared prefill),
samples are fed to its ComputeSession as they finish, samples it starts (early stopping's waves) or stops are
started or stopped in the engine at once, and the
verifier (if asked) scores the finished samples with the same engine. Used by LLM.generate and LLM.chat."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Protocol

from ownllm.compute.params import ComputeParams
from ownllm.compute.strategies import ComputeSession
from ownllm.compute.verifier import verifier_params, yes_probability
from ownllm.outputs import CompletionOutput, RequestOutput
from ownllm.sampling_params import SamplingParams

VerifierPrompt = Callable[[int, str], list[int]]  # (prompt number, a sample's text) -> the verifier's prompt ids


class SampleEngine(Protocol):
    """What the driver needs of ownllm.engine.engine.Engine."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def start_samples(self, request_id: str, count: int) -> None: ...

    def stop_samples(self, request_id: str, indices: list[int]) -> None: ...

    def abort(self, request_id: str) -> None: ...


def generate_with_compute(engine: SampleEngine, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
                          compute: ComputeParams, verifier_prompt: VerifierPrompt,
                          id_prefix: str) -> list[RequestOutput]:
    """One RequestOutput per prompt with the chosen sample as its one output and the summary as `compute`."""
    sessions = {f"{id_prefix}-{p}": ComputeSession(compute) for p in range(len(prompts))}
    first_wave = ComputeSession(compute).num_started
    sample_params = replace(params, n=compute.samples, n_started=first_wave, output_kind="delta")
    outputs = {rid: [CompletionOutput(i) for i in range(compute.samples)] for rid in sessions}
    try:
        for rid, (text, ids) in zip(sessions, prompts):
            engine.add_request(rid, ids, sample_params, prompt=text)
        while engine.has_unfinished():
            for output in engine.step():
                if output.request_id in sessions:
                    _read(engine, sessions[output.request_id], outputs[output.request_id], output)
        if compute.scorer == "verifier":
            _verify(engine, list(sessions.values()), verifier_prompt, id_prefix)
    finally:
        for rid in sessions:
            engine.abort(rid)
    results = []
    for (rid, session), (text, ids) in zip(sessions.items(), prompts):
        summary = session.result()
        chosen = replace(outputs[rid][summary.chosen_index], index=0)
        results.append(RequestOutput(rid, text, ids, [chosen], finished=True, compute=summary))
    return results


def _read(engine: SampleEngine, session: ComputeSession, samples: list[CompletionOutput],
          output: RequestOutput) -> None:
    _fold(session, samples, output)
    to_stop = session.samples_to_stop()
    if to_stop:
        engine.stop_samples(output.request_id, to_stop)
    elif more := session.samples_to_start():
        engine.start_samples(output.request_id, more)


def _fold(session: ComputeSession, samples: list[CompletionOutput], output: RequestOutput) -> None:
    for delta in output.outputs:
        sample = samples[delta.index]
        sample.text += delta.text
        sample.token_ids += delta.token_ids
        sample.cumulative_logprob = delta.cumulative_logprob
        sample.finish_reason, sample.stop_reason = delta.finish_reason, delta.stop_reason
        if not delta.finished:
            session.update(delta.index, len(sample.token_ids), sample.cumulative_logprob or 0.0)
            continue
        session.finish(delta.index, sample.text, len(sample.token_ids), sample.cumulative_logprob or 0.0,
                       delta.finish_reason)


def _verify(engine: SampleEngine, sessions: list[ComputeSession], verifier_prompt: VerifierPrompt,
            id_prefix: str) -> None:
    """Scores every complete sample by the verifier's probability of "yes", all verifier requests in one batch."""
    pending = {}
    for p, session in enumerate(sessions):
        for sample in session.complete:
            request_id = f"{id_prefix}-verify-{p}-{sample.index}"
            engine.add_request(request_id, verifier_prompt(p, sample.text), verifier_params())
            pending[request_id] = sample
    try:
        while engine.has_unfinished():
            for output in engine.step():
                sample = pending.get(output.request_id)
                if sample is not None and output.finished:
                    entries = output.outputs[0].logprobs or [{}]
                    sample.score = yes_probability((lp.decoded_token or "", lp.logprob) for lp in entries[0].values())
    finally:
        for request_id in pending:
            engine.abort(request_id)
