"""Where one batch-1 decode step's time goes: matmuls vs everything else, per layer and per token; the Python
layers next to the decode stack (layers/decode_stack.py), taking turns in one process.

    python bench/decode_profile.py [--model PATH] [--dtype bfloat16] [--threads 2] [--prompt-tokens 128] [--iters 200] [--rounds 3]

Loads the model with LLM, decodes after a prompt of random ids, captures one decode step's inputs (ids,
attention metadata) and times, each the median of `iters` calls after a warm-up:
  step:    the engine's whole step per token (scheduler, runner, sampler, output processing), from a stream
           (the median of `rounds` streams, the two ways alternating);
  forward: the model's forward on the captured step (all layers and the final norm);
  matmuls: every Linear of the decoder layers called alone on inputs of its step shape, back to back;
  lm_head: the logits matmul.
'everything but the layer matmuls' = forward - matmuls: the norms, RoPE, attention, residual adds, and the
Python and dispatch between them. Default model: the SmolLM2-135M shape in bf16 (bench/harness_models.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best_of(fn, iters: int) -> float:
    """Seconds per call: the median of `iters` timed calls after 10 warm-up calls."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: the SmolLM2-135M shape's bf16 HF folder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="stream timings of each way, taking turns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from ownllm import LLM, SamplingParams
    from ownllm.layers.linear import Linear

    model_path = args.model
    if model_path is None:
        from bench.harness_models import MODELS, ensure_built

        ensure_built("smollm2-135m")
        model_path = str(next(m for m in MODELS if m.shape == "smollm2-135m" and m.weights == "bf16").path())
    llm = LLM(model_path, dtype=args.dtype, enable_prefix_caching=False)
    runner = llm.runner
    model = runner.model
    rng = random.Random(0)
    prompt = [rng.randrange(100, llm.config.vocab_size - 100) for _ in range(args.prompt_tokens)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)

    stack = model.decode_stack  # layers/decode_stack.py's one-call step, or None where it does not apply
    modes = {"python layers": None, "decode stack": stack} if stack is not None else {"python layers": None}

    def step_time() -> float:
        first = None
        for _ in llm.stream_token_ids({"prompt_token_ids": prompt}, params):
            first = first or time.perf_counter()
        return (time.perf_counter() - first) / (args.new_tokens - 1)

    step_time()  # warm-up
    steps = {mode: [] for mode in modes}
    for _ in range(args.rounds):  # the two ways taking turns, so load drift hits both
        for mode, value in modes.items():
            model.decode_stack = value
            steps[mode].append(step_time())
    model.decode_stack = stack

    captured = {}
    original = type(model).forward

    def capture(self, input_ids, meta, **kwargs):
        if input_ids.shape[0] == 1 and "ids" not in captured:
            captured.update(ids=input_ids, meta=meta)
        return original(self, input_ids, meta, **kwargs)

    type(model).forward = capture
    try:
        for _ in llm.stream({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)):
            pass
    finally:
        type(model).forward = original
    ids, meta = captured["ids"], captured["meta"]

    with torch.inference_mode():
        forwards = {}
        for mode, value in modes.items():
            model.decode_stack = value
            forwards[mode] = best_of(lambda: model(ids, meta), args.iters)
        model.decode_stack = stack
        hidden = model(ids, meta)
        layer_linears = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
        inputs = [torch.randn(1, m.in_features).to(runner.dtype) for m in layer_linears]

        def matmuls():
            for m, x in zip(layer_linears, inputs):
                m(x)

        matmul = best_of(matmuls, args.iters)
        logits = best_of(lambda: model.compute_logits(hidden), args.iters)
    layers = len(model.model.layers)
    ms = 1e3
    print(f"model {model_path} ({args.dtype}), {layers} layers, {len(layer_linears)} Linear calls per step, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens")
    print(f"layer matmuls alone (each Linear called from Python): {matmul * ms:.3f} ms "
          f"({matmul / layers * 1e6:.1f} us per layer)")
    print(f"lm_head: {logits * ms:.3f} ms")
    for mode in modes:
        step, forward = statistics.median(steps[mode]), forwards[mode]
        print(f"{mode}: step per token (engine, from a stream, median of {args.rounds}) {step * ms:.3f} ms = "
              f"{1 / step:.1f} tok/s (runs: {', '.join(f'{1 / s:.1f}' for s in steps[mode])})")
        print(f"  model forward:      {forward * ms:.3f} ms")
        print(f"    everything but the layer matmuls: {(forward - matmul) * ms:.3f} ms "
              f"({(forward - matmul) / layers * 1e6:.1f} us per layer)")
        print(f"  rest of the step:   {(step - forward - logits) * ms:.3f} ms (lm_head excluded: sampler, scheduler, "
              "output processing, inputs)")


if __name__ == "__main__":
    main()
