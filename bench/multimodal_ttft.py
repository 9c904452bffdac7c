"""Time to first token for a prompt with one image (preprocessing + vision encoder + prefill): ownllm against
transformers on random-weight LLaVA and Llama 4 checkpoints, and ownllm's encoder-cache hit against a miss.

    python bench/multimodal_ttft.py [--configs tiny,large,llama4-tiny,llama4-vision] [--repeats 5] [--threads 2]
        [--llama4-vision-layers 34] [--no-write]

Configurations: "tiny" (the tests' LLaVA: CLIP 3 layers x 32 on 32x32 images, 16 image tokens, Llama 2 x 64) and
"large" (CLIP 12 layers x 768 on 224x224 images in 14x14 patches, 256 image tokens; Llama 8 layers x 1024);
"llama4-tiny" (the tests' Llama 4: vision 2 layers x 32 on 56x56 tiles, 16 rows per tile) and "llama4-vision"
(Llama 4 Scout's vision tower shape: hidden 1408, 16 heads, MLP 5632, 336x336 tiles in 14x14 patches, pixel
shuffle 0.5 to 144 rows per tile, adapter and projector 4096; --llama4-vision-layers of its 34 layers; text: Llama
4, 8 layers x 1024, MoE of 4 experts on every other layer). Built once with transformers into bench/.cache/.
float32, one request, max_tokens 1, a 640x480 photo-sized random image (Llama 4: 2x2 tiles + the global one), 24
text tokens around it. ownllm runs without the prefix cache, so a resent image still prefills in full: "miss" sends
a new image each run (encoder runs), "hit" resends the last one (its encoder output is cached). transformers: its
image processor (CLIPImageProcessorPil; for Llama 4, Llama4ImageProcessor's code over the tests' torchvision
stand-in, tests/multimodal/llama4_reference.py) + generate(max_new_tokens=1) of the same expanded prompt. Median
of the runs after a warm-up, tools taking turns run by run. Writes the "Multimodal TTFT" section of
bench/RESULTS.md unless --no-write.
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
from tests.multimodal.llama4_checkpoint import IMAGE_ID as LLAMA4_IMAGE_ID  # noqa: E402
from tests.multimodal.llama4_checkpoint import PREPROCESSOR as LLAMA4_TINY_PREPROCESSOR  # noqa: E402
from tests.multimodal.llama4_checkpoint import build_llama4  # noqa: E402
from tests.multimodal.llava_checkpoint import IMAGE_TOKEN_ID, build_llava  # noqa: E402

CONFIGS = {
    "tiny": ({}, {}),
    "large": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=14),
              dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, max_position_embeddings=1024)),
}
LLAMA4_CONFIGS = {  # name -> (vision, text, preprocessor) overrides of tests/multimodal/llama4_checkpoint.py
    "llama4-tiny": ({}, {}, {}),
    "llama4-vision": (dict(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16,
                           image_size=336, patch_size=14, vision_output_dim=4096, projector_input_dim=4096,
                           projector_output_dim=4096, initializer_range=0.02),
                      dict(hidden_size=1024, intermediate_size=1024, intermediate_size_mlp=2816, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=4,
                           interleave_moe_layer_step=2, attention_chunk_size=8192, max_position_embeddings=4096),
                      {"size": {"height": 336, "width": 336}, "max_patches": 16}),
}
TEXT = list(range(5, 17)), list(range(40, 52))


def checkpoint(name: str, vision_layers: int) -> Path:
    if name in LLAMA4_CONFIGS:
        vision, text, preprocessor = LLAMA4_CONFIGS[name]
        if name == "llama4-vision":
            vision = dict(vision, num_hidden_layers=vision_layers)
        folder = ROOT / "bench" / ".cache" / f"{name}-{vision.get('num_hidden_layers', 2)}"
        if not (folder / "config.json").exists():
            build_llama4(folder, vision=vision, text=text, preprocessor=preprocessor)
        return folder
    folder = ROOT / "bench" / ".cache" / f"llava-{name}"
    if not (folder / "config.json").exists():
        vision, text = CONFIGS[name]
        build_llava(folder, vision=vision, text=text)
    return folder


def reference(name: str, folder: Path):
    """-> (transformers' model, its preprocessing: image -> pixel_values, the prompt's image marker)."""
    if name in LLAMA4_CONFIGS:
        from transformers import Llama4ForConditionalGeneration

        from tests.multimodal.llama4_reference import hf_image_processor

        settings = LLAMA4_CONFIGS[name][2] or LLAMA4_TINY_PREPROCESSOR
        processor = hf_image_processor(**settings)
        model = Llama4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        return model, lambda image: processor(image, return_tensors="pt")["pixel_values"].float(), LLAMA4_IMAGE_ID
    from transformers import LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, lambda image: processor(image, return_tensors="pt")["pixel_values"], IMAGE_TOKEN_ID


def median_ms(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times) * 1000


def run_config(name: str, repeats: int, vision_layers: int) -> dict[str, float]:
    folder = checkpoint(name, vision_layers)
    llm = LLM(str(folder), dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=2048)
    hf, preprocess, marker = reference(name, folder)
    prompt = [1, *TEXT[0], marker, *TEXT[1]]
    # every image below is 640x480, so every one expands the prompt alike
    expanded, images = llm.engine.image_processor.process(prompt, [synthetic(640, 480)])
    num_image_tokens = sum(image.length for image in images)
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
            pixel_values = preprocess(image)
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
    parser.add_argument("--llama4-vision-layers", type=int, default=34,
                        help="layers of the llama4-vision tower (Llama 4 Scout's has 34)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave bench/RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| config | image tokens | prompt tokens | ownllm miss ms | ownllm hit ms | transformers ms | "
            "transformers / ownllm miss |", "|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        r = run_config(name, args.repeats, args.llama4_vision_layers)
        label = f"{name} ({args.llama4_vision_layers} of 34 layers)" if name == "llama4-vision" else name
        rows.append(f"| {label} | {r['image tokens']} | {r['prompt tokens']} | {r['ownllm miss']:.1f} | "
                    f"{r['ownllm hit']:.1f} | {r['transformers']:.1f} | {r['transformers'] / r['ownllm miss']:.2f}x |")
        print(rows[-1], flush=True)
    layers = f" --llama4-vision-layers {args.llama4_vision_layers}" if "llama4-vision" in args.configs else ""
    body = (f"Command: `python bench/multimodal_ttft.py --configs {args.configs} --repeats {args.repeats} --threads "
            f"{args.threads}{layers}` ({torch.get_num_threads()} threads, {torch.__version__}). Time to first token of "
            "one request with one 640x480 image (preprocessing, vision encoder, prefill), float32, median of "
            f"{args.repeats} runs after a warm-up; see the script's docstring.\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))
    if not args.no_write:
        write_section("Multimodal TTFT", body)


if __name__ == "__main__":
    main()
