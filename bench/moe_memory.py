"""Memory of the MoE models: what loading maps instead of copying, and what a few decoded tokens page in.

    python bench/moe_memory.py

For each MoE checkpoint of bench/moe_decode.py (built there, cached under bench/.cache/moe/), a fresh
process loads it through `ownllm.LLM` in bfloat16 (KV cache 256 MiB) and decodes 8 tokens at batch 1. Reported from
/proc/self/status: load seconds, resident anonymous memory (copies) and file-backed memory (mapped
checkpoint pages actually read) after loading and after decoding, and the peak. Expert weights stay
views of the safetensors mapping, so the file-backed share grows only with the experts tokens use.
Results go to bench/RESULTS.md (section "MoE memory").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from bench.moe_decode import MOE_SHAPES, build  # noqa: E402

GiB = 2**30
CHILD = """
import json, sys, time, torch
torch.set_num_threads(2)
def status():
    out = {}
    for line in open('/proc/self/status'):
        key, _, value = line.partition(':')
        if key in ('RssAnon', 'RssFile', 'VmHWM'):
            out[key] = int(value.split()[0]) * 1024
    return out
from ownllm import LLM, SamplingParams
start = time.perf_counter()
llm = LLM(sys.argv[1], dtype='bfloat16', enable_prefix_caching=False, kv_cache_memory=256 * 2**20)
load_s = time.perf_counter() - start
loaded = status()
llm.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
print(json.dumps({'load_s': load_s, 'loaded': loaded, 'decoded': status()}))
"""


def main() -> None:
    lines = ["| model | checkpoint GiB | load s | after load: copied / mapped GiB | after 8 tokens: copied / mapped GiB | peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    for name, (arch, shape) in MOE_SHAPES.items():
        folder = build(name, arch, shape)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / GiB
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"{name}: {out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        line = (f"| {name} | {size:.2f} | {r['load_s']:.1f} | {r['loaded']['RssAnon'] / GiB:.2f} / "
                f"{r['loaded']['RssFile'] / GiB:.2f} | {r['decoded']['RssAnon'] / GiB:.2f} / {r['decoded']['RssFile'] / GiB:.2f} | "
                f"{r['decoded']['VmHWM'] / GiB:.2f} |")
        print(line, flush=True)
        lines.append(line)
    body = ("Command: `python bench/moe_memory.py`. One process per model, bfloat16, 8 tokens decoded at batch 1. "
            "KV cache 256 MiB. Copied: resident anonymous memory (the KV cache, fused attention weights, activations); mapped: "
            "checkpoint pages resident through the file mapping (page cache, shared, dropped under pressure).\n\n"
            + "\n".join(lines) + "\n")
    write_section("MoE memory", body)


if __name__ == "__main__":
    main()
