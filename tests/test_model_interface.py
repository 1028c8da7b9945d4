"""`vlmx.models.interface.Model`: every registered family implements it, and its
`profile_image_features` builds encoder inputs that `encode_images` takes, worth about the
budget, at the largest image the family's processor makes by default (or the budget's)."""

from __future__ import annotations

import pytest
import torch

from tests.families import (
    aria_checkpoint,
    idefics3_checkpoint,
    pixtral_checkpoint,
    qwen_vl_checkpoint,
)
from tests.families.gemma3_checkpoint import tiny_gemma3_config
from tests.families.h2ovl_checkpoint import IMAGE_SEQ_LENGTH as H2OVL_TILE_TOKENS
from tests.families.h2ovl_checkpoint import published_config as h2ovl_published_config
from tests.families.internvl_chat_checkpoint import published_config as internvl_chat_config
from tests.families.internvl_checkpoint import tiny_internvl_config
from tests.families.llava_onevision_checkpoint import tiny_llava_onevision_config
from tests.families.mllama_checkpoint import tiny_mllama_config
from tests.families.phi3v_checkpoint import tiny_phi3v_config
from tests.families.phi4mm_checkpoint import tiny_phi4mm_config
from tests.families.qwen3_vl_checkpoint import tiny_qwen3_vl_config
from vlmx.demo.configs import tiny_qwen_vl_config
from vlmx.models.h2ovl_config import read_published_config as read_h2ovl_config
from vlmx.models.interface import Model
from vlmx.models.internvl_chat_config import read_published_config as read_internvl_chat_config
from vlmx.models.registry import get_model_class, supported_architectures

CONFIGS = {
    "Qwen2VLForConditionalGeneration": lambda: tiny_qwen_vl_config("qwen2_vl", vocab_size=512),
    "Qwen2_5_VLForConditionalGeneration": lambda: tiny_qwen_vl_config("qwen2_5_vl", 512),
    "Gemma3ForConditionalGeneration": tiny_gemma3_config,
    "Idefics3ForConditionalGeneration": lambda: idefics3_checkpoint.tiny_config("idefics3"),
    "SmolVLMForConditionalGeneration": lambda: idefics3_checkpoint.tiny_config("smolvlm"),
    "LlavaForConditionalGeneration": lambda: pixtral_checkpoint.tiny_config("llava"),
    "Mistral3ForConditionalGeneration": lambda: pixtral_checkpoint.tiny_config("mistral3"),
    "InternVLForConditionalGeneration": tiny_internvl_config,
    "LlavaOnevisionForConditionalGeneration": tiny_llava_onevision_config,
    "Qwen3VLForConditionalGeneration": tiny_qwen3_vl_config,
    "AriaForConditionalGeneration": aria_checkpoint.tiny_config,
    "MllamaForConditionalGeneration": tiny_mllama_config,
    "Phi4MultimodalForCausalLM": tiny_phi4mm_config,
    "Phi4MMForCausalLM": tiny_phi4mm_config,  # the published layout: the same model
    "Phi3VForCausalLM": tiny_phi3v_config,  # published layout only
    "QWenLMHeadModel": qwen_vl_checkpoint.tiny_config,  # Qwen-VL, published layout
    "QwenVLForConditionalGeneration": qwen_vl_checkpoint.tiny_config,
    "H2OVLChatModel": lambda: read_h2ovl_config(h2ovl_published_config()),
    "InternVLChatModel": lambda: read_internvl_chat_config(internvl_chat_config()),
}
# architecture -> embeddings of its largest image under the processor's defaults (tiny config)
LARGEST = {
    "Qwen2VLForConditionalGeneration": 35 * 35,  # 1280 tokens at most, square
    "Qwen2_5_VLForConditionalGeneration": 35 * 35,
    "Gemma3ForConditionalGeneration": None,  # one size: mm_tokens_per_image
    "Idefics3ForConditionalGeneration": 17 * idefics3_checkpoint.IMAGE_SEQ_LEN,  # 4x4 + global
    "SmolVLMForConditionalGeneration": 17 * idefics3_checkpoint.IMAGE_SEQ_LEN,
    "LlavaForConditionalGeneration": None,  # the tower's image_size, checked below
    "Mistral3ForConditionalGeneration": None,
    "InternVLForConditionalGeneration": None,  # 12 tiles + thumbnail, checked below
    # 3 x 3 tiles of 4 x 4: the 12 x 12 grid scaled to 8 x 8 (anyres_max_4), newlines, the base
    "LlavaOnevisionForConditionalGeneration": 16 + 8 * 9,
    "Qwen3VLForConditionalGeneration": 128 * 128,  # 16384 tokens at most, square
    "AriaForConditionalGeneration": aria_checkpoint.PATCH_TO_QUERY[196],  # one 980 px crop
    "MllamaForConditionalGeneration": None,  # one <|image|> row per image, whatever its size
    "Phi4MultimodalForCausalLM": 96 * 97 + 1 + 16 * 17,  # 6 x 6 crops + the global view
    "Phi4MMForCausalLM": 96 * 97 + 1 + 16 * 17,
    "Phi3VForCausalLM": 48 * 49 + 1 + 12 * 13,  # num_crops 16: 4 x 4 crops + the global view
    "QWenLMHeadModel": 256,  # one size: 256 resampler queries
    "QwenVLForConditionalGeneration": 256,
    "H2OVLChatModel": 13 * H2OVL_TILE_TOKENS,  # MSAC: 2 grids of 6 tiles + the thumbnail
    "InternVLChatModel": None,  # InternVL's model under the published names
}


def _model(architecture: str) -> Model:
    torch.manual_seed(0)
    return get_model_class(architecture)(CONFIGS[architecture]()).eval()


def test_every_registered_family_is_covered() -> None:
    assert sorted(CONFIGS) == supported_architectures()


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_family_implements_the_model_interface(architecture: str) -> None:
    model = _model(architecture)
    assert isinstance(model, Model)
    assert model.hidden_size == model.config.hidden_size
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (
        model.config.num_layers,
        model.config.num_kv_heads,
        model.config.head_dim,
    )


@pytest.mark.parametrize("budget", [1, 300, 5000])
@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_profile_image_features_feed_encode_images(architecture: str, budget: int) -> None:
    model = _model(architecture)
    features = model.profile_image_features(budget)
    assert features
    sizes = [f.num_embeds for f in features]
    if len(features) > 1:  # more than one image only while they fit the budget
        assert sum(sizes) <= budget
    assert len({f.mm_hash for f in features}) == len(features)
    weight = next(model.parameters())
    for f in features:
        for value in f.data.values():
            if value.is_floating_point():
                assert (value.device, value.dtype) == (weight.device, weight.dtype)
    with torch.no_grad():
        embeds = model.encode_images(features)
        width = model.embed_tokens(torch.zeros(1, dtype=torch.long)).shape[-1]  # hidden, or wider
    assert [tuple(e.shape) for e in embeds] == [(n, width) for n in sizes]
    largest = LARGEST[architecture]
    if largest is not None and budget >= largest:
        assert sizes[0] == largest


def test_profile_images_are_capped_by_the_budget_where_the_family_allows() -> None:
    qwen = _model("Qwen2VLForConditionalGeneration")
    assert [f.num_embeds for f in qwen.profile_image_features(100)] == [100]  # 10 x 10 tokens
    pixtral = _model("LlavaForConditionalGeneration")
    vc = pixtral.hf_config.vision_config
    side = vc.image_size // vc.patch_size
    full = side * (side + 1)  # rows of `side` tokens and a break each
    assert [f.num_embeds for f in pixtral.profile_image_features(3 * full + 1)] == [full] * 3
    assert pixtral.profile_image_features(30)[0].num_embeds == 5 * 6  # 5 rows of 5 + a break
    internvl = _model("InternVLForConditionalGeneration")
    per_tile = internvl.tokens_per_tile
    largest = 13 * per_tile  # 12 tiles and the thumbnail
    assert [f.num_embeds for f in internvl.profile_image_features(2 * largest)] == [largest] * 2
    assert internvl.profile_image_features(4 * per_tile)[0].num_embeds == 4 * per_tile
    assert internvl.profile_image_features(2 * per_tile)[0].num_embeds == per_tile
    phi4 = _model("Phi4MultimodalForCausalLM")
    grid_4x4 = 64 * 65 + 1 + 16 * 17  # 16 crops of 16 x 16 features, a separator per row
    assert [f.num_embeds for f in phi4.profile_image_features(10000)] == [9585]
    assert [f.num_embeds for f in phi4.profile_image_features(5000)] == [grid_4x4]
    assert phi4.profile_image_features(10)[0].num_embeds == 16 * 17 + 1 + 16 * 17  # 1 crop
    phi3v = _model("Phi3VForCausalLM")
    assert [f.num_embeds for f in phi3v.profile_image_features(2000)] == [36 * 37 + 1 + 12 * 13]
    assert phi3v.profile_image_features(10)[0].num_embeds == 12 * 13 + 1 + 12 * 13  # 1 crop
    gemma = _model("Gemma3ForConditionalGeneration")
    mm_tokens = gemma.mm_tokens
    assert [f.num_embeds for f in gemma.profile_image_features(1)] == [mm_tokens]
    assert len(gemma.profile_image_features(3 * mm_tokens)) == 3
    onevision = _model("LlavaOnevisionForConditionalGeneration")
    assert [f.num_embeds for f in onevision.profile_image_features(2 * 88)] == [88] * 2
    assert [f.num_embeds for f in onevision.profile_image_features(87)] == [17] * 5  # one tile
