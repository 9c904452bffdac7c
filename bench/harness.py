"""Comparison harness: ownllm next to transformers and llama.cpp on random-weight checkpoints of real
shapes (Llama-3.2-1B, SmolLM2-135M) and the bundled SmolLM2-135M-Instruct Q4_1 GGUF, in one run.

    python bench/harness.py                  # the full run (~28 min), writes bench/RESULTS.md
    python bench/harness.py --quick          # SmolLM2 only, 32 + 32 tokens: a try-out (~5 min)
    python bench/harness.py --models llama-3.2-1b --tools ownllm,llama.cpp
    python bench/harness.py --gpu            # ownllm and transformers on CUDA in bfloat16

Every tool x model runs in a process of its own (bench/harness_worker.py) with the same thread count,
prompt length and number of new tokens, greedy, EOS ignored. Reported: load time (process start to
first token, file in page cache), prefill and batch-1 decode tokens/s (median of repeats), aggregate
generated tokens/s with 4 and 16 sequences submitted at once, and peak RSS. The machine's read
bandwidth, measured right before and after each worker, gives the batch-1 decode limit
(bandwidth / bytes of weights read per token) and each tool's fraction of it. The full run ends with
ownllm and llama.cpp decoding batch-1 in one process, taking turns (bench/side_by_side.py), the fair
ratio for tools bound by the same bandwidth. Checkpoints are built once into bench/.cache/
(bench/harness_models.py). See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import tempfile
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness_models import MODELS, ROOT, Model, ensure_built, weight_bytes_per_token  # noqa: E402
from bench.harness_worker import RESULT_PREFIX  # noqa: E402

TOOLS = ("ownllm", "transformers", "llama.cpp")
SECTION = "Comparison harness"
WORKER = Path(__file__).with_name("harness_worker.py")
# a worker's share of the run's time, by (model shape, tool): the 1B is slow, the llama.cpp server serial
WEIGHTS = {"llama.cpp": {"smollm2-135m": 1.0, "bundled": 0.7, "llama-3.2-1b": 2.0},
           "other": {"smollm2-135m": 2.0, "bundled": 1.5, "llama-3.2-1b": 5.0}}
GRACE_S = 60  # past its budget a worker is stopped
GiB = 2**30


@dataclass
class Row:
    model: Model
    tool: str
    result: dict = field(default_factory=dict)
    bandwidth: float = 0.0  # bytes/s, around this worker's run
    other_cores: float = 0.0  # CPU cores other processes used on average during the worker
    wall_s: float = 0.0
    budget_s: float = 0.0
    retried: str = ""

    @property
    def weight(self) -> float:
        return WEIGHTS["llama.cpp" if self.tool == "llama.cpp" else "other"][self.model.shape]


def applies(model: Model, tool: str, gpu: bool) -> bool:
    """Which tool runs which file: transformers the HF folders, llama.cpp the GGUFs, ownllm the HF
    folders and the GGUFs it keeps quantized (Q8_0, Q4_K_M, the bundled Q4_1; the F16 GGUF it would only
    convert to the bf16 folder's weights)."""
    if gpu:
        return tool in ("ownllm", "transformers") and not model.is_gguf
    if tool == "transformers":
        return not model.is_gguf
    if tool == "llama.cpp":
        return model.is_gguf
    return not model.is_gguf or model.weights != "F16"


def main() -> None:
    args, settings, rows = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    for shape in dict.fromkeys(r.model.shape for r in rows):
        ensure_built(shape, hf_only=args.gpu)
    started = time.time()
    run_all(rows, settings, started + 60 * (args.minutes or (5 if args.quick else 22)))
    customized = (args.quick, args.models, args.tools, args.gpu, args.prompt_len, args.new_tokens, args.repeats)
    alternating = None if any(customized) else side_by_side(args.threads)
    body = report(rows, args, settings, time.time() - started, alternating)
    print("\n" + body)
    if args.json:
        args.json.write_text(json.dumps([
            {"model": r.model.label, "tool": r.tool, "bandwidth": r.bandwidth, "other_cores": r.other_cores,
             **r.result} for r in rows], indent=1))
    if not args.no_write and not any(customized):
        write_results(body)
        print(f"[harness] wrote section '{SECTION}' of bench/RESULTS.md")


def parse_args() -> tuple[argparse.Namespace, dict, list[Row]]:
    """-> (arguments, the settings every worker gets, the tool x model rows to run)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, 32-token prompts and 32 new tokens")
    parser.add_argument("--models", help="comma-separated filters on model labels, e.g. smollm2,1b,Q8_0")
    parser.add_argument("--tools", help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--gpu", action="store_true", help="ownllm and transformers on CUDA in bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--minutes", type=float, help="time for the whole run, shared out between the workers "
                        "(default 22, --quick 5); a worker out of time stops and reports what it finished")
    parser.add_argument("--json", type=Path, help="also write all raw results here")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    quick = args.quick
    settings = dict(prompt_len=args.prompt_len or (32 if quick else 128),
                    new_tokens=args.new_tokens or (32 if quick else 128), repeats=args.repeats or (2 if quick else 3),
                    concurrency=[4] if quick else [4, 16], threads=args.threads, device="cpu")
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu: CUDA is not available here")
        settings["device"] = "cuda"
    tools = args.tools.split(",") if args.tools else list(TOOLS)
    if unknown := set(tools) - set(TOOLS):
        parser.error(f"unknown tools {sorted(unknown)}; choose from {','.join(TOOLS)}")
    models = [m for m in MODELS if not quick or m.name.startswith("smollm2")]
    if args.models:
        filters = [f.lower() for f in args.models.split(",")]
        models = [m for m in models if any(f in m.label.lower() for f in filters)]
    rows = [Row(m, t) for m in models for t in tools if applies(m, t, args.gpu)]
    if not rows:
        parser.error("no tool x model pair left by the filters")
    if "llama.cpp" in tools and not args.gpu:
        check_llama_cpp_server()
    return args, settings, rows


def write_results(body: str) -> None:
    """Writes this harness's section of bench/RESULTS.md, which goes first in the file (the issue asks for
    the command at its top); bundled_decode.write_section then replaces just that section."""
    from bench.bundled_decode import RESULTS, write_section

    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    header = f"## {SECTION}\n"
    if header not in text:
        title, _, rest = text.partition("\n")
        RESULTS.write_text(f"{title}\n\n{header}\n" + rest.lstrip("\n"))
    write_section(SECTION, body)


def check_llama_cpp_server() -> None:
    try:
        importlib.import_module("llama_cpp.server.app")
    except ImportError as error:
        sys.exit(f"llama-cpp-python's server is not installed ({error}); install it with:\n"
                 '    pip install "torch==2.13.*" sse-starlette starlette-context pydantic-settings')


# --- running the workers --------------------------------------------------------------------------


def run_all(rows: list[Row], job: dict, deadline: float) -> None:
    """Runs every row with a share of the time left by its weight, then, while time is left, runs again
    the rows that other processes slowed most (the machine is shared) and keeps the quieter run."""
    for i, row in enumerate(rows):
        share = row.weight / sum(r.weight for r in rows[i:])
        budget = min(600.0, max(45.0, (deadline - time.time()) * share - 10))
        run_row(row, job, budget)
    for row in sorted(rows, key=lambda r: -r.other_cores):
        if row.other_cores < 0.5 or row.budget_s + 30 > deadline - time.time():
            continue
        again = Row(row.model, row.tool)
        run_row(again, job, row.budget_s)
        first, second = row.other_cores, again.other_cores
        keep_second = second < first and completeness(again) >= completeness(row)
        if keep_second:
            row.result, row.bandwidth, row.other_cores, row.wall_s = (
                again.result, again.bandwidth, again.other_cores, again.wall_s)
        row.retried = (f"ran twice, others' CPU {first:.1f} then {second:.1f} cores; "
                       f"kept the {'second' if keep_second else 'first'} run")


def completeness(row: Row) -> int:
    """How many of the measurements a row has (a rerun is kept only if it has as many)."""
    r = row.result
    return sum(1 for k in r if k.startswith("x") and not r[k].get("cut")) + len(r.get("batch1_runs", []))


def run_row(row: Row, job: dict, budget: float) -> None:
    row.budget_s = budget
    job = dict(job, tool=row.tool, path=str(row.model.path()), budget_s=budget,
               dtype="bfloat16" if not row.model.is_gguf or job["device"] != "cpu" else None)
    if row.tool == "llama.cpp":
        job["weight_bytes"] = weight_bytes_per_token(row.model)
    run_worker(row, job)
    print(f"[harness] {row.model.label} / {row.tool} ({budget:.0f} s budget, {row.wall_s:.0f} s): {brief(row)}",
          flush=True)


def run_worker(row: Row, job: dict) -> None:
    """Runs one tool x model in a fresh process group (the llama.cpp server included), stopping it at
    its time limit; the worker's last reported results are kept."""
    path = row.model.path()
    warm_page_cache(path)
    wait_for_quiet()
    bw_before = memory_bandwidth(job["device"])
    cpu_before, own_before = cpu_busy_seconds(), children_cpu_seconds()
    job["spawn_time"] = time.time()
    proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(job)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=job["budget_s"] + GRACE_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    wall = time.time() - job["spawn_time"]
    busy = cpu_busy_seconds() - cpu_before
    own = children_cpu_seconds() - own_before  # the worker and the server it waited for
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    row.result = json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else {}
    if timed_out:
        row.result.setdefault("error", f"stopped at its {job['budget_s']:.0f} s limit")
    elif not lines:
        row.result["error"] = f"worker exited with {proc.returncode} and no results"
    if row.tool == "llama.cpp":
        row.result["weight_bytes"] = job["weight_bytes"]
    row.other_cores = max(0.0, busy - own) / wall
    row.wall_s = wall
    row.bandwidth = (bw_before + memory_bandwidth(job["device"])) / 2


def warm_page_cache(path: Path) -> None:
    """Reads the model file(s) once, so load times compare loads from memory, not from disk."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            while f.read(64 * 2**20):
                pass


def cpu_busy_seconds() -> float:
    """Seconds of CPU time the whole machine spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(limit_s: float = 20.0, max_cores: float = 0.3) -> None:
    """Waits (up to limit_s) until other processes use under max_cores, as this machine is shared."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        before = cpu_busy_seconds()
        time.sleep(1.0)
        if cpu_busy_seconds() - before < max_cores:
            return


def memory_bandwidth(device: str = "cpu", tries: int = 8) -> float:
    """Best-of-`tries` read bandwidth in bytes/s: the sum of a float32 tensor far larger than any cache
    (512 MB; 4 GB on a GPU, whose bandwidth makes a smaller sum too short to time)."""
    import torch

    x = torch.ones((512 if device == "cpu" else 4096) * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(tries):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


# --- the report -----------------------------------------------------------------------------------


def brief(row: Row) -> str:
    r = row.result
    parts = [f"load {r['load_s']:.1f} s" if "load_s" in r else None,
             f"prefill {r['prefill_tps']:.0f} tok/s" if "prefill_tps" in r else None,
             f"decode {r['decode_tps']:.1f} tok/s" if "decode_tps" in r else None,
             r.get("error")]
    return ", ".join(p for p in parts if p)


def fmt(value, spec: str = ".1f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def side_by_side(threads: int) -> str | None:
    """Batch-1 decode of ownllm and llama.cpp taking turns in one process (bench/side_by_side.py, run as a
    child so its models are freed): the table rows, or None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "table.md"
        print("[harness] batch-1 side by side (bench/side_by_side.py --repeats 3)", flush=True)
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "side_by_side.py"), "--repeats", "3",
                               "--threads", str(threads), "--table-only", str(table)], cwd=ROOT)
        return table.read_text() if done.returncode == 0 and table.exists() else None


def report(rows: list[Row], args, settings: dict, elapsed: float, alternating: str | None = None) -> str:
    xs = [f"x{n}" for n in settings["concurrency"]]
    head = ["model", "weights", "tool (compute dtype)", "load s", "prefill tok/s", "decode tok/s",
            "limit tok/s", "of limit", *[f"{x} tok/s" for x in xs], f"{xs[-1]} decode tok/s", "peak RSS GiB",
            "others' CPU"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for row in rows:
        cells, row_notes = table_row(row, xs)
        table.append("| " + " | ".join(cells) + " |")
        notes += [f"- {row.model.label} / {row.tool}: {note}" for note in row_notes]
    side = [] if alternating is None else [
        "Batch-1 decode with the tools taking turns run by run in one process (bench/side_by_side.py --repeats 3, "
        "the same prompts and token counts; median of the runs after the first), so bandwidth drift hits both alike:",
        "", "| model | ownllm decode tok/s | llama.cpp decode tok/s | ownllm / llama.cpp | ownllm prefill tok/s "
        "| llama.cpp prefill tok/s |", "|---|---|---|---|---|---|", alternating.rstrip("\n"), ""]
    return "\n".join([*preamble(rows, args, settings, elapsed, xs), "", *table, "", *notes,
                      *([""] if notes else []), *side])


def table_row(row: Row, xs: list[str]) -> tuple[list[str], list[str]]:
    """A row's cells and its notes (errors, cut or skipped phases, reruns)."""
    r = row.result
    weight_bytes = r.get("weight_bytes")
    limit = row.bandwidth / weight_bytes if weight_bytes else None
    timed = r if "decode_tps" in r else r.get("first_run") or {}  # no repeats: the first run's, marked †
    mark = "" if timed is r else "†"
    decode = timed.get("decode_tps")
    last = r.get(xs[-1]) or {}
    cells = [row.model.name, row.model.weights, f"{row.tool} ({r.get('dtype', '?')})", fmt(r.get("load_s")),
             fmt(timed.get("prefill_tps"), ".0f") + (mark if timed else ""),
             fmt(decode) + (mark if decode else ""), fmt(limit),
             fmt(decode / limit if decode and limit else None, ".0%"),
             *[fmt((r.get(x) or {}).get("e2e_tps")) + ("*" if (r.get(x) or {}).get("cut") else "") for x in xs],
             fmt(last.get("decode_tps")),
             fmt(r["peak_rss"] / GiB if r.get("peak_rss") else None, ".2f")
             + (f" (GPU {r['peak_gpu_bytes'] / GiB:.2f})" if r.get("peak_gpu_bytes") else ""),
             f"{row.other_cores:.1f} cores"]
    cuts = [x for x in xs if (r.get(x) or {}).get("cut")]
    notes = [r.get("error"), r.get("note"), row.retried,
             f"{', '.join(cuts)} stopped at the time budget (*: from the tokens it had)" if cuts else None,
             f"{', '.join(r['skipped'])} not run (time budget)" if r.get("skipped") else None,
             "† prefill and decode from the first run only" if mark and timed else None]
    return cells, [n for n in notes if n]


def preamble(rows: list[Row], args, settings: dict, elapsed: float, xs: list[str]) -> list[str]:
    bandwidths = [r.bandwidth for r in rows]
    bandwidth = statistics.median(bandwidths)
    limits = []
    for model in dict.fromkeys(r.model for r in rows):
        sizes = sorted({r.result["weight_bytes"] for r in rows if r.model == model and r.result.get("weight_bytes")})
        limits += [f"{model.label} as {s / 1e9:.3f} GB/token: {bandwidth / s:.0f} tok/s" for s in sizes]
    command = " ".join(["python bench/harness.py", *sys.argv[1:]])
    return [
        f"Command: `{command}` ({elapsed / 60:.0f} min; `--quick` for a 5-minute try-out; see bench/README.md). "
        "Random-weight checkpoints of the real shapes, built once into bench/.cache/ "
        "(bench/harness_models.py); the bundled Q4_1 GGUF as shipped.",
        "",
        f"Machine: {machine(settings['device'])}; {args.threads} threads per tool. Versions: {versions()}.",
        "",
        f"Each tool x model in its own process: prompt {settings['prompt_len']} random token ids, "
        f"{settings['new_tokens']} new tokens, greedy, EOS ignored. Load: process start to first token (file "
        "already in page cache). Prefill: prompt tokens / time to first token; decode: (new tokens - 1) / the time "
        f"after it; both the median of up to {settings['repeats']} runs after the first. {' / '.join(xs)}: that many "
        "prompts submitted at once, all generated tokens / wall time (their prefills included); ownllm: one batch "
        "through its engine; transformers: one batched `generate`; llama.cpp: llama-cpp-python's OpenAI server "
        "(`--interrupt_requests False`), one streaming /v1/completions client each (it serves them one at a time). "
        f"{xs[-1]} decode: tokens generated after every sequence had its first token / the time after. Others' CPU: "
        "cores the rest of this shared machine kept busy during the worker (from ~0.3 up, its numbers are slowed, "
        "badly near 1).",
        "",
        f"Read bandwidth (float32 sum of 512 MB, best of 8, around each worker): median {bandwidth / 1e9:.1f} GB/s, "
        f"range {min(bandwidths) / 1e9:.1f}-{max(bandwidths) / 1e9:.1f}. Limit: the batch-1 decode tokens/s the "
        "bandwidth measured around that worker allows, reading every weight once per token (the tool's own weight "
        "bytes: the GGUF's tensors, or what the loaded model holds; the tied embedding once, as lm_head); "
        "of limit: decode / limit. Limits at the median bandwidth: " + "; ".join(limits) + ".",
        "",
        "Tools that read the same bytes per token are memory bound alike, so between two processes run minutes "
        "apart their batch-1 ratio moves with the bandwidth each one got (range above): compare them by `of limit`, "
        "or by the side-by-side table below, where they alternate run by run in one process.",
    ]


def machine(device: str) -> str:
    if device != "cpu":
        import torch

        return f"{torch.cuda.get_device_name()} (CUDA), host {platform.machine()}"
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, flags {' '.join(shown) or 'none of avx2/avx512/amx'}"


def versions() -> str:
    import llama_cpp
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "ownllm"], cwd=ROOT, capture_output=True, text=True)
    ownllm = (commit.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty.stdout.strip() else "")
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"llama-cpp-python {llama_cpp.__version__}, ownllm {ownllm}")


if __name__ == "__main__":
    main()
