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


def assert_same_outputs(outputs: list, baseline: list, atol: float) -> None:
    """The same prompt ids and tokens as `baseline`, each step's logprobs within `atol` (for
    runs that differ only in how the engine schedules: prefix-cache hits, chunked prefill)."""
    for out, base in zip(outputs, baseline, strict=True):
        assert out.prompt_token_ids == base.prompt_token_ids
        assert out.outputs[0].token_ids == base.outputs[0].token_ids
        for a, b in zip(out.outputs[0].logprobs, base.outputs[0].logprobs):
            for token_id in b:
                assert abs(a[token_id].logprob - b[token_id].logprob) < atol


def assert_swap_changes_logprobs(ab, ba) -> None:
    """Outputs of one prompt with its two images swapped: the same token ids, other logprobs
    (the images reach the model, not only their placeholders)."""
    assert ab.prompt_token_ids == ba.prompt_token_ids
    first, second = (
        {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in (ab, ba)
    )
    assert set(first) != set(second) or max(abs(first[t] - second[t]) for t in first) > 1e-3
