"""Images in: what a request carries beside its token ids, and how an architecture plugs into it.

Plain data, no torch: the engine, the scheduler and the KV-cache manager read it; tensors exist only in the
model runner. An image travels as an ImageInput: its preprocessed pixel values (a numpy array), a content
hash (the encoder cache's key, mixed into the prefix cache's block hashes) and the prompt positions of its
placeholder tokens [offset, offset + length), whose input embeddings the image's embeddings replace.

The path of an image: a PIL image -> `ImagePromptProcessor.process(token_ids, images)` (the engine, when the
request is added) expands each image marker in the prompt into the model's placeholder tokens and preprocesses
the image -> ImageInputs on the Request -> the scheduler budgets encoder work per step and names the images to
encode (SchedulerOutput.encoder_inputs) -> the runner calls `model.embed_images` once per image hash, keeps the
result in its encoder cache and writes the slice a step's positions need over `model.embed_input_ids(...)`.

To add an architecture that takes images:
1. A processor: a subclass of ImagePromptProcessor in ownllm/multimodal/<arch>.py, built by
   `from_checkpoint(config, preprocessor_config, tokenizer)` (config.hf_config, and the checkpoint's
   preprocessor_config.json or what its mmproj file says), setting
   - `image_token_id`: the placeholder token whose embeddings an image replaces;
   - `prompt_token_id`: the token the chat template writes per image (default: image_token_id);
   - `max_images_per_prompt` (the default; `--limit-images-per-prompt` overrides it);
   - `bidirectional = True` when an image's placeholders attend each other both ways (Gemma 3: transformers'
     token_type_ids mask); each image then becomes ImageInput.indivisible: computed in one chunk, with
     AttentionMetadata.bidirectional marking its positions;
   and implementing `preprocess(image: PIL.Image) -> np.ndarray` (float32 pixel values, equal to the Hugging
   Face image processor's) and `num_image_tokens(pixel_values) -> int`; `replacement(num_tokens)` when the
   marker expands to more than the placeholders (e.g. begin/end-of-image tokens around them); or `expand(image)`
   when an image's placeholders come in several runs (Llama 4: one run per tile, separators between), each run
   then an ImageInput of its own with its own pixel values (one tile).
2. Its line in ownllm/multimodal/registry.py: architecture name -> (module, class).
3. On the model class (ownllm/models/<arch>.py): `embed_images(pixel_values: list[Tensor]) -> list[Tensor]`,
   each [3, H, W] in -> [num_image_tokens, hidden_size] out, in order; `embed_input_ids(input_ids [T]) -> [T,
   hidden]` when its token embeddings are not plain `model.embed_tokens` (e.g. Gemma's, scaled by sqrt(hidden):
   the image rows replace the scaled embeddings, as in transformers); and `forward` / `hidden_states` taking
   `inputs_embeds` and using them as they are (CausalLM's do: a model overriding them must not re-scale them).
   A model whose rotary positions depend on its images (Qwen2.5-VL's M-RoPE) also defines
   `mrope_positions(num_prompt_tokens, images) -> (positions [3, P], delta)`; the runner then computes them once per
   request with images and passes each step's [3, T] as AttentionMetadata.mrope_positions (worker/mrope.py).
4. Tests: tests/multimodal/llava_checkpoint.py and test_llava_parity.py are the pattern (a tiny checkpoint saved
   by transformers, its image processor's pixel values as the reference, greedy tokens and top-5 logprobs).
The engine needs nothing else: encoder budgeting (SchedulerConfig.max_num_encoder_tokens, encoder_cache_tokens),
the encoder cache, prefix-cache salting and chunked prefill through images (or up to an indivisible one) work from
ImageInput alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from ownllm.config import ModelConfig
    from ownllm.tokenizer import Tokenizer


MAX_IMAGE_BYTES = 20 * 2**20  # an encoded image over this is refused before decoding


@dataclass(frozen=True, eq=False)  # identity: pixel arrays do not compare as booleans
class ImageInput:
    """One image of a request as the engine carries it."""

    image_hash: str  # of its pixel values: the encoder cache's key and the prefix cache's salt
    offset: int  # prompt position of its first placeholder token
    length: int  # placeholder tokens, one per embedding row
    pixel_values: "np.ndarray"  # float32, what the model's embed_images takes
    # its placeholders attend each other both ways (Gemma 3), so one forward computes them all: no chunk ends
    # inside them
    indivisible: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def span(self) -> tuple[int, int, str]:
        """(offset, length, hash): what the prefix cache mixes into the blocks it covers."""
        return self.offset, self.length, self.image_hash


def hash_pixels(pixel_values: "np.ndarray") -> str:
    digest = hashlib.sha256(str(pixel_values.shape).encode())
    digest.update(pixel_values.tobytes())
    return digest.hexdigest()


class ImagePromptProcessor:
    """An architecture's image side: preprocessing, and the placeholder tokens an image becomes in the prompt."""

    image_token_id: int
    prompt_token_id: int | None = None  # None: image_token_id
    max_images_per_prompt: int = 8
    bidirectional: bool = False  # an image's placeholder tokens attend each other both ways (ImageInput.indivisible)

    @classmethod
    def from_checkpoint(cls, config: "ModelConfig", preprocessor_config: dict[str, Any],
                        tokenizer: "Tokenizer") -> "ImagePromptProcessor":
        raise NotImplementedError

    def preprocess(self, image: "Image.Image") -> "np.ndarray":
        raise NotImplementedError

    def num_image_tokens(self, pixel_values: "np.ndarray") -> int:
        raise NotImplementedError

    def replacement(self, num_tokens: int) -> list[int]:
        """The tokens one image marker becomes; the image_token_id ones among them get its embeddings."""
        return [self.image_token_id] * num_tokens

    @property
    def marker_token_id(self) -> int:
        return self.image_token_id if self.prompt_token_id is None else self.prompt_token_id

    def process(self, token_ids: Sequence[int], images: Sequence[Any]) -> tuple[list[int], list[ImageInput]]:
        """A prompt with one marker token per image, and the images (PIL) -> (the expanded prompt, its images)."""
        from ownllm.multimodal.image_io import as_image

        if len(images) > self.max_images_per_prompt:
            limit = self.max_images_per_prompt
            raise ValueError(f"the model accepts at most {limit} image{'' if limit == 1 else 's'} per prompt "
                             f"(--limit-images-per-prompt), got {len(images)}")
        num_markers = sum(1 for t in token_ids if t == self.marker_token_id)
        if num_markers != len(images):
            raise ValueError(f"the prompt has {num_markers} image placeholders but {len(images)} images were given")
        out: list[int] = []
        inputs: list[ImageInput] = []
        pending = iter(images)
        for token in token_ids:
            if token != self.marker_token_id:
                out.append(token)
                continue
            tokens, items = self.expand(as_image(next(pending)))
            runs = placeholder_runs(tokens, self.image_token_id)
            if len(runs) != len(items):
                raise ValueError(f"an image expanded to {len(runs)} runs of placeholder tokens for {len(items)} "
                                 "encoder inputs")
            for (first, length), pixel_values in zip(runs, items):
                inputs.append(ImageInput(hash_pixels(pixel_values), len(out) + first, length, pixel_values,
                                         self.bidirectional))
            out += tokens
        return out, inputs

    def expand(self, image: "Image.Image") -> tuple[list[int], list["np.ndarray"]]:
        """One image -> the tokens its marker becomes, and the pixel values for each run of image_token_id among
        them, in order (one run unless the architecture interleaves other tokens, e.g. Llama 4's tile
        separators: each run is then an encoder input of its own)."""
        pixel_values = self.preprocess(image)
        return self.replacement(self.num_image_tokens(pixel_values)), [pixel_values]


def placeholder_runs(tokens: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of token_id in tokens."""
    runs: list[tuple[int, int]] = []
    for index, token in enumerate(tokens):
        if token != token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs
