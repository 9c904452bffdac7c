"""transformers' Llama4ImageProcessor as the preprocessing reference, without torchvision.

transformers' Llama 4 image processor is a torchvision one, and torchvision cannot be installed beside this
transformers. Its own code (best-fit canvas, resize limits, padding, bfloat16 rescale/normalize, tiling, the global
tile) runs here unchanged; only the four torchvision primitives it calls are stood in for, each transcribed from
torchvision's source (torchvision/transforms/v2/functional/_geometry.py resize_image, pad_image, _misc.py
normalize_image): an antialiased `interpolate` on the uint8 tensor (natively in uint8 for bilinear on a CPU whose
capability names AVX2, and for bicubic; else in float32, rounded back), a constant zero pad on the right and bottom,
and (x - mean) / std in the image's dtype. Our preprocessing (ownllm/multimodal/llama4.py) is written separately.
"""

from __future__ import annotations

import enum
import importlib.util
import sys
import types

import torch
import torch.nn.functional as F


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    assert interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC), interpolation
    shape = image.shape
    channels, old_h, old_w = shape[-3:]
    new_h, new_w = size
    if (new_h, new_w) == (old_h, old_w):
        return image
    native = image.device.type == "cpu" and (
        "AVX2" in torch.backends.cpu.get_cpu_capability() if interpolation == InterpolationMode.BILINEAR else True)
    dtype = image.dtype
    image = image.reshape(-1, channels, old_h, old_w)
    need_cast = dtype not in (torch.float32, torch.float64) and not (native and dtype == torch.uint8)
    if need_cast:
        image = image.to(torch.float32)
    image = F.interpolate(image, size=[new_h, new_w], mode=interpolation.value, align_corners=False,
                          antialias=antialias)
    if need_cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            image = image.clamp_(0, 255)
        image = image.round_().to(dtype)
    return image.reshape(shape[:-3] + (channels, new_h, new_w))


def _pad(image, padding, fill=0, padding_mode="constant"):
    left, top, right, bottom = padding
    fills = fill if isinstance(fill, (list, tuple)) else [fill]
    assert padding_mode == "constant" and all(f == fills[0] for f in fills), (padding_mode, fill)
    return F.pad(image, (left, right, top, bottom), value=fills[0])


def _normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return image.sub(mean).div_(std)


def _stand_in() -> dict[str, types.ModuleType]:
    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.resize, functional.pad, functional.normalize = _resize, _pad, _normalize
    functional.InterpolationMode = InterpolationMode
    v2 = types.ModuleType("torchvision.transforms.v2")
    v2.functional = functional
    transforms = types.ModuleType("torchvision.transforms")
    transforms.v2, transforms.InterpolationMode = v2, InterpolationMode
    root = types.ModuleType("torchvision")
    root.transforms = transforms
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.v2": v2,
            "torchvision.transforms.v2.functional": functional}


def hf_image_processor(**kwargs):
    """transformers' Llama4ImageProcessor (its class, its code) over the torchvision stand-in (over torchvision
    itself where it is installed). The stand-in is in sys.modules only while transformers' module imports it, so
    nothing else in the process finds a torchvision; transformers' image_processing_backends keeps it as its `tvF`
    (where it would otherwise have none)."""
    import transformers.image_processing_backends as backends  # first: transformers looks for torchvision once
    from transformers.image_utils import PILImageResampling

    name = "transformers.models.llama4.image_processing_llama4"
    if name not in sys.modules and importlib.util.find_spec("torchvision") is None:
        modules = _stand_in()
        sys.modules.update(modules)
        try:
            importlib.import_module(name)
        finally:
            for key in modules:
                sys.modules.pop(key, None)
        backends.tvF = modules["torchvision.transforms.v2.functional"]
        backends.pil_torch_interpolation_mapping = {PILImageResampling.BILINEAR: InterpolationMode.BILINEAR,
                                                    PILImageResampling.BICUBIC: InterpolationMode.BICUBIC}
    return importlib.import_module(name).Llama4ImageProcessor(**kwargs)


def hf_pixel_values(images, **kwargs) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """-> (per image [tiles (+1), 3, tile, tile] float32, per image (rows, cols)) from transformers' code."""
    out = hf_image_processor(**kwargs)(images, return_tensors=None)
    return [p.float() for p in out["pixel_values"]], [tuple(int(v) for v in r) for r in out["aspect_ratios"]]
