"""What grammar-constrained decoding costs, and what it buys.

    python bench/structured_outputs.py [--rows 64] [--max-tokens 96] [--threads 2] [--no-write]

1. Aggregate decode tokens/s of 64 concurrent requests with a JSON schema (response_format json_schema) against
   64 unconstrained ones, on the bundled model, offline (one engine, batched), alternating, best of 3.
2. Per-token mask time (p50, p99) of llguidance on real vocabularies: Qwen2.5's (151,665 tokens, from the
   Qwen2.5-Coder-0.5B GGUF that bench/fetch_models.py fetches) and Llama 3's (128,256, from the llama-models
   package's tiktoken file): a matcher walks the tokens of schema-valid answers and the mask of each step is
   timed.
3. The schema set of tests/json_schemas.py: the share of answers that parse and validate, constrained against
   prompting alone (the schema in the prompt), on the bundled model and Qwen2.5-Coder-1.5B.
Writes the "Structured outputs" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from ownllm import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from tests.json_schemas import SCHEMAS  # noqa: E402


def prompts(llm: LLM, count: int) -> list[str]:
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"{SCHEMAS[i % len(SCHEMAS)][1]} "
                                                                          "Reply in JSON."}])
            for i in range(count)]


def throughput(llm: LLM, rows: int, max_tokens: int) -> tuple[float, float]:
    """-> (constrained, unconstrained) aggregate tokens/s, best of 3 alternating runs. Each unconstrained request
    generates exactly as many tokens as its constrained twin did (ignore_eos), so both batches thin out alike
    and only the masks differ."""
    texts = prompts(llm, rows)
    constrained = [SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS[i % len(SCHEMAS)][2])) for i in range(rows)]
    lengths = [len(o.outputs[0].token_ids) for o in llm.generate(texts, constrained)]  # also the warm-up
    free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    best = {"constrained": 0.0, "free": 0.0}
    for _ in range(3):
        for name, params in (("constrained", constrained), ("free", free)):
            start = time.perf_counter()
            outputs = llm.generate(texts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            best[name] = max(best[name], tokens / seconds)
    return best["constrained"], best["free"]


def mask_times(ll_tokenizer, encode, answers: list[tuple[dict, str]]) -> tuple[float, float, int]:
    """-> (p50 ms, p99 ms, masks) of one mask per token of each schema-valid answer."""
    import llguidance
    import llguidance.numpy
    import numpy as np

    from ownllm.structured_output.llguidance_backend import JSON_OPTIONS

    times = []
    for schema, answer in answers:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        bitmask = llguidance.numpy.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
        for token in encode(answer):
            start = time.perf_counter()
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
            times.append(time.perf_counter() - start)
            if not matcher.consume_token(token):
                break
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3, len(times)


def valid_answers(llm: LLM) -> list[tuple[dict, str]]:
    """Schema-valid answers to walk masks over: the bundled model's constrained answers."""
    params = [SamplingParams(temperature=0, max_tokens=300, structured_outputs=StructuredOutputsParams(json=schema))
              for _, _, schema in SCHEMAS]
    outputs = llm.generate(prompts(llm, len(SCHEMAS)), params)
    return [(schema, o.outputs[0].text) for (_, _, schema), o in zip(SCHEMAS, outputs)]


def vocabularies(answers) -> list[tuple[str, float, float, int]]:
    import llguidance

    rows = []
    from bench.fetch_models import fetch
    from ownllm.loader import load_checkpoint

    qwen = load_checkpoint(str(fetch("0.5b")), None, keep_quantized=True).tokenizer
    ll = llguidance.LLTokenizer(qwen.backend.to_str(), n_vocab=qwen.vocab_size, eos_token=qwen.eos_token_ids)
    rows.append(("Qwen2.5 (GGUF vocabulary)", *mask_times(ll, lambda t: qwen.encode(t, add_special_tokens=False),
                                                          answers)))
    try:
        import llguidance.tiktoken
        from llama_models.llama3.tokenizer import Tokenizer as Llama3Tokenizer
    except ImportError as error:
        print(f"Llama 3 vocabulary skipped: {error} (pip install tiktoken llama-models)")
        return rows
    llama = Llama3Tokenizer.get_instance()
    encoding = llama.model
    ll = llguidance.tiktoken.lltokenizer_from_encoding(encoding, n_vocab=encoding.n_vocab,
                                                       eos_token=encoding.encode_single_token("<|eot_id|>"))
    rows.append(("Llama 3 (tiktoken vocabulary)", *mask_times(ll, lambda t: encoding.encode(t), answers)))
    return rows


def schema_validity(model: str | None) -> tuple[str, int, int, int]:
    """-> (model, schemas, valid constrained, valid when asked in the prompt alone)."""
    import jsonschema

    llm = LLM(model, kv_cache_memory=2**28)
    constrained, prompted = 0, 0
    texts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": (
        f"{ask} Reply with only a JSON value matching this JSON schema: {json.dumps(schema)}")}])
        for _, ask, schema in SCHEMAS]
    for use_grammar in (True, False):
        params = [SamplingParams(temperature=0, max_tokens=300, structured_outputs=StructuredOutputsParams(json=schema)
                                 if use_grammar else None) for _, _, schema in SCHEMAS]
        for (_, _, schema), output in zip(SCHEMAS, llm.generate(texts, params)):
            text = output.outputs[0].text.strip().removeprefix("```json").removesuffix("```").strip()
            try:
                jsonschema.validate(json.loads(text), schema)
            except (ValueError, jsonschema.ValidationError):
                continue
            if use_grammar:
                constrained += 1
            else:
                prompted += 1
    return Path(model).name if model else "bundled SmolLM2-135M-Instruct", len(SCHEMAS), constrained, prompted


def overlap_ab(llm: LLM, rows: int, max_tokens: int, rounds: int = 2) -> None:
    from ownllm.engine.structured_output import StructuredOutputManager

    overlapped = StructuredOutputManager.bitmask_async
    variants = {"overlapped": overlapped, "engine thread": StructuredOutputManager.bitmask}
    for round_ in range(rounds):
        for name, fill in variants.items():
            StructuredOutputManager.bitmask_async = fill
            constrained, free = throughput(llm, rows, max_tokens)
            print(f"round {round_} {name}: constrained {constrained:.1f} tok/s, unconstrained {free:.1f}, "
                  f"{constrained / free:.3f}x", flush=True)
    StructuredOutputManager.bitmask_async = overlapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-1.5b", dest="big", action="store_false", help="skip Qwen2.5-Coder-1.5B's schema run")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--overlap-ab", action="store_true", help="only compare masks filled during the forward "
                        "(background thread) with masks filled on the engine thread, alternating; prints")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(kv_cache_memory=2**28)
    if args.overlap_ab:
        return overlap_ab(llm, args.rows, args.max_tokens)
    constrained, free = throughput(llm, args.rows, args.max_tokens)
    answers = valid_answers(llm)
    masks = vocabularies(answers)
    del llm
    from bench.fetch_models import fetch

    validity = [schema_validity(None)] + ([schema_validity(str(fetch("1.5b")))] if args.big else [])
    lines = [
        f"Command: `python bench/structured_outputs.py --rows {args.rows} --max-tokens {args.max_tokens} "
        f"--threads {args.threads}`.\n",
        f"{args.rows} concurrent requests on the bundled model, offline, best of 3 alternating runs: json_schema "
        f"{constrained:.1f} tok/s, unconstrained (each as long as its constrained twin) {free:.1f} tok/s: "
        f"**{constrained / free:.2f}x**.\n",
        "| vocabulary | mask p50 ms | mask p99 ms | masks timed |\n|---|---|---|---|",
        *(f"| {name} | {p50:.3f} | {p99:.3f} | {count} |" for name, p50, p99, count in masks),
        "",
        "| model | schemas | valid, constrained | valid, asked in the prompt only |\n|---|---|---|---|",
        *(f"| {model} | {n} | {ok} ({ok / n:.0%}) | {prompted} ({prompted / n:.0%}) |"
          for model, n, ok, prompted in validity),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("Structured outputs", text)


if __name__ == "__main__":
    main()
