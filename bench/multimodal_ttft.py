"""Time to first token for a prompt with one image (preprocessing + vision encoder + prefill): ownllm against
transformers on random-weight LLaVA checkpoints, and ownllm's encoder-cache hit against a miss.

    python bench/multimodal_ttft.py [--configs tiny,large] [--repeats 5] [--threads 2]

Configurations: "tiny" (the tests' LLaVA: CLIP 3 layers x 32 on 32x32 images, 16 image tokens, Llama 2 x 64) and
"large" (CLIP 12 layers x 768 on 224x224 images in 14x14 patches, 256 image tokens; Llama 8 layers x 1024), built
once with transformers into bench/.cache/. float32, one request, max_tokens 1, a 640x480 photo-sized random
image, 24 text tokens around it. ownllm runs without the prefix cache, so a resent image still prefills in full:
"miss" sends a new image each run (encoder runs), "hit" resends the last one (its encoder output is cached).
transformers: CLIPImageProcessorPil + LlavaForConditionalGeneration.generate(max_new_tokens=1). Median of the
runs after a warm-up, tools taking turns run by run. Writes the "Multimodal TTFT" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from ownllm import LLM, SamplingParams  # noqa: E402
from tests.multimodal.images import synthetic  # noqa: E402
from tests.multimodal.llava_checkpoint import IMAGE_TOKEN_ID, build_llava  # noqa: E402

CONFIGS = {
    "tiny": ({}, {}),
    "large": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=14),
              dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, max_position_embeddings=1024)),
}
TEXT = list(range(5, 17)), list(range(40, 52))


def checkpoint(name: str) -> Path:
    folder = ROOT / "bench" / ".cache" / f"llava-{name}"
    if not (folder / "config.json").exists():
        vision, text = CONFIGS[name]
        build_llava(folder, vision=vision, text=text)
    return folder


def median_ms(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times) * 1000


def run_config(name: str, repeats: int) -> dict[str, float]:
    from transformers import LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = checkpoint(name)
    llm = LLM(str(folder), dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=2048)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = CLIPImageProcessorPil.from_pretrained(folder)
    num_image_tokens = llm.engine.image_processor.num_image_tokens(
        llm.engine.image_processor.preprocess(synthetic(8, 8)))
    prompt = [1, *TEXT[0], IMAGE_TOKEN_ID, *TEXT[1]]
    expanded = [1, *TEXT[0], *[IMAGE_TOKEN_ID] * num_image_tokens, *TEXT[1]]
    params = SamplingParams(temperature=0, max_tokens=1)
    times: dict[str, list[float]] = {"ownllm miss": [], "ownllm hit": [], "transformers": []}
    for run in range(repeats + 1):
        image = synthetic(640, 480, seed=100 + run)
        for label, img in (("ownllm miss", image), ("ownllm hit", image)):
            started = time.perf_counter()
            llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"image": img}}, params)
            times[label].append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.inference_mode():
            pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            hf.generate(torch.tensor([expanded]), pixel_values=pixel_values, max_new_tokens=1, do_sample=False,
                        pad_token_id=0)
        times["transformers"].append(time.perf_counter() - started)
    result = {label: median_ms(values) for label, values in times.items()}
    result["image tokens"] = num_image_tokens
    result["prompt tokens"] = len(expanded)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,large")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| config | image tokens | prompt tokens | ownllm miss ms | ownllm hit ms | transformers ms | "
            "transformers / ownllm miss |", "|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        r = run_config(name, args.repeats)
        rows.append(f"| {name} | {r['image tokens']} | {r['prompt tokens']} | {r['ownllm miss']:.1f} | "
                    f"{r['ownllm hit']:.1f} | {r['transformers']:.1f} | {r['transformers'] / r['ownllm miss']:.2f}x |")
        print(rows[-1], flush=True)
    body = (f"Command: `python bench/multimodal_ttft.py --configs {args.configs} --repeats {args.repeats} --threads "
            f"{args.threads}` ({torch.get_num_threads()} threads, {torch.__version__}). Time to first token of one "
            "request with one 640x480 image (preprocessing, vision encoder, prefill), float32, median of "
            f"{args.repeats} runs after a warm-up; see the script's docstring.\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))
    write_section("Multimodal TTFT", body)


if __name__ == "__main__":
    main()
