"""Qwen-VL-Chat in its published layout: config reader, tokenizer from qwen.tiktoken,
preprocessing, the vision tower against a slow reference, and engine parity (2 and 3 images of
different sizes) against transformers' Qwen2 holding the converted decoder weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from tests.families import qwen_vl_checkpoint as ckpt
from tests.family_helpers import checkpoint_model_config, image_conversation, image_tensor
from tests.hf_reference import TEST_ATOL
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.models.qwen_vl_config import load_published_tokenizer
from vlmx.models.qwen_vl_processor import CLIP_MEAN, CLIP_STD, QwenVLProcessor

SIZES = [(40, 70), (90, 60), (56, 56)]
QUESTION = "What is the content of each image?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return ckpt.build_checkpoint(tmp_path_factory.mktemp("qwen_vl"), ckpt.CHATML_PARTS)


@pytest.fixture(scope="module")
def reference(folder):
    model = ckpt.hf_decoder()
    return model, load_file(f"{folder}/model.safetensors")


def pil_pixels(image: Image.Image) -> torch.Tensor:
    """The published transform: PIL bicubic to 56 x 56, ToTensor, CLIP Normalize."""
    size = ckpt.VISUAL["image_size"]
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), np.float32)
    x = torch.from_numpy(arr / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def slow_abs_pos(table: torch.Tensor, n: int) -> torch.Tensor:
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(n))
    grid = table.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(n, -1)


def slow_mha(q, k, v, w, b, heads):
    """Attention written out: per head softmax(q k^T / sqrt(d)) v."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        att = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), dim=-1)
        out.append(att @ v[:, s])
    return torch.cat(out, -1) @ w.T + b


def slow_visual(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The published VisionTransformer, one image [3, S, S] -> [256, D], from the tensors."""
    v = {k[len("transformer.visual.") :]: t for k, t in sd.items() if "visual." in k}
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], v[f"{p}.weight"], v[f"{p}.bias"], 1e-6)  # noqa: E731
    x = F.conv2d(pixels[None], v["conv1.weight"], stride=ckpt.VISUAL["patch_size"])
    x = x[0].flatten(1).T  # [g*g, W]
    x = ln(x + slow_abs_pos(v["positional_embedding"], x.shape[0]), "ln_pre")
    heads, w = ckpt.VISUAL["heads"], ckpt.VISUAL["width"]
    d = w // heads
    for i in range(ckpt.VISUAL["layers"]):
        b = f"transformer.resblocks.{i}"
        y = ln(x, f"{b}.ln_1")
        qkv = (y @ v[f"{b}.attn.in_proj.weight"].T + v[f"{b}.attn.in_proj.bias"]).view(
            -1, heads, 3, d
        )  # per head [q | k | v]
        q, k, vv = (qkv[:, :, j].reshape(-1, w) for j in range(3))
        x = x + slow_mha(
            q, k, vv, v[f"{b}.attn.out_proj.weight"], v[f"{b}.attn.out_proj.bias"], heads
        )
        y = ln(x, f"{b}.ln_2")
        y = F.gelu(y @ v[f"{b}.mlp.c_fc.weight"].T + v[f"{b}.mlp.c_fc.bias"])
        x = x + y @ v[f"{b}.mlp.c_proj.weight"].T + v[f"{b}.mlp.c_proj.bias"]
    a = "attn_pool"
    kv = ln(x @ v[f"{a}.kv_proj.weight"].T, f"{a}.ln_kv")
    pos = v[f"{a}.pos_embed"]
    q = ln(v[f"{a}.query"], f"{a}.ln_q") + pos
    wq, wk, wv = v[f"{a}.attn.in_proj_weight"].chunk(3)
    bq, bk, bv = v[f"{a}.attn.in_proj_bias"].chunk(3)
    key = kv + slow_abs_pos(pos, kv.shape[0])
    dim = ckpt.VISUAL["output_dim"]
    out = slow_mha(
        q @ wq.T + bq,
        key @ wk.T + bk,
        kv @ wv.T + bv,
        v[f"{a}.attn.out_proj.weight"],
        v[f"{a}.attn.out_proj.bias"],
        max(1, dim // 128),
    )
    return ln(out, "ln_post") @ v["proj"]


def test_tokenizer_has_the_published_special_ids(folder):
    tok = load_published_tokenizer(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<img>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<img>": 151857}
    assert tok.convert_tokens_to_ids("<imgpad>") == 151859
    assert tok.convert_tokens_to_ids("<|extra_204|>") == 151850
    assert tok.decode(tok.encode("Hello world, 123")) == "Hello world, 123"


def test_preprocessing_matches_the_published_transform(folder):
    config = checkpoint_model_config(folder)
    proc = QwenVLProcessor(config, load_published_tokenizer(folder), torch.device("cpu"))
    images = [image_tensor(h, w, i) for i, (h, w) in enumerate(SIZES)]
    ours = proc.preprocess(images, proc.prompt_settings({}))
    for (h, w), i, pixels in zip(SIZES, range(3), ours):
        ref = pil_pixels(structured_image(w, h, i))
        assert pixels.shape == ref.shape
        # NOTE: torch's antialiased uint8 bicubic (the shared resize) is not bit-exact with
        # PIL's: its fixed-point precision and pass order differ, so a few pixels are one (at
        # sharp edges a few) uint8 steps apart; 99% are within one step
        steps = ((pixels - ref) * torch.tensor(CLIP_STD)[:, None, None] * 255).abs()
        assert (steps <= 1.01).float().mean() >= 0.99
        assert steps.mean() < 0.2
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs"):
        proc.prompt_settings({"max_pixels": 3})


def test_prompt_expansion_and_errors(folder):
    config = checkpoint_model_config(folder)
    tok = load_published_tokenizer(folder)
    proc = QwenVLProcessor(config, tok, torch.device("cpu"))
    ids = tok.encode("Picture 1: <img></img>\nPicture 2: <img></img>\nhi")
    images = [image_tensor(40, 70, 0), image_tensor(90, 60, 1)]
    out = proc.process(ids, images, {})
    assert out.prompt_token_ids.count(151859) == 512
    assert [f.placeholder.length for f in out.mm_features] == [256, 256]
    start = out.mm_features[0].placeholder.offset
    assert out.prompt_token_ids[start - 1] == 151857
    assert out.prompt_token_ids[start + 256] == 151858
    again = proc.process(out.prompt_token_ids, images, {})  # already expanded: kept
    assert again.prompt_token_ids == out.prompt_token_ids
    with pytest.raises(ValueError, match="multi_modal_data"):
        proc.process(tok.encode("<img>a.png</img><img></img>"), images, {})
    with pytest.raises(ValueError):
        proc.process(ids, images[:1], {})


def test_vision_tower_matches_the_slow_reference(folder, reference):
    from vlmx.models.loader import build_model, load_hf_config

    config = load_hf_config(folder)
    model = build_model(config.architectures[0], config, folder, torch.device("cpu"), torch.float32)
    _, sd = reference
    for i, (h, w) in enumerate(SIZES[:2]):
        pixels = pil_pixels(structured_image(w, h, i))
        with torch.no_grad():
            ours = model.visual(pixels[None])[0]
        assert torch.allclose(ours, slow_visual(sd, pixels), atol=1e-4)


def reference_logprobs(reference, prompt_ids, features_embeds, output_ids):
    """Teacher-forced log-softmax of HF Qwen2 with the image spans' embeddings replaced."""
    model, _ = reference
    ids = torch.tensor([prompt_ids + output_ids[:-1]])
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        for offset, e in features_embeds:
            embeds[0, offset : offset + e.shape[0]] = e
        logits = model(inputs_embeds=embeds).logits[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1 :], -1)


def test_generate_matches_the_reference(folder, reference):
    llm = LLM(
        folder,
        trust_remote_code=True,
        hf_overrides={"architectures": ["QwenVLForConditionalGeneration"]},
        max_model_len=1024,
        limit_mm_per_prompt={"image": 3},
        dtype="float32",
    )
    _, sd = reference
    proc = QwenVLProcessor(
        checkpoint_model_config(folder), load_published_tokenizer(folder), torch.device("cpu")
    )
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
    batches = []
    for n in (2, 3):
        images = [structured_image(w, h, i) for i, (h, w) in enumerate(SIZES[:n])]
        holders = "".join(f"Picture {i}: <img></img>\n" for i in range(1, n + 1))
        prompt = f"<|im_start|>user\n{holders}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        batches.append((prompt, images))
    outputs = llm.generate(
        [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in batches], params
    )
    for (_, images), out in zip(batches, outputs):
        completion = out.outputs[0]
        assert len(completion.token_ids) == 6
        ids = out.prompt_token_ids
        starts = [i + 1 for i, t in enumerate(ids) if t == 151857]
        # the engine's pixels (the preprocessing test compares them with PIL's)
        pixels = proc.preprocess([to_tensor(im) for im in images], {"image_size": 56})
        embeds = [(s, slow_visual(sd, px)) for s, px in zip(starts, pixels)]
        ref = reference_logprobs(reference, ids, embeds, list(completion.token_ids))
        for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            for token_id, lp in entry.items():
                assert abs(lp.logprob - ref[step, token_id].item()) < max(TEST_ATOL, 2e-3)
            top2 = torch.topk(ref[step], 2)
            if (top2.values[0] - top2.values[1]).item() > 0.05:
                assert token == top2.indices[0].item()
    chat = llm.chat([image_conversation(images, QUESTION) for _, images in batches], params)
    for c, g in zip(chat, outputs, strict=True):
        assert c.prompt_token_ids == g.prompt_token_ids
        assert c.outputs[0].token_ids == g.outputs[0].token_ids
    prompt, images = batches[0]
    ab, ba = llm.generate(
        [
            {"prompt": prompt, "multi_modal_data": {"image": images}},
            {"prompt": prompt, "multi_modal_data": {"image": images[::-1]}},
        ],
        params,
    )
    first = {t: lp.logprob for t, lp in ab.outputs[0].logprobs[0].items()}
    second = {t: lp.logprob for t, lp in ba.outputs[0].logprobs[0].items()}
    assert set(first) != set(second) or max(abs(first[t] - second[t]) for t in first) > 1e-3


def test_weight_loading_refuses_missing_and_unexpected_names(folder, reference):
    from vlmx.models.qwen_vl import QwenVLForConditionalGeneration
    from vlmx.models.qwen_vl_config import read_published_config

    _, sd = reference
    config = read_published_config(ckpt.published_config())
    model = QwenVLForConditionalGeneration(config)
    with pytest.raises(ValueError, match="the checkpoint is missing"):
        model.load_weights((k, v) for k, v in sd.items() if "mlp.w2" not in k)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_weights([*sd.items(), ("transformer.h.0.mlp.w3.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="rotary_pct"):
        read_published_config(ckpt.published_config() | {"rotary_pct": 0.5})
    with pytest.raises(ValueError, match="lacks the published fields"):
        read_published_config({"architectures": ["QWenLMHeadModel"], "model_type": "qwen"})
