"""What the family tests share: a checkpoint folder's `ModelConfig` as the engine reads it, the
family's processor built as the engine builds it (with the checkpoint's tokenizer), and the demo's
structured images as uint8 tensors."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from transformers import AutoTokenizer

from tests.hf_reference import compare_with_reference
from vlmx.config import ModelConfig
from vlmx.demo.images import structured_image
from vlmx.models.loader import load_hf_config


def checkpoint_model_config(
    path: str, mm_processor_kwargs: dict | None = None, dtype: torch.dtype = torch.float32
) -> ModelConfig:
    """The folder's config through vlmx's reader (`load_hf_config`), max_model_len 32768."""
    hf_config = load_hf_config(path)
    return ModelConfig(
        model=path,
        model_path=path,
        tokenizer_path=path,
        tokenizer_mode="auto",
        trust_remote_code=False,
        hf_config=hf_config,
        architecture=hf_config.architectures[0],
        dtype=dtype,
        max_model_len=32768,
        mm_processor_kwargs=mm_processor_kwargs or {},
    )


def engine_processor(processor_cls, config: ModelConfig, device: str = "cpu"):
    """`processor_cls` as the engine builds it: with the checkpoint's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
    return processor_cls(config, tokenizer, torch.device(device))


def image_tensor(height: int, width: int, variant: int) -> torch.Tensor:
    """uint8 [3, H, W] of the demo's structured image of that size and variant."""
    pil = structured_image(width, height, variant)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()


def data_url(image) -> str:
    """A PIL image as a PNG data URL, as a client sends it."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_conversation(images: list, question: str) -> list[dict]:
    """One user turn: the images as data-URL parts, then the question."""
    content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


def check_generate_and_chat(llm, ref, batch: list, generated: list, question: str, params) -> None:
    """`generated` (llm.generate over `batch`'s (prompt, images)) runs to max_tokens and matches
    the reference; `llm.chat` over the same images and question gives the same prompt ids and
    tokens and matches the reference too."""
    chat = llm.chat(
        [image_conversation(images, question) for _, images in batch], params, use_tqdm=False
    )
    for (prompt, images), g, c in zip(batch, generated, chat, strict=True):
        assert len(g.outputs[0].token_ids) == params.max_tokens
        compare_with_reference(ref, prompt, images, g)
        assert c.prompt_token_ids == g.prompt_token_ids
        assert c.outputs[0].token_ids == g.outputs[0].token_ids
        compare_with_reference(ref, prompt, images, c)
