"""A user's prompt -> a checked, processed prompt the engine can queue.

Tokenize (or take the given ids), load the images, run the family's processor (placeholders
expanded, one `MMFeature` per image), and check the result against the engine's limits. It reads
engine state but never changes it, so several threads may process prompts at once.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from vlmx.config import EngineConfig
from vlmx.models.interface import Processor
from vlmx.models.loader import text_config
from vlmx.models.qwen_vl_config import is_published_tokenizer, load_published_tokenizer
from vlmx.multimodal.inputs import ProcessedPrompt
from vlmx.multimodal.loader import MediaLoader

_PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}

# generation_config.json field -> SamplingParams field, as vLLM reads them for its defaults
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_tokenizer(config: EngineConfig):
    mc = config.model_config
    # NOTE: code shipped in a model folder never runs, whatever trust_remote_code says (as
    # `load_hf_config`): the tokenizers of the supported families are transformers' own. The
    # config is the one vlmx read (a published layout transformers cannot read alone: Phi-4's).
    same_folder = mc.tokenizer_path == mc.model_path
    if is_published_tokenizer(mc.tokenizer_path):  # Qwen-VL's QWenTokenizer: qwen.tiktoken
        return load_published_tokenizer(mc.tokenizer_path)
    return AutoTokenizer.from_pretrained(
        mc.tokenizer_path,
        config=mc.hf_config if same_folder else None,
        trust_remote_code=False,
        use_fast=mc.tokenizer_mode != "slow",
    )


def read_generation_config(model_path: str) -> tuple[set[int], dict[str, Any]]:
    """The checkpoint's extra eos ids, and the sampling defaults it sets (vLLM's
    `generation_config="auto"`: used when a call passes no SamplingParams)."""
    if not os.path.isfile(os.path.join(model_path, "generation_config.json")):
        return set(), {}
    config = GenerationConfig.from_pretrained(model_path)
    eos = config.eos_token_id
    eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    explicit = config.to_diff_dict()
    defaults = {
        ours: explicit[theirs]
        for theirs, ours in _GENERATION_DEFAULTS.items()
        if theirs in explicit
    }
    return eos_ids, defaults


def token_id_list(raw: Any) -> list[int]:
    hint = "tokenize with llm.get_tokenizer().encode(...) or pass 'prompt'"
    if isinstance(raw, (str, bytes)) or raw is None:
        raise ValueError(
            f"prompt_token_ids must be a list of int token ids, got {type(raw).__name__}; {hint}"
        )
    if isinstance(raw, torch.Tensor):
        raw = raw.tolist()
    ids = []
    for t in raw:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise ValueError(
                f"prompt_token_ids must be a list of int token ids, got {t!r} "
                f"({type(t).__name__}); {hint}"
            )
        ids.append(operator.index(t))
    return ids


class InputProcessor:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer,
        processor: Processor,
        media: MediaLoader,
        chunk_images: bool,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.processor = processor
        self.media = media
        # False: an image's span must be prefilled in one step (bidirectional image tokens)
        self.chunk_images = chunk_images
        # ids a prompt may hold: the text vocabulary, or more where the family embeds more
        # (Mllama's <|image|> sits past it)
        self.vocab_size = (
            getattr(processor, "input_vocab_size", None)
            or text_config(config.model_config.hf_config).vocab_size
        )

    def process(self, prompt: Any) -> tuple[str | None, ProcessedPrompt]:
        """A vLLM-style prompt (str, or dict with prompt / prompt_token_ids / multi_modal_data)
        -> its text and processed form. Raises ValueError naming what is wrong."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, Mapping):
            raise ValueError(
                f"a prompt must be a str or a dict with 'prompt' or 'prompt_token_ids', "
                f"got {type(prompt).__name__}"
            )
        unknown = set(prompt) - _PROMPT_KEYS
        if unknown:
            raise ValueError(
                f"prompt has unknown keys {sorted(unknown)}; known: {sorted(_PROMPT_KEYS)}"
            )
        text = prompt.get("prompt")
        token_ids = self._token_ids(prompt, text)
        for key in ("multi_modal_data", "mm_processor_kwargs"):
            if not isinstance(prompt.get(key) or {}, Mapping):
                raise ValueError(
                    f"{key} must be a dict (e.g. {{'image': [images]}} / {{'max_pixels': n}}), "
                    f"got {type(prompt[key]).__name__}"
                )
        images = self._images(prompt.get("multi_modal_data") or {})
        tensors = self.media.load_all(images)
        kwargs = dict(prompt.get("mm_processor_kwargs") or {})
        processed = self.processor.process(token_ids, tensors, kwargs)
        self.check_length(processed)
        return text, processed

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Prompt text -> token ids: the tokenizer's, or the processor's `encode_prompt` where
        the family's image tags are text (Phi-4's `<|image_1|>`)."""
        encode = getattr(self.processor, "encode_prompt", None) or self.tokenizer.encode
        return encode(text, add_special_tokens=add_special_tokens)

    def _token_ids(self, prompt: Mapping, text: Any) -> list[int]:
        if "prompt_token_ids" in prompt:
            token_ids = token_id_list(prompt["prompt_token_ids"])
        elif isinstance(text, str):
            token_ids = self.encode(text)
        else:
            raise ValueError("a prompt dict needs 'prompt' (str) or 'prompt_token_ids' (list[int])")
        if not token_ids:
            raise ValueError("the prompt is empty")
        for i, t in enumerate(token_ids):
            if not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"prompt_token_ids hold id {t} (at index {i}), outside the vocabulary "
                    f"(size {self.vocab_size}); tokenize with llm.get_tokenizer().encode(...)"
                )
        return token_ids

    def _images(self, mm_data: Mapping) -> list:
        unsupported = set(mm_data) - {"image"}
        if unsupported:
            raise ValueError(
                f"multi_modal_data has {sorted(unsupported)}; vlmx takes images only ('image')"
            )
        images = mm_data.get("image", [])
        if not isinstance(images, (list, tuple)):
            images = [images]
        limit = self.config.model_config.max_images_per_prompt
        if limit is not None and len(images) > limit:
            raise ValueError(
                f"prompt has {len(images)} images but limit_mm_per_prompt={{'image': {limit}}}; "
                "raise limit_mm_per_prompt or send fewer images"
            )
        return list(images)

    def check_length(self, processed: ProcessedPrompt) -> None:
        sc = self.config.scheduler_config
        hint = self.processor.shrink_images_hint
        num_tokens = len(processed.prompt_token_ids)
        num_image_tokens = sum(f.num_embeds for f in processed.mm_features)
        if num_tokens >= sc.max_model_len:
            images = ""
            advice = "raise max_model_len or shorten the prompt"
            if processed.mm_features:
                images = f" ({num_image_tokens} of them for {len(processed.mm_features)} images)"
                advice = f"raise max_model_len, send fewer images, or shrink them with {hint}"
            raise ValueError(
                f"the prompt is {num_tokens} tokens{images}, over max_model_len="
                f"{sc.max_model_len} by {num_tokens - sc.max_model_len + 1} (one token must be "
                f"left to generate); {advice}"
            )
        for feature in processed.mm_features:
            if feature.num_embeds > sc.encoder_cache_size:
                raise ValueError(
                    f"an image needs {feature.num_embeds} tokens but the encoder cache holds "
                    f"{sc.encoder_cache_size}; raise max_num_batched_tokens or shrink the image "
                    f"with {hint}"
                )
            if not self.chunk_images and feature.num_embeds > sc.max_num_batched_tokens:
                raise ValueError(
                    f"an image needs {feature.num_embeds} tokens in one step but "
                    f"max_num_batched_tokens={sc.max_num_batched_tokens}; raise it"
                )
