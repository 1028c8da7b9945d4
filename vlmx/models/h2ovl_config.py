"""H2OVL-Mississippi's published config.json (model_type `h2ovl_chat`) -> `InternVLConfig`.

The published folder ships its own modeling code (`trust_remote_code=True`); vlmx runs none of
it. The layout, read from the public model repos:

```
architectures: ["H2OVLChatModel"], model_type: "h2ovl_chat"
vision_config: InternViT (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
               image_size, patch_size, qkv_bias, qk_normalization, norm_type, layer_norm_eps,
               hidden_act)
llm_config:    a transformers decoder config (model_type "llama" for the Mississippi models)
downsample_ratio, select_layer, ps_version ("v2"), force_image_size, template
min_dynamic_patch, max_dynamic_patch, dynamic_image_size, use_thumbnail, use_msac
```

The processor settings stay on the config as they are (`H2OVLProcessor` reads them).
"""

from __future__ import annotations

from transformers import InternVLConfig

# published processor settings kept on the config, with the published defaults
PROCESSOR_FIELDS = {
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 6,
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "use_msac": True,
}


def _vision_config(raw: dict) -> dict:
    vision = dict(raw)
    return {
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "image_size": vision.get("image_size", 448),
        "patch_size": vision.get("patch_size", 14),
        "num_channels": vision.get("num_channels", 3),
        "attention_bias": bool(vision.get("qkv_bias", True)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "use_mean_pooling": True,  # no final layer norm: the published tower has none
    }


def read_published_config(raw: dict) -> InternVLConfig:
    """config.json of the published `h2ovl_chat` layout -> `InternVLConfig` (+ its processor
    settings as attributes)."""
    if "vision_config" not in raw or "llm_config" not in raw:
        raise ValueError(
            "an h2ovl_chat config.json needs 'vision_config' and 'llm_config'; is this the "
            "published H2OVL-Mississippi layout?"
        )
    ps_version = raw.get("ps_version", "v2")
    if ps_version != "v2":
        raise ValueError(f"ps_version {ps_version!r} is not supported; vlmx runs 'v2'")
    llm = dict(raw["llm_config"])
    if "model_type" not in llm:
        raise ValueError("llm_config has no model_type; give the decoder's ('llama')")
    vision = _vision_config(raw["vision_config"])
    force = raw.get("force_image_size")
    if force is not None and force != vision["image_size"]:
        raise ValueError(
            f"force_image_size {force} differs from vision_config.image_size "
            f"{vision['image_size']}; vlmx runs tiles of the tower's image_size"
        )
    config = InternVLConfig(
        vision_config=vision,
        text_config=llm,
        downsample_ratio=raw.get("downsample_ratio", 0.5),
        vision_feature_layer=raw.get("select_layer", -1),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        architectures=list(raw.get("architectures") or ["H2OVLChatModel"]),
    )
    for name, default in PROCESSOR_FIELDS.items():
        setattr(config, name, raw.get(name, default))
    config.template = raw.get("template")
    return config
