"""Parity of vlmx's Qwen2-VL / Qwen2.5-VL models with transformers' (CPU, float32).

The HF model is built from the tiny config with every weight re-randomised at a scale where
attention is peaked (so a wrong position, mask or image order shows in the logits), its state
dict is loaded into ours in both name layouts, and then:
image features, one-shot prefill, chunked prefill over the paged cache, a two-sequence flat
batch, weight-loading errors, and image order are checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration as HFQwen2_5_VL
from transformers import Qwen2VLForConditionalGeneration as HFQwen2VL
from transformers import Qwen2VLImageProcessor

from vlmx.demo.configs import tiny_qwen_vl_config
from vlmx.layers.attention import AttentionMetadata, VarlenSegments, varlen_attention
from vlmx.layers.vision import VisionBlock, run_vision_blocks
from vlmx.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vlmx.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
BLOCK_SIZE = 16
NUM_BLOCKS = 48
FEATURE_ATOL = 1e-5
LOGITS_ATOL = 5e-4  # logits reach ~55; measured diffs ~8e-5

FAMILIES = {
    "qwen2_vl": (HFQwen2VL, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (HFQwen2_5_VL, Qwen2_5_VLForConditionalGeneration),
}


def _images() -> list[np.ndarray]:
    """Structured RGB images whose sizes are multiples of 28 (no resize by the processor).

    Merged grids (window of 4x4 merged tokens in Qwen2.5-VL): 6x8 (two rows of windows, the
    second partial), 3x5 (partial in both directions), 4x2 (partial columns).
    """
    out = []
    for i, (h, w) in enumerate([(168, 224), (84, 140), (112, 56)]):
        y, x = np.mgrid[0:h, 0:w]
        r = 255 * x / (w - 1)
        g = 255 * y / (h - 1)
        b = 255.0 * (((x // (7 + 5 * i)) + (y // 11)) % 2)
        disc = (x - w / 3) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 4) ** 2
        b = np.where(disc, 255 - b, b)
        out.append(np.stack([r, g, b], axis=-1).astype(np.uint8))
    return out


def _randomise(model: torch.nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in) (embeddings N(0, 1)), biases and norms perturbed: no dead path."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def _hub_name(name: str) -> str:
    """transformers-5 name -> the layout of the published hub checkpoints."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def _prompt(grids: list[list[int]], order: list[int]) -> list[int]:
    """Text, image, text, image, ...; the text does not depend on which image fills a slot."""
    gen = torch.Generator().manual_seed(0)
    ids: list[int] = []
    for slot, i in enumerate(order):
        ids += torch.randint(0, 151643, (3 + slot,), generator=gen).tolist()
        t, h, w = grids[i]
        ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
    ids += torch.randint(0, 151643, (7,), generator=gen).tolist()
    return ids


class Setup:
    """One family: HF reference, pixel inputs, and the reference outputs of two prompts."""

    def __init__(self, family: str) -> None:
        hf_cls, self.vlmx_cls = FAMILIES[family]
        self.config = tiny_qwen_vl_config(family)
        torch.manual_seed(0)
        self.hf = hf_cls(self.config).eval()
        _randomise(self.hf)
        self.state_dict = {k: v.clone() for k, v in self.hf.state_dict().items()}

        proc = Qwen2VLImageProcessor()(images=_images(), return_tensors="pt")
        grid = proc["image_grid_thw"]  # [3, 3]
        sizes = grid.prod(-1).tolist()
        self.pixel_values = list(proc["pixel_values"].split(sizes))  # per image
        self.grids = grid.tolist()
        with torch.no_grad():
            out = self.hf.model.get_image_features(proc["pixel_values"], grid)
        self.hf_features = list(out.pooler_output)

        # prompt A holds images 0, 1, 2; prompt B is A with the first two images swapped
        self.prompts = {}
        for key, order in (("a", [0, 1, 2]), ("b", [1, 0, 2])):
            ids = _prompt(self.grids, order)
            self.prompts[key] = (order, ids, *self._hf_forward(ids, order))

    def _hf_forward(self, ids: list[int], order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.tensor([ids])
        token_types = (input_ids == IMAGE_PAD).int()
        grid = torch.tensor([self.grids[i] for i in order])
        pixel_values = torch.cat([self.pixel_values[i] for i in order])
        positions, _ = self.hf.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=grid
        )
        with torch.no_grad():
            logits = self.hf(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=pixel_values,
                image_grid_thw=grid,
                mm_token_type_ids=token_types,
            ).logits[0]
        return positions[:, 0], logits  # [3, T], [T, vocab]

    def features(self, order: list[int], ids: list[int]) -> list[MMFeature]:
        starts = [i for i, t in enumerate(ids) if t == IMAGE_PAD and ids[i - 1] == VISION_START]
        return [
            MMFeature(
                mm_hash=f"image{i}",
                placeholder=PlaceholderRange(start, self.grids[i][1] * self.grids[i][2] // 4),
                data={
                    "pixel_values": self.pixel_values[i],
                    "image_grid_thw": torch.tensor(self.grids[i]),
                },
            )
            for i, start in zip(order, starts)
        ]

    def model(self, layout: str = "transformers5"):
        model = self.vlmx_cls(self.config)
        names = self.state_dict.items()
        if layout == "hub":
            names = ((_hub_name(k), v) for k, v in names)
        model.load_weights(names)
        return model.eval()


_SETUPS: dict[str, Setup] = {}


@pytest.fixture(params=list(FAMILIES), scope="module")
def setup(request) -> Setup:
    if request.param not in _SETUPS:
        _SETUPS[request.param] = Setup(request.param)
    return _SETUPS[request.param]


class PagedSeq:
    """One sequence's blocks in the shared cache (handed out in a scrambled order)."""

    def __init__(self, block_ids: list[int]) -> None:
        self.block_ids = block_ids
        self.num_cached = 0

    def slots(self, start: int, end: int) -> list[int]:
        return [
            self.block_ids[i // BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE for i in range(start, end)
        ]


def _metadata(seqs: list[PagedSeq], num_new: list[int]) -> AttentionMetadata:
    query_start_loc = [0]
    slots: list[int] = []
    for seq, n in zip(seqs, num_new):
        query_start_loc.append(query_start_loc[-1] + n)
        slots += seq.slots(seq.num_cached, seq.num_cached + n)
    seq_lens = [seq.num_cached + n for seq, n in zip(seqs, num_new)]
    width = max(len(s.block_ids) for s in seqs)
    tables = [s.block_ids + [-1] * (width - len(s.block_ids)) for s in seqs]
    return AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
        block_size=BLOCK_SIZE,
    )


def _kv_caches(model) -> list[torch.Tensor]:
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    return [torch.full(shape, float("nan")) for _ in range(model.num_layers)]


def _embeds(model, ids: list[int], features: list[MMFeature]) -> torch.Tensor:
    """Token embeddings with each image's embeddings written over its placeholder rows."""
    embeds = model.embed_tokens(torch.tensor(ids))
    for feature, image_embeds in zip(features, model.encode_images(features)):
        embeds[feature.placeholder.offset : feature.placeholder.end] = image_embeds
    return embeds


def _step(model, kv_caches, seqs, chunks) -> list[torch.Tensor]:
    """Run one flat step: `chunks[i]` = (embeds, positions) of seq i's new tokens -> logits each."""
    metadata = _metadata(seqs, [c[0].shape[0] for c in chunks])
    embeds = torch.cat([c[0] for c in chunks])
    positions = torch.cat([c[1] for c in chunks], dim=1)
    hidden = model(embeds, positions, kv_caches, metadata)
    for seq, c in zip(seqs, chunks):
        seq.num_cached += c[0].shape[0]
    logits = model.compute_logits(hidden)
    return list(logits.split([c[0].shape[0] for c in chunks]))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_image_features_and_prefill_match_hf(setup: Setup, layout: str) -> None:
    model = setup.model(layout)
    order, ids, positions, hf_logits = setup.prompts["a"]
    features = setup.features(order, ids)

    # (1) one vision call for all images, split per image
    ours = model.encode_images(features)
    for i, embeds in zip(order, ours):
        assert embeds.shape == setup.hf_features[i].shape
        assert _max_diff(embeds, setup.hf_features[i]) < FEATURE_ATOL

    # (2) one-shot prefill of the whole prompt
    kv_caches = _kv_caches(model)
    seq = PagedSeq(list(range(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - 12, -1)))
    (logits,) = _step(model, kv_caches, [seq], [(_embeds(model, ids, features), positions)])
    assert logits.shape == hf_logits.shape
    assert _max_diff(logits, hf_logits) < LOGITS_ATOL


@torch.no_grad()
def test_chunked_prefill_and_flat_batch_match_hf(setup: Setup) -> None:
    model = setup.model()
    order_a, ids_a, pos_a, hf_a = setup.prompts["a"]
    order_b, ids_b, pos_b, hf_b = setup.prompts["b"]
    embeds_a = _embeds(model, ids_a, setup.features(order_a, ids_a))
    embeds_b = _embeds(model, ids_b, setup.features(order_b, ids_b))

    # (3a) two chunks; the split falls inside the first image's placeholder run
    kv_caches = _kv_caches(model)
    seq = PagedSeq([5, 40, 2, 17, 33, 8, 11, 29, 3, 21, 44, 14])
    split = ids_a.index(IMAGE_PAD) + 9
    (first,) = _step(model, kv_caches, [seq], [(embeds_a[:split], pos_a[:, :split])])
    (second,) = _step(model, kv_caches, [seq], [(embeds_a[split:], pos_a[:, split:])])
    assert _max_diff(torch.cat([first, second]), hf_a) < LOGITS_ATOL

    # (3b) two sequences in one flat batch, the second one chunked across two steps
    kv_caches = _kv_caches(model)
    seq_a = PagedSeq([1, 30, 7, 45, 12, 26, 9, 38, 19, 4, 23, 35])
    seq_b = PagedSeq([42, 0, 15, 31, 6, 24, 39, 13, 28, 10, 46, 18])
    k = 37
    logits_a, logits_b1 = _step(
        model, kv_caches, [seq_a, seq_b], [(embeds_a, pos_a), (embeds_b[:k], pos_b[:, :k])]
    )
    (logits_b2,) = _step(model, kv_caches, [seq_b], [(embeds_b[k:], pos_b[:, k:])])
    assert _max_diff(logits_a, hf_a) < LOGITS_ATOL
    assert _max_diff(torch.cat([logits_b1, logits_b2]), hf_b) < LOGITS_ATOL

    # (5) swapping the two images changes the logits of the (identical) closing text tokens
    assert ids_a[-7:] == ids_b[-7:]
    assert _max_diff(logits_a[-7:], logits_b2[-7:]) > 1e-1


def test_load_weights_rejects_missing_and_unexpected(setup: Setup) -> None:
    weights = dict(setup.state_dict)
    dropped = "model.language_model.layers.1.self_attn.k_proj.weight"
    missing = {k: v for k, v in weights.items() if k != dropped}
    with pytest.raises(
        ValueError, match=r"missing 1 weight.*layers\.1\.self_attn\.qkv_proj\.weight \(part 1\)"
    ):
        setup.vlmx_cls(setup.config).load_weights(missing.items())

    extra = dict(weights)
    extra["model.visual.blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(
        ValueError, match=r"unexpected weight 'model\.visual\.blocks\.0\.attn\.extra\.weight'"
    ):
        setup.vlmx_cls(setup.config).load_weights(extra.items())

    bad = dict(weights)
    bad["model.language_model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        setup.vlmx_cls(setup.config).load_weights(bad.items())


@torch.no_grad()
def test_untied_lm_head_is_loaded() -> None:
    config = tiny_qwen_vl_config("qwen2_vl")
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    hf = HFQwen2VL(config).eval()
    _randomise(hf)
    assert not torch.equal(hf.lm_head.weight, hf.model.language_model.embed_tokens.weight)
    model = Qwen2VLForConditionalGeneration(config)
    model.load_weights((_hub_name(k), v) for k, v in hf.state_dict().items())
    hidden = torch.randn(4, config.text_config.hidden_size)
    assert _max_diff(model.compute_logits(hidden), hf.lm_head(hidden)) < 1e-5
    with pytest.raises(ValueError, match="lm_head.weight"):
        Qwen2VLForConditionalGeneration(config).load_weights(
            (k, v) for k, v in hf.state_dict().items() if k != "lm_head.weight"
        )


@pytest.mark.parametrize("norm, gated", [("rms_norm", True), ("layer_norm", False)])
def test_vision_blocks_fuse_adds_into_norms_without_changing_the_result(norm, gated) -> None:
    """`run_vision_blocks` defers each residual add into the norm after it; the output equals
    HF's block loop (`x = x + attn(norm1(x))`, `x = x + mlp(norm2(x))`) bit for bit."""
    gen = torch.Generator().manual_seed(7)
    blocks = torch.nn.ModuleList(
        VisionBlock(32, 2, 48, "silu" if gated else "quick_gelu", norm=norm, gated_mlp=gated)
        for _ in range(3)
    ).to(torch.bfloat16)
    with torch.no_grad():
        for param in blocks.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    x = torch.randn(13, 32, generator=gen).to(torch.bfloat16)
    cos, sin = (t.expand(13, 16).float() for t in (torch.rand(1, 16), torch.rand(1, 16)))
    cu_of = [[0, 5, 13], [0, 13], [0, 5, 13]]
    with torch.no_grad():
        expected = x
        for i, block in enumerate(blocks):
            expected = expected + block.attn(block.norm1(expected), cos, sin, cu_of[i])
            expected = expected + block.mlp(block.norm2(expected))
        got = run_vision_blocks(blocks, x, cos, sin, lambda i: cu_of[i])
    assert torch.equal(got, expected)


def test_varlen_segments_build_their_device_tensors_once() -> None:
    """A tower hands one `VarlenSegments` to all its layers: same output as the boundaries
    themselves, and its row index is built on first use only."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(13, 2, 8, generator=gen) for _ in range(3))
    cu_seqlens = [0, 5, 10, 13]
    segments = VarlenSegments(cu_seqlens)
    expected = varlen_attention(q, k, v, cu_seqlens)
    assert torch.equal(varlen_attention(q, k, v, segments), expected)
    rows = segments.rows(q.device)
    assert torch.equal(varlen_attention(q, k, v, segments), expected)  # a second layer
    assert segments.rows(q.device) is rows
    assert [(length, n) for length, n, _ in rows] == [(5, 2), (3, 1)]
