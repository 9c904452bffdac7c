"""More inference compute per request: sample several answers and pick one (self-consistency votes, best-of-N by
mean token logprob or a verifier), with adaptive early stopping. Pure Python, no torch: the engine, the offline
LLM and the server drive it with finished samples and act on what it decides."""

from ownllm.compute.params import ComputeParams
from ownllm.compute.strategies import ComputeSession, ComputeSummary, Sample

__all__ = ["ComputeParams", "ComputeSession", "ComputeSummary", "Sample"]
