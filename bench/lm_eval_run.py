"""lm-evaluation-harness, a client nobody here wrote, against `ownllm serve` and llama-cpp-python's server on the
same GGUF (the bundled SmolLM2-135M-Instruct Q4_1), with the local tasks of bench/lm_eval_tasks/.

    pip install "torch==2.13.*" lm-eval sse-starlette starlette-context pydantic-settings
    python bench/lm_eval_run.py [--limit 20] [--servers ownllm,llama.cpp] [--no-write]

For each server it runs, with the network off (HF_*_OFFLINE):

    lm_eval --model local-completions --model_args base_url=URL/v1/completions,model=NAME,\
tokenizer_backend=huggingface,tokenizer=TOKENIZER_DIR,tokenized_requests=False \
        --tasks ownllm_arithmetic_mc,ownllm_sequence_gen --include_path bench/lm_eval_tasks --batch_size 1

where TOKENIZER_DIR holds the GGUF's own tokenizer, exported for transformers (no hub download), and the prompts
go as text (llama-cpp-python's server takes no token ids). The multiple-choice task is scored by loglikelihood:
/v1/completions with echo, logprobs 1 and max_tokens 1, the choice tokens' logprobs read from the echoed prompt.
Prints each task's score with its standard error per server and writes the "lm-evaluation-harness" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bundled_decode import write_section  # noqa: E402
from serve_load import launched  # noqa: E402

TASKS = {"ownllm_arithmetic_mc": "acc", "ownllm_sequence_gen": "exact_match"}
TOKENIZER_DIR = ROOT / "bench" / ".cache" / "lm_eval_tokenizer"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


LLAMA_CPP_ECHO_NOTE = (
    "llama.cpp's multiple-choice score through its server is not llama.cpp's: llama-cpp-python (0.3.36) echoes, "
    "for prompt token i, the logprob of that token under the distribution at position i (which predicts token "
    "i + 1) when the model adds no BOS token, as SmolLM2 does; checked on one prompt, its echoed logprobs equal "
    "row i's to 1e-6, while ownllm's prompt logprobs equal llama.cpp's own logits of row i - 1 to 0.17 (Q4_1 "
    "arithmetic differs). The row \"llama.cpp logits in process\" scores the task from those logits the way "
    "lm-eval does, and is the llama.cpp figure to compare.")


def export_tokenizer(model: Path) -> Path:
    """The GGUF's tokenizer as a transformers folder (tokenizer.json + tokenizer_config.json)."""
    from ownllm.loader import load_checkpoint

    tokenizer = load_checkpoint(str(model), None, keep_quantized=True).tokenizer
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    (TOKENIZER_DIR / "tokenizer.json").write_text(tokenizer.backend.to_str())
    eos = tokenizer.decode(tokenizer.eos_token_ids[:1], skip_special_tokens=False)
    (TOKENIZER_DIR / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "add_bos_token": False}))
    return TOKENIZER_DIR


def lm_eval_command(url: str, name: str, output: Path, limit: int | None) -> list[str]:
    model_args = ",".join([f"base_url={url}/v1/completions", f"model={name}", "tokenizer_backend=huggingface",
                           f"tokenizer={TOKENIZER_DIR}", "tokenized_requests=False", "max_retries=1", "timeout=1800"])
    command = ["lm_eval", "--model", "local-completions", "--model_args", model_args, "--tasks", ",".join(TASKS),
               "--include_path", "bench/lm_eval_tasks", "--batch_size", "1", "--output_path", str(output)]
    return command + (["--limit", str(limit)] if limit else [])


def evaluate(url: str, limit: int | None) -> dict[str, tuple[float, float]]:
    """-> {task: (score, standard error)} of lm_eval against the server at url."""
    name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    with tempfile.TemporaryDirectory() as output:
        command = lm_eval_command(url, name, Path(output), limit)
        lm_eval = Path(sys.executable).with_name("lm_eval")
        subprocess.run([str(lm_eval), *command[1:]], cwd=ROOT, env={**os.environ, **OFFLINE}, check=True)
        results = json.loads(next(Path(output).rglob("results_*.json")).read_text())["results"]
    return {task: (results[task][f"{metric},none"], results[task][f"{metric}_stderr,none"])
            for task, metric in TASKS.items()}


def llama_cpp_logits_mc(model: Path, limit: int | None) -> tuple[float, float]:
    """The multiple-choice task scored from llama.cpp's own logits, in process (llama_cpp.Llama.eval), as lm-eval
    scores it: each choice after a " ", its tokens those of the whole text past the question's -> (accuracy,
    standard error). A cross-check beside the server's answer, whose echoed logprobs are those of the next
    position (see RESULTS.md)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=512, logits_all=True, verbose=False)
    lines = (ROOT / "bench" / "lm_eval_tasks" / "arithmetic_mc.jsonl").read_text().splitlines()[:limit]
    correct = []
    for item in map(json.loads, lines):
        context_len = len(llm.tokenize(item["question"].encode(), add_bos=False))
        totals = []
        for choice in item["choices"]:
            ids = llm.tokenize(f"{item['question']} {choice}".encode(), add_bos=False)
            llm.reset()
            llm.eval(ids)
            scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)  # row i predicts token i + 1
            logprobs = scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)
            totals.append(sum(logprobs[i - 1, ids[i]] for i in range(context_len, len(ids))))
        correct.append(int(np.argmax(totals)) == item["answer"])
    accuracy = sum(correct) / len(correct)
    return accuracy, math.sqrt(accuracy * (1 - accuracy) / (len(correct) - 1))


def report(scores: dict[str, dict[str, tuple[float, float]]], limit: int | None) -> str:
    """Each score with its standard error, then each other scorer against ownllm: the difference and the combined
    standard error (they agree when the first is at most the second)."""
    lines = ["| task | metric | scored by | score ± standard error |", "|---|---|---|---|"]
    for task, metric in TASKS.items():
        lines += [f"| {task} | {metric} | {name} | {by_task[task][0]:.3f} ± {by_task[task][1]:.3f} |"
                  for name, by_task in scores.items() if task in by_task]
    if "ownllm" in scores and len(scores) > 1:
        lines += ["", "| task | ownllm against | difference | combined standard error | verdict |", "|---|---|---|---|---|"]
        for task in TASKS:
            for name, by_task in scores.items():
                if name != "ownllm" and task in by_task and task in scores["ownllm"]:
                    (a, se_a), (b, se_b) = scores["ownllm"][task], by_task[task]
                    combined = math.hypot(se_a, se_b)
                    lines.append(f"| {task} | {name} | {abs(a - b):.3f} | {combined:.3f} | "
                                 f"{'agree' if abs(a - b) <= combined else 'DIFFER'} |")
    if "llama.cpp" in scores:
        lines += ["", LLAMA_CPP_ECHO_NOTE]
    command = " ".join(["python bench/lm_eval_run.py", *sys.argv[1:]])
    header = [f"Command: `{command}`; lm-eval {_version('lm_eval')}, `--model local-completions`, the bundled "
              f"SmolLM2-135M-Instruct Q4_1 GGUF in both servers, {limit or 'all 100'} items per task, greedy; "
              "± is lm-eval's standard error.", ""]
    return "\n".join(header + lines) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="ownllm,llama.cpp")
    parser.add_argument("--limit", type=int, help="items per task (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    from ownllm.loader.resolve import bundled_model_path

    model = bundled_model_path()
    export_tokenizer(model)
    scores = {}
    for kind in args.servers.split(","):
        print(f"{kind}:", flush=True)
        with launched(kind, model, args.threads) as url:
            scores[kind] = evaluate(url, args.limit)
        print(f"  {scores[kind]}", flush=True)
    if "llama.cpp" in scores:
        scores["llama.cpp logits in process"] = {"ownllm_arithmetic_mc": llama_cpp_logits_mc(model, args.limit)}
    body = report(scores, args.limit)
    print(body)
    if not args.no_write:
        write_section("lm-evaluation-harness", body)


if __name__ == "__main__":
    main()
