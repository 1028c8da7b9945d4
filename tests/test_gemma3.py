"""Gemma 3 against the Hugging Face reference on a tiny random checkpoint.

Processor (pixels, pan-and-scan crops, prompt layout), the engine's bidirectional / sliding
attention masks against a dense reference built from HF's mask functions, the model (image
features, prefill logits) and the engine end to end (generate, chat, prefix caching, chunked
prefill, image order, pan-and-scan, the hub weight names).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Gemma3ForConditionalGeneration as HFGemma3
from transformers.masking_utils import blockwise_overlay, sliding_window_overlay
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from tests.families.gemma3_checkpoint import (
    MM_TOKENS,
    SLIDING_WINDOW,
    TOKEN_IDS,
    build_gemma3_checkpoint,
)
from tests.hf_reference import (
    TEST_ATOL,
    TEST_DEVICE,
    TEST_DTYPE,
    HFReference,
    compare_with_reference,
)
from vlmx import LLM, SamplingParams
from vlmx.layers.attention import AttentionMetadata, attention_mask, paged_attention_torch
from vlmx.multimodal.media import load_image

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
SOFT_ID = TOKEN_IDS["<image_soft_token>"]
PAS = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 48}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3"), "transformers")


@pytest.fixture(scope="module")
def hub_ckpt(tmp_path_factory) -> str:
    return build_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3-hub"), "hub")


@pytest.fixture(scope="module")
def ref(ckpt) -> HFReference:
    return HFReference(ckpt, model_cls=HFGemma3)


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return _llm(ckpt)


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 1024)
    return LLM(model=path, dtype=TEST_DTYPE, device=TEST_DEVICE, **kwargs)


def _generate(llm: LLM, batch, params=GREEDY, **mm_kwargs):
    prompts = [
        {"prompt": p, "multi_modal_data": {"image": imgs}, "mm_processor_kwargs": mm_kwargs}
        for p, imgs in batch
    ]
    return llm.generate(prompts, params, use_tqdm=False)


def _random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- processor ---------------------------------------------------------------------------

SIZES = [(32, 32), (31, 47), (100, 20), (20, 100), (224, 224), (333, 77), (1, 1), (7, 300)]


@pytest.mark.parametrize("kwargs", [{}, PAS, {**PAS, "pan_and_scan_max_num_crops": 2}])
def test_processor_matches_hf(llm, ref, kwargs):
    """Pixels, crops, expanded prompt ids and placeholder spans equal HF's for many sizes."""
    processor = llm.llm_engine.processor
    tokenizer = llm.get_tokenizer()
    images = [_random_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    num_features = 0
    for group in (images[:2], images[2:5], images[5:]):
        prompt = ref.chat_prompt(len(group), QUESTION)
        hf = ref.processor(text=[prompt], images=group, return_tensors="pt", **kwargs)
        ours = processor.process(tokenizer.encode(prompt), [load_image(i) for i in group], kwargs)
        assert ours.prompt_token_ids == hf["input_ids"][0].tolist()
        pixels = torch.stack([f.data["pixel_values"] for f in ours.mm_features])
        assert pixels.shape == hf["pixel_values"].shape
        torch.testing.assert_close(pixels, hf["pixel_values"], atol=1e-6, rtol=0)
        is_image = torch.zeros(len(ours.prompt_token_ids), dtype=torch.long)
        for f in ours.mm_features:
            is_image[f.placeholder.offset : f.placeholder.end] = 1
        assert is_image.tolist() == hf["token_type_ids"][0].tolist()
        num_features += len(ours.mm_features)
    if kwargs:  # the wide / tall images get crops
        assert num_features > len(images)


def test_processor_accepts_expanded_prompt_and_caches(llm, ref, test_images):
    processor = llm.llm_engine.processor
    group = test_images[:2]
    prompt = ref.chat_prompt(2, QUESTION)
    hf_ids = ref.processor(text=[prompt], images=group)["input_ids"][0]
    tensors = [load_image(i) for i in group]
    out = processor.process(list(hf_ids), tensors, {})
    assert out.prompt_token_ids == list(hf_ids)
    assert [f.num_embeds for f in out.mm_features] == [MM_TOKENS, MM_TOKENS]
    again = processor.process(list(hf_ids), tensors, {})
    assert again.mm_features[0].data["pixel_values"] is out.mm_features[0].data["pixel_values"]
    other = processor.process(list(hf_ids), tensors[::-1], {})
    assert other.mm_features[0].mm_hash == out.mm_features[1].mm_hash
    crops = processor.process(llm.get_tokenizer().encode(prompt), tensors, PAS)
    assert crops.mm_features[0].mm_hash != out.mm_features[0].mm_hash  # settings in the hash


def test_processor_errors(llm, ref, test_images):
    processor = llm.llm_engine.processor
    ids = llm.get_tokenizer().encode(ref.chat_prompt(2, QUESTION))
    image = load_image(test_images[0])
    with pytest.raises(ValueError, match="2 image placeholders .* 1 images"):
        processor.process(ids, [image], {})
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs.*supported: do_pan_and_scan"):
        processor.process(ids, [image, image], {"max_pixels": 10})
    with pytest.raises(ValueError, match="pan_and_scan_max_num_crops=0"):
        processor.process(ids, [image, image], {"pan_and_scan_max_num_crops": 0})
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        processor.process(ids, [image, image], {"do_pan_and_scan": "yes"})
    with pytest.raises(ValueError, match="runs of image soft tokens"):
        processor.process(ids + [SOFT_ID] * MM_TOKENS, [image, image], {})


# -- attention masks -----------------------------------------------------------------------


def _hf_dense_mask(token_type_ids: list[int], window: int | None) -> torch.Tensor:
    """[L, L] mask as HF Gemma 3 builds it: causal OR same image block (AND the window)."""
    n = len(token_type_ids)
    block_ids = get_block_sequence_ids_for_mask(torch.tensor([token_type_ids]))
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    mask = (k <= q) | blockwise_overlay(block_ids)(0, 0, q, k)
    if window is not None:
        mask &= sliding_window_overlay(window)(0, 0, q, k)
    return mask


def _types(length: int, spans: list[tuple[int, int]]) -> list[int]:
    types = [0] * length
    for s, e in spans:
        types[s:e] = [1] * (e - s)
    return types


@pytest.mark.parametrize("window", [None, 3, 6, 40])
def test_attention_mask_matches_hf(window):
    spans = [(3, 8), (10, 12), (15, 22)]
    dense = _hf_dense_mask(_types(30, spans), window)
    for seq_len in (8, 12, 22, 30):  # each step ends after a span or in text
        for num_queries in range(1, seq_len + 1):
            start = seq_len - num_queries
            if any(s < start < e for s, e in spans):
                continue  # a step never starts inside a span it did not compute
            overlap = [(s, e) for s, e in spans if s < seq_len and e > start]
            got = attention_mask(num_queries, seq_len, overlap, window)
            if got is None:
                assert num_queries == 1 and window is None
                continue
            assert torch.equal(got, dense[start:seq_len, :seq_len]), (seq_len, num_queries)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_with_spans_matches_dense(window):
    """Two sequences in one varlen batch, paged K/V with cached prefixes, against dense SDPA."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size = 4, 2, 8, 4
    seqs = [(20, 11, [(4, 9), (12, 18)]), (9, 9, [(2, 6)])]  # (seq_len, num_queries, spans)
    num_blocks = 16
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, dim)
    perm = torch.randperm(num_blocks).tolist()
    tables, queries, expected, qsl = [], [], [], [0]
    for seq_len, nq, spans in seqs:
        blocks = [perm.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(blocks + [-1] * (6 - len(blocks)))
        idx = torch.arange(seq_len)
        slots = torch.tensor(blocks)[idx // block_size] * block_size + idx % block_size
        key = kv_cache[0].reshape(-1, kv_heads, dim)[slots]
        value = kv_cache[1].reshape(-1, kv_heads, dim)[slots]
        q = torch.randn(nq, heads, dim)
        mask = _hf_dense_mask(_types(seq_len, spans), window)[seq_len - nq :]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            key.transpose(0, 1),
            value.transpose(0, 1),
            attn_mask=mask,
            scale=0.3,
            enable_gqa=True,
        )
        queries.append(q)
        expected.append(o.transpose(0, 1))
        qsl.append(qsl[-1] + nq)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor([s[0] for s in seqs], dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(0, dtype=torch.long),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=[s[0] for s in seqs],
        block_size=block_size,
        bidirectional_spans_cpu=[s[2] for s in seqs],
    )
    out = paged_attention_torch(torch.cat(queries), kv_cache, metadata, 0.3, window)
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-6, rtol=1e-5)


# -- model ---------------------------------------------------------------------------------


def test_model_matches_hf(llm, ref, test_images):
    """encode_images equals HF's image features; prefill logits at every position equal HF's."""
    engine = llm.llm_engine
    model = engine.executor.worker.model
    group = test_images[:3]
    prompt = ref.chat_prompt(3, QUESTION)
    processed = engine.processor.process(
        llm.get_tokenizer().encode(prompt), [load_image(i) for i in group], {}
    )
    hf = ref.processor(text=[prompt], images=group, return_tensors="pt")
    with torch.inference_mode():
        ours = model.encode_images(processed.mm_features)
        theirs = ref.model.model.get_image_features(hf["pixel_values"]).pooler_output
        torch.testing.assert_close(torch.stack(ours), theirs, atol=1e-5, rtol=1e-5)

        ids = processed.prompt_token_ids
        n = len(ids)
        embeds = model.embed_tokens(torch.tensor(ids))
        for f, e in zip(processed.mm_features, ours):
            embeds[f.placeholder.offset : f.placeholder.end] = e
        block_size = 16
        num_blocks = -(-n // block_size)
        kv_caches = [
            torch.zeros(2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
            for _ in range(model.num_layers)
        ]
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([n], dtype=torch.int32),
            block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
            slot_mapping=torch.arange(n),
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[n],
            block_size=block_size,
            bidirectional_spans_cpu=[
                [(f.placeholder.offset, f.placeholder.end) for f in processed.mm_features]
            ],
        )
        logits = model.compute_logits(model(embeds, torch.arange(n), kv_caches, metadata))
        hf_logits = ref.model(**hf).logits[0]
    assert n > SLIDING_WINDOW  # the sliding layer masks
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)


# -- engine end to end ---------------------------------------------------------------------


def _batch(ref, images):
    """Prompts with 2 and 3 images of different sizes and aspect ratios."""
    return [
        (ref.chat_prompt(2, QUESTION), [images[0], images[1]]),
        (ref.chat_prompt(3, QUESTION), [images[2], images[3], images[4]]),
    ]


def test_generate_matches_reference(llm, ref, test_images):
    batch = _batch(ref, test_images)
    for (prompt, images), out in zip(batch, _generate(llm, batch)):
        assert len(out.outputs[0].token_ids) == 6
        compare_with_reference(ref, prompt, images, out)


def test_hub_layout_matches_reference(hub_ckpt, ref, test_images):
    batch = _batch(ref, test_images)
    for (prompt, images), out in zip(batch, _generate(_llm(hub_ckpt), batch)):
        compare_with_reference(ref, prompt, images, out)


def test_untied_lm_head_matches_reference(tmp_path, test_images):
    path = build_gemma3_checkpoint(tmp_path, "hub", seed=3, tied=False)
    untied = HFReference(path, model_cls=HFGemma3)
    assert not torch.equal(untied.model.lm_head.weight, untied.model.get_input_embeddings().weight)
    (prompt, images), *_ = _batch(untied, test_images)
    compare_with_reference(untied, prompt, images, _generate(_llm(path), [(prompt, images)])[0])


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_matches_generate_and_reference(llm, ref, test_images):
    batch = _batch(ref, test_images)
    conversations = []
    for _, images in batch:
        content = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images]
        content.append({"type": "text", "text": QUESTION})
        conversations.append([{"role": "user", "content": content}])
    chat_outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    # NOTE: chat tokenizes the rendered template (which starts with <bos>) without adding
    # special tokens, as vLLM does; a text prompt gets the tokenizer's own <bos> in front of the
    # template's, in vlmx as in HF's processor. The same conversation without the template's
    # <bos> gives the chat's ids.
    batch = [(prompt.removeprefix("<bos>"), images) for prompt, images in batch]
    gen_outputs = _generate(llm, batch)
    for (prompt, images), chat, gen in zip(batch, chat_outputs, gen_outputs):
        assert chat.prompt_token_ids == gen.prompt_token_ids
        assert chat.outputs[0].token_ids == gen.outputs[0].token_ids
        compare_with_reference(ref, prompt, images, chat)


def test_prefix_caching_and_chunked_prefill(ckpt, ref, test_images):
    batch = _batch(ref, test_images)
    cached = _llm(ckpt, enable_prefix_caching=True)
    first = _generate(cached, batch)
    second = _generate(cached, batch)
    assert all(o.num_cached_tokens > 0 for o in second)
    # chunks of at most 20 tokens: every image span (16) in one step, text split around it
    chunked = _generate(
        _llm(ckpt, max_num_batched_tokens=20, max_num_seqs=4, enable_prefix_caching=False), batch
    )
    for (prompt, images), a, b, c in zip(batch, first, second, chunked):
        for out in (a, b, c):
            assert out.outputs[0].token_ids == a.outputs[0].token_ids
            compare_with_reference(ref, prompt, images, out)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8; raise it"):
        _generate(
            _llm(ckpt, max_num_batched_tokens=8, max_num_seqs=4, max_model_len=512), batch[:1]
        )


def test_swapping_images_changes_logprobs(llm, ref, test_images):
    prompt = ref.chat_prompt(2, QUESTION)
    a, b = test_images[0], test_images[1]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(llm, [(prompt, [a, b]), (prompt, [b, a])], params)
    first, second = ({t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in out)
    assert set(first) != set(second) or max(abs(first[t] - second[t]) for t in first) > 1e-3


@torch.inference_mode()
def test_pan_and_scan_matches_reference(llm, ref, test_images):
    """Crops end to end: prompt ids and teacher-forced logprobs equal HF's with the same kwargs."""
    prompt = ref.chat_prompt(2, QUESTION)
    images = [test_images[1], test_images[2]]  # wide and tall: both get crops
    out = _generate(llm, [(prompt, images)], **PAS)[0]
    hf = ref.processor(text=[prompt], images=images, return_tensors="pt", **PAS)
    prompt_ids = hf["input_ids"][0].tolist()
    assert out.prompt_token_ids == prompt_ids
    assert len(out.prompt_token_ids) > 6 * MM_TOKENS  # the crops are in the prompt
    output_ids = out.outputs[0].token_ids
    ids = torch.tensor([prompt_ids + output_ids[:-1]])
    types = torch.cat(
        [hf["token_type_ids"], torch.zeros(1, len(output_ids) - 1, dtype=torch.long)], 1
    )
    logits = ref.model(input_ids=ids, pixel_values=hf["pixel_values"], token_type_ids=types).logits
    ref_lp = torch.log_softmax(logits[0, len(prompt_ids) - 1 :], -1)
    for step, entry in enumerate(out.outputs[0].logprobs):
        for token_id, lp in entry.items():
            assert abs(lp.logprob - ref_lp[step, token_id].item()) < max(2e-3, TEST_ATOL)
    # the same settings engine-wide
    engine_wide = _llm(llm.llm_engine.config.model_config.model_path, mm_processor_kwargs=PAS)
    again = _generate(engine_wide, [(prompt, images)])[0]
    assert again.prompt_token_ids == prompt_ids
    assert again.outputs[0].token_ids == output_ids


def test_siglip_tower_varlen_and_position_ids(llm):
    """Images of different patch counts in one call equal one call per image (the segment
    path that Idefics3-style towers use); explicit position ids equal the default ones."""
    tower = llm.llm_engine.executor.worker.model.vision_tower
    torch.manual_seed(0)
    sizes = [64, 40, 64, 9]
    patches = torch.randn(sum(sizes), 3 * 4 * 4)
    cu = [0]
    for n in sizes:
        cu.append(cu[-1] + n)
    with torch.inference_mode():
        together = tower(patches, cu)
        alone = [tower(patches[s:e], [0, e - s]) for s, e in zip(cu[:-1], cu[1:])]
        positions = torch.cat([torch.arange(n) for n in sizes])
        explicit = tower(patches, cu, positions)
        shifted = tower(patches, cu, (positions + 1) % 64)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, together)
    assert not torch.allclose(shifted, together)
