"""Phi-3.5-vision's image processor and prompt placeholders, on the model's device.

Matches the published `Phi3VImageProcessor` (image_processing_phi3_v.py; read for its rules,
never run), op for op:

```
uint8 [3, H, W]
  --HD transform (a tall image transposed, resized, transposed back): the largest `scale`
    with scale * ceil(scale / ratio) <= num_crops (ratio = long / short side); the long side
    resized to scale * 336, the short one to int(long' / ratio) (bilinear, antialias),
    padded with 255 to a multiple of 336, centred (the odd pixel after)
    --> HD canvas [3, h*336, w*336]
  --(x / 255 - mean) / std (OpenAI CLIP)--> float32
  --global view: the canvas resized to 336 x 336 (bicubic, no antialias, float32)
pixel_values [1 + h*w, 3, 336, 336]: the global view, then the canvas' crops row-major
```

Each image becomes `num_hd_tokens(12 h, 12 w, 24)` = (h*w + 1) * 144 + 1 + (h + 1) * 12 image
tokens. The published processor writes them as negative ids (-i for image i); vlmx uses one
placeholder id (`<|image|>`, 32044, as vLLM does) and `PlaceholderRange`s.

Prompts write `<|image_1|>`, `<|image_2|>`, ... (vLLM's example, the published processor): the
text around them is tokenized chunk by chunk with the tokenizer's special tokens (the published
processor's rule: each chunk starts with the bos token where the tokenizer adds one), and each
tag becomes one placeholder that `expand` replaces. Placeholder ids in `prompt_token_ids` (one
per image, or the expansion already in place) are accepted too (Phi-4's rules, inherited).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vlmx.layers.hd_transform import num_hd_tokens
from vlmx.models.phi3v_config import IMAGE_TOKEN_ID
from vlmx.models.phi4mm_processor import IMAGE_TAG, HDEntry, Phi4MMProcessor
from vlmx.models.processing import Expansion, preprocess_in_groups
from vlmx.models.processor_settings import (
    check_processor_flags,
    first_set,
    positive_int,
    reject_unknown_kwargs,
)

IMAGE_TOKEN = "<|image|>"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, slots=True)
class Phi3VSettings:
    """The image processor's settings (num_crops: preprocessor_config.json's, else 16)."""

    crop_size: int = 336
    patch_size: int = 14
    num_crops: int = 16  # most crops per image (the global view not counted)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD


@dataclass(frozen=True, slots=True)
class HDCanvas:
    """Where an image goes on its HD canvas."""

    rows: int  # crops down
    cols: int  # crops across
    height: int  # the resized image's size, before padding
    width: int
    pad_top: int  # padding of the short side: before (top / left) and after
    pad_bottom: int
    tall: bool  # the image is taller than wide: the padding goes left / right


def hd_canvas(height: int, width: int, size: int, num_crops: int) -> HDCanvas:
    """The published `HD_transform` + `padding_336` sizes."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    tall = width < height
    long, short = (height, width) if tall else (width, height)
    ratio = long / short
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_long = scale * size
    new_short = int(new_long / ratio)
    if new_short < 1:
        raise ValueError(
            f"image of {height}x{width} pixels has too extreme an aspect ratio for "
            f"Phi-3-vision's crops (its short side would be resized to {new_short} px)"
        )
    padded = math.ceil(new_short / size) * size
    top = (padded - new_short) // 2
    bottom = padded - new_short - top
    if tall:
        return HDCanvas(scale, padded // size, new_long, new_short, top, bottom, True)
    return HDCanvas(padded // size, scale, new_short, new_long, top, bottom, False)


def image_token_count(height: int, width: int, s: Phi3VSettings) -> int:
    """Image tokens an image of `height` x `width` becomes (the published `num_img_tokens`)."""
    canvas = hd_canvas(height, width, s.crop_size, s.num_crops)
    half = s.crop_size // s.patch_size // 2
    return num_hd_tokens(canvas.rows * half, canvas.cols * half, 2 * half)


def apply_kwargs(settings: Phi3VSettings, kwargs: dict) -> Phi3VSettings:
    """`settings` updated by one set of mm_processor_kwargs, checked."""
    reject_unknown_kwargs(kwargs, ("num_crops",), "Phi-3-vision", "num_crops: most crops")
    if "num_crops" in kwargs:
        return replace(settings, num_crops=positive_int(kwargs["num_crops"], "num_crops"))
    return settings


class Phi3VProcessor(Phi4MMProcessor):
    """The processor of Phi-3.5-vision (`vlmx.models.interface.Processor`).

    ```
    text:      <|user|>\\n<|image_1|>\\n<|image_2|>\\nWhat differs?<|end|>\\n<|assistant|>\\n
    encoded:   <s> <|user|> \\n I <s> \\n I <s> \\n What ... <|assistant|> \\n   I = <|image|>
    expanded:  ... I*n1 ... I*n2 ...                                     PlaceholderRange each
    ```
    """

    shrink_images_hint = "mm_processor_kwargs={'num_crops': ...}"
    image_processor_name = "Phi3VImageProcessor"

    def configure(self, image_config: dict, processor_config: dict) -> None:
        check_processor_flags(image_config)
        default = Phi3VSettings()
        vision = self.hf_config.vision_config
        settings = Phi3VSettings(
            crop_size=vision.image_size,
            patch_size=vision.patch_size,
            num_crops=int(first_set(image_config.get("num_crops"), default.num_crops)),
            image_mean=tuple(first_set(image_config.get("image_mean"), default.image_mean)),
            image_std=tuple(first_set(image_config.get("image_std"), default.image_std)),
        )
        num_img_tokens = image_config.get("num_img_tokens")
        half = settings.crop_size // settings.patch_size // 2
        if num_img_tokens is not None and num_img_tokens != half * half:
            raise ValueError(
                f"image processor num_img_tokens {num_img_tokens} does not match the vision "
                f"tower's {settings.crop_size} px crops of {settings.patch_size} px patches "
                f"({half * half} merged tokens each); fix the checkpoint's preprocessor config"
            )
        self.settings = apply_kwargs(settings, self.engine_kwargs)
        self.image_token_id = int(getattr(self.hf_config, "image_token_id", IMAGE_TOKEN_ID))
        found = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if found != self.image_token_id:
            raise ValueError(
                f"the tokenizer's {IMAGE_TOKEN} (the published processor's special image token) "
                f"is id {found}, but the model's image placeholder is {self.image_token_id}"
            )
        self.use_normalization(settings.image_mean, settings.image_std, 1 / 255)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Prompt text -> ids, each `<|image_i|>` one placeholder; every text chunk between the
        tags tokenized with the special tokens, whatever `add_special_tokens` says: the
        published processor tokenizes the chat-rendered prompt so too (its chat template
        writes no bos token), and `llm.chat` must give `llm.generate`'s ids."""
        del add_special_tokens  # the published rule, for prompts and rendered chats alike
        numbers = [int(n) for n in IMAGE_TAG.findall(text)]
        if numbers != list(range(1, len(numbers) + 1)):
            tags = ", ".join(f"<|image_{n}|>" for n in numbers)
            raise ValueError(
                f"the prompt's image tags are [{tags}]; write <|image_1|>, <|image_2|>, ... "
                "once each, in order"
            )
        pieces = IMAGE_TAG.split(text)[::2]  # text, (number), text, ...
        ids = self.tokenizer.encode(pieces[0], add_special_tokens=True)
        for piece in pieces[1:]:
            ids += [self.image_token_id, *self.tokenizer.encode(piece, add_special_tokens=True)]
        return ids

    def prompt_settings(self, mm_processor_kwargs: dict) -> Phi3VSettings:
        return apply_kwargs(self.settings, mm_processor_kwargs)

    def num_image_tokens(self, height: int, width: int, mm_processor_kwargs: dict) -> int:
        return image_token_count(height, width, self.prompt_settings(mm_processor_kwargs or {}))

    def preprocess(self, images: list[torch.Tensor], s: Phi3VSettings) -> list[HDEntry]:
        """uint8 [3, H, W] images -> per image (pixel_values [1 + h*w, 3, S, S] (model dtype),
        hd_layout [2] int64 (rows, cols; CPU))."""
        size = s.crop_size

        def key(image: torch.Tensor) -> tuple[int, ...]:
            return tuple(image.shape[-2:])

        def run(group: tuple[int, ...], batch: torch.Tensor) -> list[HDEntry]:  # [B, 3, H, W] uint8
            c = hd_canvas(group[0], group[1], size, s.num_crops)
            if c.tall:  # resized across, as the published code does (the passes' rounding)
                across = batch.transpose(-1, -2).contiguous()  # [B, 3, W, H]
                resized = self.resize(across, c.width, c.height, "bilinear").transpose(-1, -2)
            else:
                resized = self.resize(batch, c.height, c.width, "bilinear")
            pad = (c.pad_top, c.pad_bottom, 0, 0) if c.tall else (0, 0, c.pad_top, c.pad_bottom)
            canvas = self.normalize(F.pad(resized, pad, value=255))  # [B, 3, rows*S, cols*S]
            glb = F.interpolate(canvas, size=(size, size), mode="bicubic", align_corners=False)
            b = batch.shape[0]
            crops = canvas.reshape(b, 3, c.rows, size, c.cols, size).permute(0, 2, 4, 1, 3, 5)
            crops = crops.reshape(b, c.rows * c.cols, 3, size, size)
            pixels = torch.cat([glb[:, None], crops], 1)  # [B, 1 + rows * cols, 3, S, S]
            hd_layout = torch.tensor([c.rows, c.cols], dtype=torch.int64)
            return [(p.to(self.dtype), hd_layout) for p in pixels]

        return preprocess_in_groups(images, key, self.device, run)

    def expand(self, image: torch.Tensor, output, s: Phi3VSettings) -> Expansion:
        pixels, hd_layout = output
        half = s.crop_size // s.patch_size // 2
        rows, cols = hd_layout.tolist()
        num_tokens = num_hd_tokens(rows * half, cols * half, 2 * half)
        data = {"pixel_values": pixels, "hd_layout": hd_layout}
        return Expansion([self.image_token_id] * num_tokens, 0, num_tokens, data)
