"""ownllm: run open-weight LLMs on your own machine.

    from ownllm import LLM, SamplingParams
    llm = LLM()  # the bundled SmolLM2-135M-Instruct, or LLM("path/or/hub-id/or/file.gguf")
    print(llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text)
"""

from ownllm.compute import ComputeParams
from ownllm.outputs import CompletionOutput, Logprob, RequestOutput
from ownllm.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "ComputeParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: it pulls in torch
        from ownllm.engine.llm import LLM

        return LLM
    raise AttributeError(name)
