"""The published Phi-3.5-vision config.json (model_type "phi3_v", `Phi3VForCausalLM`), read as
transformers' `Phi3Config` plus the image settings, without running the folder's code.

The published file holds the Phi-3 decoder's fields flat (`rope_scaling` with type "su", i.e.
LongRoPE, `original_max_position_embeddings`), the image embedding's settings under
`embd_layer` (use_hd_transform, with_learnable_separator, hd_transform_order) and `img_processor`
(`image_dim_out`, `num_img_tokens`, `model_name` openai/clip-vit-large-patch14-336: the tower
whose sizes the published code hard-codes; `layer_idx`, default -2; `type_feature`, default
"patch"). A `vision_config` dict, where a (test) checkpoint carries one, overrides the tower's
sizes.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, Phi3Config

from vlmx.layers.phi3 import PHI3_TEXT_FIELDS

IMAGE_TOKEN_ID = 32044  # <|image|> in the published tokenizer (vLLM's placeholder)
# openai/clip-vit-large-patch14-336, as the published image embedding builds it
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)


def read_published_config(raw: dict) -> Phi3Config:
    """config.json of the published layout -> `Phi3Config` with `vision_config` (a
    `CLIPVisionConfig`), `feature_layer` and `image_dim_out` set."""
    embd = raw.get("embd_layer") or {}
    order = embd.get("hd_transform_order", "glb_sub")
    if (
        order != "sub_glb"
        or not embd.get("use_hd_transform", False)
        or not embd.get("with_learnable_separator", False)
    ):
        raise ValueError(
            f"embd_layer {embd} is not supported; vlmx runs Phi-3-vision's HD transform "
            "(use_hd_transform and with_learnable_separator true, hd_transform_order 'sub_glb')"
        )
    processor = raw.get("img_processor") or {}
    if processor.get("type_feature", "patch") != "patch":
        raise ValueError(
            f"img_processor type_feature {processor['type_feature']!r} is not supported; "
            "vlmx reads the CLIP patch features ('patch')"
        )
    vision = CLIPVisionConfig(**{**CLIP_L_336, **(raw.get("vision_config") or {})})
    dim_out = processor.get("image_dim_out", vision.hidden_size)
    if dim_out != vision.hidden_size:
        raise ValueError(
            f"img_processor image_dim_out {dim_out} differs from the CLIP tower's hidden size "
            f"{vision.hidden_size}"
        )
    config = Phi3Config(
        **{k: raw[k] for k in PHI3_TEXT_FIELDS if k in raw}, architectures=raw["architectures"]
    )
    config.vision_config = vision
    config.feature_layer = int(processor.get("layer_idx", -2))
    config.embd_layer = embd
    config.img_processor = processor
    # the image placeholder vlmx writes (the published processor writes negative ids); a
    # (test) checkpoint with a smaller vocabulary names its own
    config.image_token_id = int(raw.get("image_token_id", IMAGE_TOKEN_ID))
    return config
