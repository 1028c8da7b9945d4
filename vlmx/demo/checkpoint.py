"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints, in the two folder layouts found in the wild.

```
layout="transformers"  (save_pretrained of 4.52-4.57, or of 5.x with save_original_format=False)
  config.json                 nested: text_config {..., rope_parameters}, vision_config
  model.safetensors           model.language_model.*, model.visual.*, [lm_head.weight]
  generation_config.json
  processor_config.json, chat_template.jinja, tokenizer.json, tokenizer_config.json

layout="hub"  (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct as published)
  config.json                 flat text fields, rope_theta, rope_scaling {type: mrope, ...},
                              vision_config nested
  model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
                              model.embed_tokens.*, model.layers.*, model.norm.*, visual.*,
                              [lm_head.weight] (absent when tied, as in the 2B / 3B)
  generation_config.json, preprocessor_config.json, chat_template.json,
  tokenizer.json, tokenizer_config.json
```

Both layouts of one (family, seed, tied) hold the same model: the same logits in transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from vlmx.demo.configs import tiny_qwen_vl_config
from vlmx.demo.tokenizer import (
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    QWEN2_TOKEN_IDS,
    QWEN_VL_CHAT_TEMPLATE,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    build_once,
    qwen2_tokenizer_dir,
    vlmx_cache_dir,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
LAYOUTS = ("transformers", "hub")
DEMO_FAMILY = "qwen2_5_vl"
DEMO_MODEL_NAME = "demo-qwen2_5_vl-v2"  # bump the suffix when what is built changes
DEMO_IMAGE_NAMES = ("demo_1.png", "demo_2.png")
# The published image processors' pixel budget: 4 to 16384 merged 28x28 tokens per image.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 14 * 14 * 4 * 16384
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
ENDOFTEXT_ID = QWEN2_TOKEN_IDS["<|endoftext|>"]  # Qwen's bos_token_id and pad_token_id in configs
_ARCHITECTURES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}


def randomize_zero_params(model: torch.nn.Module, seed: int, std: float = 0.02) -> int:
    """Redraw, from N(0, std), every parameter that is all zeros (biases, LayerNorm shifts).

    A zero bias hides a missing or misnamed weight: loading nothing gives the same output as
    loading it. Norm weights initialised to ones are left as they are. Returns how many tensors
    were redrawn.
    """
    generator = torch.Generator().manual_seed(seed)
    num_redrawn = 0
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.count_nonzero() == 0:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(noise * std)
                num_redrawn += 1
    return num_redrawn


def build_tiny_model(
    family: str = DEMO_FAMILY, seed: int = 0, tied: bool = True
) -> PreTrainedModel:
    """The transformers model of `tiny_qwen_vl_config(family)`: float32, seeded, no zero tensor.

    `tied=False` gives an `lm_head` of its own (as the published 7B checkpoints have).
    """
    import transformers

    config = tiny_qwen_vl_config(family)
    if not tied:
        config.tie_word_embeddings = False
        config.text_config.tie_word_embeddings = False
    assert config.text_config.eos_token_id == EOS_TOKEN_ID
    assert (config.image_token_id, config.video_token_id) == (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)
    assert config.vision_start_token_id == VISION_START_TOKEN_ID
    assert config.vision_end_token_id == VISION_END_TOKEN_ID
    model_cls = getattr(transformers, _ARCHITECTURES[family][0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32).eval()
    randomize_zero_params(model, seed + 1)
    return model


def build_tiny_checkpoint(
    path: str | Path,
    family: str = DEMO_FAMILY,
    layout: str = "transformers",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    tied: bool = True,
) -> str:
    """Write a complete tiny checkpoint folder at `path` (created if missing) and return it.

    `tokenizer` defaults to the real Qwen2 tokenizer (`build_qwen2_tokenizer`); the hub layout
    then gets the published-style tokenizer files, a given tokenizer is written with
    `save_pretrained`.
    """
    if family not in _ARCHITECTURES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(family, seed, tied)
    if layout == "transformers":
        _save_transformers_layout(model, family, path, tokenizer)
    else:
        _save_hub_layout(model, family, path, tokenizer)
    return str(path)


def _save_transformers_layout(
    model: PreTrainedModel, family: str, path: Path, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    import transformers
    from transformers import GenerationConfig, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from vlmx.demo.tokenizer import build_qwen2_tokenizer

    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=[EOS_TOKEN_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
    )
    # NOTE: transformers 5 by default reverts its key renaming on save and writes the hub names
    # (`model.layers.*`, `visual.*`); `save_original_format=False` keeps the module names
    # (`model.language_model.*`, `model.visual.*`), as 4.52-4.57 wrote them.
    model.save_pretrained(path, save_original_format=False)
    processor_cls = getattr(transformers, _ARCHITECTURES[family][1])
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer if tokenizer is not None else build_qwen2_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)


def hub_config_dict(config: PretrainedConfig, family: str) -> dict:
    """The flat config.json of the published checkpoints, with this config's values."""
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    if family == "qwen2_vl":
        vision_json = {
            "depth": vision.depth,
            "embed_dim": vision.embed_dim,
            "mlp_ratio": vision.mlp_ratio,
            "num_heads": vision.num_heads,
            "in_chans": vision.in_channels,
            "hidden_size": vision.hidden_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "spatial_patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size,
        }
    else:
        vision_json = {
            "depth": vision.depth,
            "hidden_act": vision.hidden_act,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_heads": vision.num_heads,
            "in_chans": vision.in_channels,
            "out_hidden_size": vision.out_hidden_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "spatial_patch_size": vision.patch_size,
            "window_size": vision.window_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "tokens_per_second": vision.tokens_per_second,
            "temporal_patch_size": vision.temporal_patch_size,
        }
    return {
        "architectures": [_ARCHITECTURES[family][0]],
        "attention_dropout": text.attention_dropout,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_token_id": QWEN2_TOKEN_IDS["<|vision_pad|>"],
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": text.initializer_range,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "model_type": family,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "sliding_window": 32768,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": vision_json,
        "rope_scaling": {"type": "mrope", "mrope_section": list(rope["mrope_section"])},
        "vocab_size": text.vocab_size,
    }


def hub_weight_name(name: str) -> str:
    """transformers 5 module name -> published checkpoint name."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.visual."):
        return name.removeprefix("model.")
    assert name == "lm_head.weight", name
    return name


def _save_hub_layout(
    model: PreTrainedModel, family: str, path: Path, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    tied = model.config.tie_word_embeddings
    tensors = {
        hub_weight_name(name): tensor.detach().clone().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    # Two shards, split where half of the bytes are written (the embedding fills most of one).
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    first: dict[str, torch.Tensor] = {}
    second: dict[str, torch.Tensor] = {}
    num_bytes_written = 0
    for name in sorted(tensors, key=lambda n: (not n.startswith("model."), n)):
        (second if first and num_bytes_written >= total_size // 2 else first)[name] = tensors[name]
        num_bytes_written += tensors[name].numel() * tensors[name].element_size()
    assert first and second
    shards = (first, second)
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(path / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}

    _write_json(path / "model.safetensors.index.json", index)
    write_hub_metadata(model.config, family, path, tokenizer)


def write_hub_metadata(
    config: PretrainedConfig,
    family: str,
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Every file of a published-layout checkpoint but the weights: config.json,
    generation_config.json, preprocessor_config.json, chat_template.json and the tokenizer."""
    _write_json(path / "config.json", hub_config_dict(config, family))
    generation = {
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "do_sample": True,
        "eos_token_id": [EOS_TOKEN_ID, ENDOFTEXT_ID],
        "repetition_penalty": 1.05 if family == "qwen2_5_vl" else 1.0,
        "temperature": 0.1 if family == "qwen2_5_vl" else 0.01,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.37.0",
    }
    _write_json(path / "generation_config.json", generation)
    preprocessor = {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": config.vision_config.patch_size,
        "temporal_patch_size": config.vision_config.temporal_patch_size,
        "merge_size": config.vision_config.spatial_merge_size,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": _ARCHITECTURES[family][1],
    }
    _write_json(path / "preprocessor_config.json", preprocessor)
    _write_json(path / "chat_template.json", {"chat_template": QWEN_VL_CHAT_TEMPLATE})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        return
    source = Path(qwen2_tokenizer_dir())
    shutil.copyfile(source / "tokenizer.json", path / "tokenizer.json")
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = QWEN_VL_CHAT_TEMPLATE  # the published files carry it too
    _write_json(path / "tokenizer_config.json", tokenizer_config)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def demo_model_path() -> str:
    """The demo checkpoint (tiny Qwen2.5-VL, hub layout, seed 0), built once into
    `$VLMX_CACHE_DIR` (else `~/.cache/vlmx`) / `demo-qwen2_5_vl-v2`; later calls return at once.

    Its lm_head is untied: with random weights a tied head makes greedy decoding repeat the
    last prompt token, which reads like a bug; untied, the answer is visibly random text.
    """
    final = vlmx_cache_dir() / DEMO_MODEL_NAME

    def build(tmp: Path) -> None:
        build_tiny_checkpoint(tmp, DEMO_FAMILY, "hub", seed=0, tied=False)

    return str(build_once(final, build))


def demo_images() -> list[str]:
    """Paths of the demo PNGs shipped with the package: 640x480 and 480x640."""
    folder = Path(__file__).resolve().parent
    return [str(folder / name) for name in DEMO_IMAGE_NAMES]
