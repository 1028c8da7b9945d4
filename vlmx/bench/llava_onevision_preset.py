"""The `llava-onevision-qwen2-7b` preset: llava-hf/llava-onevision-qwen2-7b-ov-hf's published
config (SigLIP so400m without its last layer and head, Qwen2-7B, AnyRes over 384 px tiles up to
6 x 6, anyres_max_9), without weights.

The folder holds config.json, the processor's files (image processor, num_image_tokens 729,
the chat template) and a Qwen2 tokenizer whose ids 151646 / 151647 are `<image>` / `<video>`,
as the published tokenizer has them (the Qwen2 BPE vocabulary is vlmx's own copy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import (
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from vlmx.demo.tokenizer import qwen2_tokenizer_dir

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151646, 151647
_KEPT_QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 151643..151645
PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]

# The processor's chat template (llava-hf/llava-onevision-qwen2-*-ov-hf): per message its
# images, then its videos, then its texts, each after a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llava_onevision_qwen2_7b() -> LlavaOnevisionConfig:
    text = dict(
        model_type="qwen2",
        vocab_size=152128,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )


def _write_tokenizer(folder: Path) -> None:
    """The Qwen2 tokenizer with LLaVA-OneVision's added tokens."""
    source = Path(qwen2_tokenizer_dir())
    backend = json.loads((source / "tokenizer.json").read_text())
    added = [t for t in backend["added_tokens"] if t["content"] in _KEPT_QWEN_TOKENS]
    template = dict(added[0], special=True)
    added += [
        dict(template, id=IMAGE_TOKEN_ID, content="<image>"),
        dict(template, id=VIDEO_TOKEN_ID, content="<video>"),
    ]
    backend["added_tokens"] = added
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "special")}
        | {"single_word": False}
        for t in added
    }
    config["additional_special_tokens"] = []
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_llava_onevision_folder(config: LlavaOnevisionConfig, folder: Path) -> None:
    """config.json, the processor's files and the tokenizer: all but the weights."""
    config.save_pretrained(folder)
    _write_tokenizer(folder / "_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder / "_tokenizer")
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert tokenizer.convert_tokens_to_ids("<video>") == VIDEO_TOKEN_ID
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": 384, "width": 384},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=3,
            image_grid_pinpoints=config.image_grid_pinpoints,
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=729,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer")
