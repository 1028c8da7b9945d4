"""The benchmark workloads, deterministic from a seed.

They are defined exactly as the vLLM anchor defines them (same images, texts and lengths), so
vlmx, vLLM and transformers run the same work: structured images (a colour gradient, a flat
rectangle and +-12 noise), prompts of random words from a small vocabulary, fixed output lengths
with ignore_eos.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The anchor's word list, in its order (prompts draw from it by index).
_WORDS = [
    "the", "a", "image", "picture", "scene", "object", "colour", "left", "right", "top",
    "bottom", "describe", "compare", "count", "shape",
]  # fmt: skip


@dataclass(frozen=True)
class Workload:
    images_per_prompt: int
    image_size: tuple[int, int] | None  # (width, height); None = random-mm's mix
    output_len: int
    description: str


WORKLOADS: dict[str, Workload] = {
    "w1-multi": Workload(2, (1024, 768), 128, "2 distinct 1024x768 images, ~24 words, 128 out"),
    "w2-decode": Workload(1, (448, 448), 512, "1 image of 448x448, ~24 words, 512 out"),
    "w3-shared": Workload(2, (1024, 768), 128, "like w1, images drawn from a pool of 16"),
    "random-mm": Workload(1, None, 128, "~1000 words, one 256x256 or 720x1280 image, 128 out"),
}


def make_images(n: int, width: int, height: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.integers(-12, 12, (height + 64, width + 64, 3), dtype=np.int16)
    images = []
    for _ in range(n):
        base = rng.uniform(0, 255, 3)
        slopes = rng.uniform(-1, 1, (2, 3))
        pixels = (
            base
            + (xx[..., None] / width) * slopes[0] * 120
            + (yy[..., None] / height) * slopes[1] * 120
        )
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        pixels[y0 : y0 + height // 2, x0 : x0 + width // 2] = rng.uniform(0, 255, 3)
        oy, ox = rng.integers(0, 64, 2)
        pixels += noise[oy : oy + height, ox : ox + width]
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def prompts_for(
    name: str, num_prompts: int, seed: int = 0
) -> tuple[list[tuple[str, list[Image.Image]]], int]:
    """(question, images) per prompt, and the output length."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    wl = WORKLOADS[name]
    rng = np.random.default_rng(seed + 1)
    if name == "random-mm":
        small = make_images(num_prompts, 256, 256, seed)
        big = make_images(num_prompts, 1280, 720, seed + 7)
        pick_small = rng.random(num_prompts) < 0.5
        questions = [" ".join(rng.choice(_WORDS, 1000)) for _ in range(num_prompts)]
        return [
            (questions[i], [small[i] if pick_small[i] else big[i]]) for i in range(num_prompts)
        ], wl.output_len
    width, height = wl.image_size
    k = wl.images_per_prompt
    questions = [" ".join(rng.choice(_WORDS, 24)) for _ in range(num_prompts)]
    if name == "w3-shared":
        pool = make_images(16, width, height, seed)
        picks = rng.integers(0, 16, (num_prompts, k))
        return [
            (questions[i], [pool[j] for j in picks[i]]) for i in range(num_prompts)
        ], wl.output_len
    images = make_images(num_prompts * k, width, height, seed)
    return [(questions[i], images[i * k : (i + 1) * k]) for i in range(num_prompts)], wl.output_len


def qwen_chat_prompt(question: str, num_images: int) -> str:
    """The Qwen-VL chat prompt the anchor sends: system turn, images first, then the question."""
    placeholders = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{placeholders}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def aria_chat_prompt(question: str, num_images: int) -> str:
    """Aria's prompt (vLLM's example form): images first, then the question."""
    placeholders = "<fim_prefix><|img|><fim_suffix>\n" * num_images
    return f"<|im_start|>user\n{placeholders}{question}<|im_end|>\n<|im_start|>assistant\n"


def mllama_prompt(question: str, num_images: int) -> str:
    """Mllama's prompt (vLLM's example form): one `<|image|>` per image, then the text."""
    return "<|image|>" * num_images + "<|begin_of_text|>" + question


def phi4_prompt(question: str, num_images: int) -> str:
    """vLLM's phi4_mm example prompt: the images' tags, then the question."""
    tags = "".join(f"<|image_{i + 1}|>" for i in range(num_images))
    return f"<|user|>{tags}{question}<|end|><|assistant|>"


# model_type -> the bench's own prompt form for it (others: the checkpoint's chat template)
_PROMPT_FORMS = {
    "qwen2_vl": qwen_chat_prompt,
    "qwen2_5_vl": qwen_chat_prompt,
    "aria": aria_chat_prompt,
    "mllama": mllama_prompt,
    "phi4mm": phi4_prompt,  # the published layout
    "phi4_multimodal": phi4_prompt,  # transformers'
}


def prompt_form(model_type: str) -> Callable[[str, int], str] | None:
    """The bench's `generate` prompt form for a checkpoint of `model_type`, if it has one."""
    return _PROMPT_FORMS.get(model_type)
