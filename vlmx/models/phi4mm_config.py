"""The published Phi-4-multimodal config.json (model_type "phi4mm", `Phi4MMForCausalLM`), read
as transformers' `Phi4MultimodalConfig` without running the folder's code.

The published file holds the decoder's fields flat (Phi-3 names: `rope_scaling` with
type "longrope", `partial_rotary_factor`, `original_max_position_embeddings`), the image
embedding's settings under `embd_layer.image_embd_layer` (crop_size, hd_transform_order, ...),
`img_processor` (null: SigLIP-so400m-patch14-448, whose sizes its code hard-codes) and the two
adapters' settings (`vision_lora`, `speech_lora`: PEFT folders beside it). A `vision_config`
dict, where a (test) checkpoint carries one, overrides the tower's sizes.
"""

from __future__ import annotations

from transformers import Phi4MultimodalConfig, Phi4MultimodalVisionConfig

from vlmx.layers.phi3 import PHI3_TEXT_FIELDS

IMAGE_TOKEN_ID = 200010  # <|endoftext10|>, the published processor's image placeholder


def read_published_config(raw: dict) -> Phi4MultimodalConfig:
    """config.json of the published layout -> `Phi4MultimodalConfig` (the speech half left at
    its defaults: vlmx does not build it)."""
    image = (raw.get("embd_layer") or {}).get("image_embd_layer") or {}
    order = image.get("hd_transform_order", "sub_glb")
    if order != "sub_glb" or image.get("use_hd_transform", True) is False:
        raise ValueError(
            f"embd_layer.image_embd_layer hd_transform_order={order!r} / use_hd_transform="
            f"{image.get('use_hd_transform')} is not supported; vlmx runs 'sub_glb' HD crops"
        )
    processor = raw.get("img_processor")
    feature_layer = processor.get("layer_idx", -2) if isinstance(processor, dict) else -2
    vision = {
        "crop_size": image.get("crop_size", 448),
        "image_size": image.get("crop_size", 448),
        "image_token_id": IMAGE_TOKEN_ID,
        "feature_layer": feature_layer,
        **(raw.get("vision_config") or {}),
    }
    text = {k: raw[k] for k in PHI3_TEXT_FIELDS if k in raw}
    config = Phi4MultimodalConfig(
        **text,
        vision_config=Phi4MultimodalVisionConfig(**vision),
        architectures=raw["architectures"],
    )
    config.vision_lora = raw.get("vision_lora")
    config.speech_lora = raw.get("speech_lora")
    return config
