"""Time to first token for a prompt with one image (preprocessing + vision encoder + prefill): ownllm against
transformers on random-weight LLaVA, Qwen2.5-VL and Llama 4 checkpoints, and ownllm's encoder-cache hit against a
miss.

    python bench/multimodal_ttft.py [--configs tiny,large,qwen2.5-vl-tiny,qwen2.5-vl-large,llama4-tiny,llama4-vision]
        [--repeats 5] [--threads 2] [--llama4-vision-layers 34] [--no-write]

Configurations: "tiny" (the tests' LLaVA: CLIP 3 layers x 32 on 32x32 images, 16 image tokens, Llama 2 x 64) and
"large" (CLIP 12 layers x 768 on 224x224 images in 14x14 patches, 256 image tokens; Llama 8 layers x 1024);
"qwen2.5-vl-tiny" (the tests' Qwen2.5-VL: a 3-block tower x 32 on 4x4 patches, at most 40x40 pixels, 25 image tokens;
Qwen2 2 x 64 with M-RoPE) and "qwen2.5-vl-large" (a tower shaped like Qwen2.5-VL's, 14x14 patches merged 2x2,
112-pixel windows, but 8 blocks x 640 with blocks 3 and 7 global; its default max pixels, so a 640x480 image is
476x644 pixels, 1564 patches, 391 image tokens; Qwen2 8 layers x 1024); "llama4-tiny" (the tests' Llama 4: vision 2
layers x 32 on 56x56 tiles, 16 rows per tile) and "llama4-vision" (Llama 4 Scout's vision tower shape: hidden 1408,
16 heads, MLP 5632, 336x336 tiles in 14x14 patches, pixel shuffle 0.5 to 144 rows per tile, adapter and projector
4096; --llama4-vision-layers of its 34 layers; text: Llama 4, 8 layers x 1024, MoE of 4 experts on every other
layer). Built once with transformers into bench/.cache/. float32, one request, max_tokens 1, a 640x480 photo-sized
random image (Llama 4: 2x2 tiles + the global one), 24 text tokens around it. ownllm runs without the prefix cache,
so a resent image still prefills in full: "miss" sends a new image each run (encoder runs), "hit" resends the last
one (its encoder output is cached). transformers: the model's PIL image processor (for Llama 4,
Llama4ImageProcessor's code over the tests' torchvision stand-in, tests/multimodal/llama4_reference.py) + its
ForConditionalGeneration.generate(max_new_tokens=1) of the same expanded prompt. Median of the runs after a warm-up,
tools taking turns run by run. Writes the "Multimodal TTFT" section of bench/RESULTS.md unless --no-write.
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
from tests.multimodal import llama4_checkpoint, llava_checkpoint, qwen2_5_vl_checkpoint  # noqa: E402

LARGE_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, max_position_embeddings=1024)
CONFIGS = {  # name: (family, vision overrides, text overrides, preprocessing overrides)
    "tiny": ("llava", {}, {}, None),
    "large": ("llava", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=14), LARGE_TEXT, None),
    "qwen2.5-vl-tiny": ("qwen2_5_vl", {}, {}, None),
    "qwen2.5-vl-large": ("qwen2_5_vl",
                         dict(depth=8, hidden_size=640, intermediate_size=1728, num_heads=10, patch_size=14,
                              window_size=112, fullatt_block_indexes=[3, 7], out_hidden_size=1024),
                         dict(LARGE_TEXT, max_position_embeddings=2048, rope_parameters={
                             "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}),
                         dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)),
    "llama4-tiny": ("llama4", {}, {}, None),
    "llama4-vision": ("llama4", dict(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16,
                           image_size=336, patch_size=14, vision_output_dim=4096, projector_input_dim=4096,
                           projector_output_dim=4096, initializer_range=0.02),
                      dict(hidden_size=1024, intermediate_size=1024, intermediate_size_mlp=2816, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=4,
                           interleave_moe_layer_step=2, attention_chunk_size=8192, max_position_embeddings=4096),
                      {"size": {"height": 336, "width": 336}, "max_patches": 16}),
}
MODULES = {"llava": llava_checkpoint, "qwen2_5_vl": qwen2_5_vl_checkpoint, "llama4": llama4_checkpoint}
TEXT = list(range(5, 17)), list(range(40, 52))


class Family:
    """How one architecture's checkpoints are built, prompted and run by transformers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.module = MODULES[name]
        self.image_token_id = self.module.IMAGE_ID if name == "llama4" else self.module.IMAGE_TOKEN_ID

    def build(self, folder: Path, vision: dict, text: dict, preprocessing: dict | None) -> None:
        if self.name == "llava":
            self.module.build_llava(folder, vision=vision, text=text)
        elif self.name == "llama4":
            self.module.build_llama4(folder, vision=vision, text=text, preprocessor=preprocessing or {})
        else:
            self.module.build_qwen2_5_vl(folder, vision=vision, text=text, preprocessing=preprocessing)

    def prompt(self) -> list[int]:
        """The prompt with one image marker, as the chat template writes it (our processor expands it)."""
        image = [self.image_token_id]
        if self.name == "qwen2_5_vl":
            image = [qwen2_5_vl_checkpoint.VISION_START_ID, *image, qwen2_5_vl_checkpoint.VISION_END_ID]
        return [1, *TEXT[0], *image, *TEXT[1]]

    def transformers(self, folder: Path, preprocessing: dict | None):
        """-> (the float32 model, image -> its keyword inputs beside the expanded prompt's ids)."""
        import transformers

        if self.name == "llama4":
            from tests.multimodal.llama4_reference import hf_image_processor

            processor = hf_image_processor(**(preprocessing or self.module.PREPROCESSOR))
            model = transformers.Llama4ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
            return model, lambda image, expanded: {
                "pixel_values": processor(image, return_tensors="pt")["pixel_values"].float()}
        if self.name == "llava":
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor

            cls = transformers.LlavaForConditionalGeneration
        else:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor

            cls = transformers.Qwen2_5_VLForConditionalGeneration
        processor = Processor.from_pretrained(folder)

        def inputs(image, expanded: list[int]) -> dict:
            result = dict(processor(image, return_tensors="pt"))
            if self.name == "qwen2_5_vl":
                result["mm_token_type_ids"] = (torch.tensor([expanded]) == self.image_token_id).int()
            return result

        return cls.from_pretrained(folder, dtype=torch.float32).eval(), inputs


def checkpoint(name: str, vision_layers: int) -> Path:
    family, vision, text, preprocessing = CONFIGS[name]
    if name == "llama4-vision":
        vision = dict(vision, num_hidden_layers=vision_layers)
    folder_name = {"llava": f"llava-{name}", "llama4": f"{name}-{vision.get('num_hidden_layers', 2)}"}.get(family, name)
    folder = ROOT / "bench" / ".cache" / folder_name
    if not (folder / "config.json").exists():
        Family(family).build(folder, vision, text, preprocessing)
    return folder


def median_ms(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times) * 1000


def run_config(name: str, repeats: int, vision_layers: int) -> dict[str, float]:
    family = Family(CONFIGS[name][0])
    folder = checkpoint(name, vision_layers)
    llm = LLM(str(folder), dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=2048)
    hf, hf_inputs = family.transformers(folder, CONFIGS[name][3])
    prompt = family.prompt()
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
            hf.generate(torch.tensor([expanded]), **hf_inputs(image, expanded), max_new_tokens=1, do_sample=False,
                        pad_token_id=0)
        times["transformers"].append(time.perf_counter() - started)
    result = {label: median_ms(values) for label, values in times.items()}
    result["image tokens"] = num_image_tokens
    result["prompt tokens"] = len(expanded)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS))
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
