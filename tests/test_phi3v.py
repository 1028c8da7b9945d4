"""Phi-3.5-vision (published layout, model_type phi3_v) against transformers'
`CLIPVisionModel` + `Phi3ForCausalLM` with the published HD transform written here, on a tiny
random checkpoint: the HD image processor, the image features, and the engine (generate, chat,
prefix caching, chunked prefill) with 2 and 3 images of different sizes.

Runs on VLMX_TEST_DEVICE / VLMX_TEST_DTYPE (float32 CPU by default; the reference stays float32
on the CPU).
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from transformers import AutoTokenizer

from tests.families.phi3v_checkpoint import (
    IMAGE_TOKEN_ID,
    PREPROCESSOR,
    build_phi3v_checkpoint,
    load_reference_modules,
)
from tests.family_helpers import (
    assert_same_outputs,
    assert_swap_changes_logprobs,
    check_generate_and_chat,
    image_tensor,
)
from tests.family_helpers import checkpoint_model_config as model_config
from tests.hf_reference import TEST_ATOL, TEST_DEVICE, TEST_DTYPE, compare_with_reference
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.layers.phi3 import PhiRope
from vlmx.models.loader import iterate_weights, load_hf_config
from vlmx.models.phi3v import Phi3VForCausalLM
from vlmx.models.phi3v_processor import Phi3VProcessor, image_token_count

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
PIXEL_ATOL = 1e-5
FEATURE_ATOL = 1e-4
# (height, width): small, square, wide, tall, odd, past the crop limit, extreme aspect
SIZES = [(20, 30), (336, 336), (300, 500), (700, 460), (37, 91), (1000, 3000), (40, 1400),
         (901, 449)]  # fmt: skip
TAG = re.compile(r"<\|image_\d+\|>")
MEAN = torch.tensor(PREPROCESSOR["image_mean"]).view(3, 1, 1)
STD = torch.tensor(PREPROCESSOR["image_std"]).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------
# The reference: the published processor's and image embedding's rules, on HF's modules


def reference_preprocess(image, num_crops: int) -> tuple[torch.Tensor, list[int], int]:
    """PIL image -> (pixel_values [1 + h*w, 3, 336, 336], [H, W] of the canvas, tokens), as the
    published `Phi3VImageProcessor` (HD_transform, padding_336) computes them; the resize is
    torchvision's on the uint8 tensor (bilinear, antialias: PIL's filter, which the published
    code runs, in torch's fixed-point rounding; PIL's own rounds up to 1 level apart)."""
    img = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # [3, H, W]
    trans = img.shape[2] < img.shape[1]
    if trans:
        img = img.transpose(1, 2)
    height, width = img.shape[1:]
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = TF.resize(img, [new_h, new_w], antialias=True)
    tar = int(np.ceil(new_h / 336) * 336)
    top = int((tar - new_h) / 2)
    img = TF.pad(img, [0, top, 0, tar - new_h - top], fill=255)
    if trans:
        img = img.transpose(1, 2)
    hd = (img.float() / 255 - MEAN) / STD  # ToTensor + Normalize
    glb = F.interpolate(hd[None], size=(336, 336), mode="bicubic")
    h, w = hd.shape[1:]
    crops = hd.reshape(1, 3, h // 336, 336, w // 336, 336).permute(0, 2, 4, 1, 3, 5)
    pixels = torch.cat([glb, crops.reshape(-1, 3, 336, 336)])
    tokens = int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12)
    return pixels, [h, w], tokens


def merge_2x2_hd(x: torch.Tensor, hc: int, wc: int) -> torch.Tensor:
    """The published `reshape_hd_patches_2x2merge`: [hc*wc, L, C] -> [1, hc*12, wc*12, 4C]."""
    _, length, c = x.shape
    side = int(length**0.5)
    x = x.reshape(-1, side, side, c).reshape(-1, side // 2, 2, side // 2, 2, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, (side // 2) ** 2, 4 * c)
    x = x.reshape(1, hc, wc, side // 2, side // 2, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(1, hc * side // 2, wc * side // 2, 4 * c)


class Phi3VReference:
    """HF's CLIPVisionModel and Phi3ForCausalLM with the published HD embedding: image i's
    tokens are -i ids in the published processor (here: the placeholder id, for comparing),
    the text chunks around the tags tokenized each with the special tokens."""

    def __init__(self, path: str) -> None:
        self.clip, self.hd, self.lm = load_reference_modules(path)
        # as the engine loads it: the config vlmx read (transformers has no phi3_v and the
        # folder's auto_map would ask to run its code)
        self.tokenizer = AutoTokenizer.from_pretrained(path, config=load_hf_config(path))
        self.processor = SimpleNamespace(
            apply_chat_template=self.tokenizer.apply_chat_template, tokenizer=self.tokenizer
        )
        self.num_crops = PREPROCESSOR["num_crops"]

    def chat_prompt(self, num_images: int, question: str) -> str:
        tags = "\n".join(f"<|image_{i + 1}|>" for i in range(num_images))
        return f"<|user|>\n{tags}\n{question}<|end|>\n<|assistant|>\n"

    def inputs(self, prompt: str, images: list) -> dict:
        chunks = [self.tokenizer(c).input_ids for c in TAG.split(prompt)]
        processed = [reference_preprocess(im, self.num_crops) for im in images]
        assert len(chunks) == len(images) + 1
        ids = list(chunks[0])
        for i, ((_, _, n), chunk) in enumerate(zip(processed, chunks[1:]), start=1):
            ids += [-i] * n + chunk
        return {"input_ids": torch.tensor([ids]), "images": processed}

    def hd_features(self, processed: list) -> torch.Tensor:
        """The published `hd_feature_transform` over each image: [sum n_i, hidden]."""
        out = []
        for pixels, (h, w), _ in processed:
            feats = self.clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            hc, wc = h // 336, w // 336
            glb = self.newline(merge_2x2_hd(feats[:1], 1, 1))
            sub = self.newline(merge_2x2_hd(feats[1 : 1 + hc * wc], hc, wc))
            tokens = torch.cat([sub[0], self.hd.glb_GN[0], glb[0]])
            out.append(self.hd.img_projection(tokens))
        return torch.cat(out)

    def newline(self, x: torch.Tensor) -> torch.Tensor:
        """[1, h, w, 4C] -> [1, h * (w + 1), 4C]: sub_GN closing each row."""
        sep = self.hd.sub_GN.expand(1, x.shape[1], -1, -1)
        return torch.cat([x, sep], dim=2).reshape(1, -1, x.shape[-1])

    def forward_logits(self, ids: torch.Tensor, processed: list) -> torch.Tensor:
        embeds = self.lm.model.embed_tokens(ids.clamp_min(0))  # [1, T, hidden]
        if processed:
            embeds[ids < 0] = self.hd_features(processed)
        return self.lm(inputs_embeds=embeds).logits[0]

    @staticmethod
    def placeholder_ids(ids: torch.Tensor) -> list[int]:
        return [IMAGE_TOKEN_ID if t < 0 else t for t in ids[0].tolist()]

    @torch.inference_mode()
    def logprobs(self, prompt: str, images: list, output_ids: list[int]):
        inputs = self.inputs(prompt, images)
        ids = inputs["input_ids"]
        full = torch.cat([ids, torch.tensor([output_ids[:-1]], dtype=ids.dtype)], dim=1)
        logits = self.forward_logits(full, inputs["images"])
        n = ids.shape[1]
        return self.placeholder_ids(ids), torch.log_softmax(logits[n - 1 :].float(), dim=-1)

    @torch.inference_mode()
    def greedy(self, prompt: str, images: list, max_new_tokens: int) -> list[int]:
        inputs = self.inputs(prompt, images)
        ids, out = inputs["input_ids"], []
        for _ in range(max_new_tokens):
            full = torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], dim=1)
            out.append(int(self.forward_logits(full, inputs["images"])[-1].argmax()))
        return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_phi3v_checkpoint(tmp_path_factory.mktemp("phi3v"))


@pytest.fixture(scope="module")
def ref(ckpt) -> Phi3VReference:
    return Phi3VReference(ckpt)


def new_processor(path: str, mm_processor_kwargs: dict | None = None) -> Phi3VProcessor:
    config = model_config(path, mm_processor_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, config=config.hf_config)
    return Phi3VProcessor(config, tokenizer, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Processor


@pytest.mark.parametrize("num_crops", [None, 16, 1])
def test_processor_matches_reference(ckpt, num_crops) -> None:
    kwargs = {} if num_crops is None else {"num_crops": num_crops}
    processor = new_processor(ckpt)
    settings = processor.prompt_settings(kwargs)
    for i, (h, w) in enumerate(SIZES):
        image = image_tensor(h, w, i)
        entry = processor.preprocess([image], settings)[0]
        expansion = processor.expand(image, entry, settings)
        pixels, (ch, cw), tokens = reference_preprocess(
            structured_image(w, h, i), num_crops or PREPROCESSOR["num_crops"]
        )
        ours = expansion.data["pixel_values"]
        assert ours.shape == pixels.shape, (h, w)
        diff = (ours - pixels).abs().max().item()
        assert diff < PIXEL_ATOL, (h, w, diff)
        assert expansion.data["hd_layout"].tolist() == [ch // 336, cw // 336]
        assert expansion.length == tokens == image_token_count(h, w, settings)


def test_prompt_tags_and_kwargs(ckpt, ref) -> None:
    processor = new_processor(ckpt, {"num_crops": 2})
    prompt = ref.chat_prompt(2, QUESTION)
    ids = processor.encode_prompt(prompt)
    assert ids.count(IMAGE_TOKEN_ID) == 2
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 3  # each text chunk starts with <s>
    images = [image_tensor(900, 1400, 1), image_tensor(100, 120, 2)]
    out = processor.process(ids, images, {})
    # num_crops 2: scale 2 would take 2 * ceil(2 / 1.56) = 4 crops, so one crop each
    assert [f.data["pixel_values"].shape[0] for f in out.mm_features] == [2, 2]
    wide = processor.process(ids, images, {"num_crops": 16})  # per prompt: 3 x 4, 4 x 4
    assert [f.data["pixel_values"].shape[0] for f in wide.mm_features] == [13, 17]
    assert out.mm_features[0].mm_hash != wide.mm_features[0].mm_hash
    expanded = processor.process(out.prompt_token_ids, images, {})  # the expansion kept
    assert expanded.prompt_token_ids == out.prompt_token_ids


def test_processor_errors(ckpt) -> None:
    config = model_config(ckpt)
    config.hf_config.image_token_id = IMAGE_TOKEN_ID - 1
    with pytest.raises(ValueError, match="special image token"):
        Phi3VProcessor(config, AutoTokenizer.from_pretrained(ckpt, config=config.hf_config), "cpu")
    processor = new_processor(ckpt)
    with pytest.raises(ValueError, match="in order"):
        processor.encode_prompt("<|image_2|><|image_1|>")
    ids = processor.encode_prompt("<|user|>\n<|image_1|>\nx<|end|>\n")
    with pytest.raises(ValueError, match="num_crops"):
        processor.process(ids, [image_tensor(50, 50, 0)], {"dynamic_hd": 3})
    with pytest.raises(ValueError, match="positive int"):
        processor.process(ids, [image_tensor(50, 50, 0)], {"num_crops": 0})
    with pytest.raises(ValueError, match="1 images were given|2 images"):
        processor.process(ids, [image_tensor(50, 50, 0)] * 2, {})
    with pytest.raises(ValueError, match="aspect ratio"):
        processor.process(ids, [image_tensor(1, 2000, 0)], {"num_crops": 1})
    image = image_tensor(50, 50, 0)
    expanded = processor.process(ids, [image], {}).prompt_token_ids
    with pytest.raises(ValueError, match="more image tokens"):
        processor.process(expanded + [IMAGE_TOKEN_ID], [image], {})


# ---------------------------------------------------------------------------------------------
# The config and the model


def test_published_config_reads_as_phi3(ckpt, ref) -> None:
    config = load_hf_config(ckpt)
    assert config.architectures == ["Phi3VForCausalLM"] and config.feature_layer == -2
    rope = PhiRope.from_hf(config)
    assert rope.rotary_dim == 16 and rope.original_max_position_embeddings == 4096
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert config.vision_config.image_size == 336 and config.vision_config.hidden_size == 32
    raw = ref.lm.config
    for key in ("hidden_size", "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(raw, key)


def test_published_config_refuses_other_embeddings(ckpt) -> None:
    from tests.families.phi3v_checkpoint import tiny_published_config
    from vlmx.models.phi3v_config import read_published_config

    raw = tiny_published_config()
    raw["embd_layer"]["hd_transform_order"] = "glb_sub"
    with pytest.raises(ValueError, match="sub_glb"):
        read_published_config(raw)
    raw = tiny_published_config()
    raw["img_processor"]["image_dim_out"] = 64
    with pytest.raises(ValueError, match="image_dim_out"):
        read_published_config(raw)


def _ours(path: str) -> Phi3VForCausalLM:
    model = Phi3VForCausalLM(load_hf_config(path))
    model.load_weights(iterate_weights(path))
    return model.eval()


@torch.no_grad()
def test_image_features_match_reference(ckpt, ref) -> None:
    model = _ours(ckpt)
    processor = new_processor(ckpt)
    prompt = ref.chat_prompt(3, QUESTION)
    sizes = [(300, 500, 1), (700, 460, 2), (90, 60, 3)]
    out = processor.process(processor.encode_prompt(prompt), [image_tensor(*a) for a in sizes], {})
    inputs = ref.inputs(prompt, [structured_image(w, h, v) for h, w, v in sizes])
    assert out.prompt_token_ids == ref.placeholder_ids(inputs["input_ids"])
    theirs = ref.hd_features(inputs["images"])
    ours = torch.cat(model.encode_images(out.mm_features))
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < FEATURE_ATOL


def test_load_weights_rejects_missing_and_unexpected(ckpt) -> None:
    weights = dict(iterate_weights(ckpt))
    missing = {k: v for k, v in weights.items() if "img_projection.2.weight" not in k}
    with pytest.raises(ValueError, match="missing"):
        Phi3VForCausalLM(load_hf_config(ckpt)).load_weights(missing.items())
    extra = {**weights, "model.vision_embed_tokens.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected"):
        Phi3VForCausalLM(load_hf_config(ckpt)).load_weights(extra.items())


# ---------------------------------------------------------------------------------------------
# The engine


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 4096)
    kwargs.setdefault("trust_remote_code", True)  # as the example passes it: nothing runs
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, **kwargs)


def _generate(llm: LLM, batch, params=GREEDY, **extra):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}, **extra} for p, imgs in batch]
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def batch(ref):
    """Prompts with 2 and 3 images of different sizes and crop grids."""
    two = [structured_image(500, 300, 1), structured_image(160, 320, 2)]
    three = [
        structured_image(224, 224, 0),
        structured_image(460, 700, 3),
        structured_image(96, 64, 4),
    ]
    return [(ref.chat_prompt(len(g), QUESTION), g) for g in (two, three)]


def test_generate_and_chat_match_reference(ckpt, ref, batch) -> None:
    llm = _llm(ckpt)
    gen = _generate(llm, batch)
    check_generate_and_chat(llm, ref, batch, gen, QUESTION, GREEDY)
    hf_greedy = ref.greedy(*batch[0], max_new_tokens=GREEDY.max_tokens)
    assert gen[0].outputs[0].token_ids == hf_greedy


def test_kwargs_match_reference(ckpt, ref, batch) -> None:
    llm = _llm(ckpt, mm_processor_kwargs={"num_crops": 1}, max_model_len=8192)
    outputs = _generate(llm, batch)
    ref.num_crops = 1
    try:
        for (prompt, images), output in zip(batch, outputs):
            compare_with_reference(ref, prompt, images, output)
    finally:
        ref.num_crops = PREPROCESSOR["num_crops"]
    full = _generate(llm, batch[:1], mm_processor_kwargs={"num_crops": 16})  # per prompt
    assert len(full[0].prompt_token_ids) > len(outputs[0].prompt_token_ids)


def test_prefix_caching_and_chunked_prefill(ckpt, batch) -> None:
    baseline = _generate(_llm(ckpt, enable_prefix_caching=False), batch)
    tol = max(2e-3, TEST_ATOL)

    llm = _llm(ckpt, enable_prefix_caching=True)
    assert_same_outputs(_generate(llm, batch), baseline, tol)
    second = _generate(llm, batch)
    assert_same_outputs(second, baseline, tol)
    assert all(o.num_cached_tokens > 0 for o in second)
    chunked = _llm(ckpt, max_num_batched_tokens=256, max_num_seqs=2, enable_prefix_caching=False)
    assert_same_outputs(_generate(chunked, batch), baseline, tol)  # spans longer than a chunk


def test_swapping_images_changes_logprobs(ckpt, ref) -> None:
    prompt = ref.chat_prompt(2, QUESTION)
    a, b = structured_image(224, 168, 0), structured_image(224, 168, 5)  # same layout
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(_llm(ckpt), [(prompt, [a, b]), (prompt, [b, a])], params)
    assert_swap_changes_logprobs(*out)
