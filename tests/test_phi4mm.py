"""Phi-4-multimodal against transformers' `Phi4MultimodalForCausalLM` on tiny random checkpoints:
the HD image processor, LongRoPE, the image features, both weight layouts, and the engine
(generate, chat, prefix caching, chunked prefill) with 2 and 3 images of different sizes.

Runs on VLMX_TEST_DEVICE / VLMX_TEST_DTYPE (float32 CPU by default; the reference stays float32
on the CPU), so the same file is the GPU bf16 parity run.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoTokenizer,
    Phi4MultimodalForCausalLM,
    Phi4MultimodalImageProcessor,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tests.families.phi4mm_checkpoint import (
    IMAGE_TOKEN_ID,
    ROTARY_DIM,
    build_phi4mm_checkpoint,
    tiny_phi4mm_config,
)
from tests.family_helpers import (
    assert_same_outputs,
    assert_swap_changes_logprobs,
    check_generate_and_chat,
    engine_processor,
    image_tensor,
)
from tests.family_helpers import checkpoint_model_config as model_config
from tests.hf_reference import (
    TEST_ATOL,
    TEST_DEVICE,
    TEST_DTYPE,
    HFReference,
    compare_with_reference,
)
from vlmx import LLM, SamplingParams
from vlmx.demo.images import structured_image
from vlmx.layers.phi3 import PhiRope
from vlmx.layers.rotary import apply_rotary
from vlmx.models.loader import iterate_weights, load_hf_config
from vlmx.models.phi4mm import Phi4MMForCausalLM
from vlmx.models.phi4mm_processor import Phi4MMProcessor, image_token_count

QUESTION = "What is the content of each image?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)
PIXEL_ATOL = 1e-5
FEATURE_ATOL = 1e-4
# (height, width): small, square, one crop, wide, tall, odd, past the crop limit, extreme aspect
SIZES = [(20, 30), (448, 448), (300, 400), (300, 500), (700, 460), (37, 91), (1000, 3000),
         (40, 1400), (901, 449)]  # fmt: skip
TAG = re.compile(r"<\|image_\d+\|>")


class Phi4Reference(HFReference):
    """HF's model with HF's image processor; the prompt's `<|image_i|>` tags become
    num_img_tokens image tokens each, the text between them tokenized piece by piece (the
    published processor's rule)."""

    def __init__(self, path: str) -> None:
        self.model = Phi4MultimodalForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.image_processor = Phi4MultimodalImageProcessor.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # what callers of HFReference read of its processor: the chat template, the tokenizer
        self.processor = SimpleNamespace(
            apply_chat_template=self.tokenizer.apply_chat_template, tokenizer=self.tokenizer
        )

    def chat_prompt(self, num_images: int, question: str) -> str:
        tags = "".join(f"<|image_{i + 1}|>" for i in range(num_images))
        return f"<|user|>{tags}{question}<|end|><|assistant|>"

    def inputs(self, prompt: str, images: list, **kwargs) -> dict:
        pieces = TAG.split(prompt)
        assert len(pieces) == len(images) + 1
        out = self.image_processor(images, return_tensors="pt", **kwargs) if images else {}
        ids = self.tokenizer.encode(pieces[0])
        for n, piece in zip(out.get("num_img_tokens", []), pieces[1:]):
            ids += [IMAGE_TOKEN_ID] * int(n) + self.tokenizer.encode(
                piece, add_special_tokens=False
            )
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}
        for key in ("image_pixel_values", "image_sizes", "image_attention_mask"):
            if key in out:
                inputs[key] = out[key]
        return inputs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_phi4mm_checkpoint(tmp_path_factory.mktemp("phi4mm"))


@pytest.fixture(scope="module")
def published_ckpt(tmp_path_factory) -> str:
    return build_phi4mm_checkpoint(tmp_path_factory.mktemp("phi4mm_pub"), layout="published")


@pytest.fixture(scope="module")
def ref(ckpt) -> Phi4Reference:
    return Phi4Reference(ckpt)


def new_processor(path: str, mm_processor_kwargs: dict | None = None) -> Phi4MMProcessor:
    return engine_processor(Phi4MMProcessor, model_config(path, mm_processor_kwargs))


# ---------------------------------------------------------------------------------------------
# Processor


@pytest.mark.parametrize("dynamic_hd", [None, 4, 1])
def test_processor_matches_hf(ckpt, dynamic_hd) -> None:
    kwargs = {} if dynamic_hd is None else {"dynamic_hd": dynamic_hd}
    processor = new_processor(ckpt)
    hf = Phi4MultimodalImageProcessor()
    for i, (h, w) in enumerate(SIZES):
        image = image_tensor(h, w, i)
        entry = processor.preprocess([image], processor.prompt_settings(kwargs))[0]
        ours = processor.expand(image, entry, processor.prompt_settings(kwargs)).data
        theirs = hf(structured_image(w, h, i), return_tensors="pt", **kwargs)
        n = ours["pixel_values"].shape[0]
        assert theirs["image_pixel_values"].shape[1] == n, (h, w)
        diff = (ours["pixel_values"] - theirs["image_pixel_values"][0]).abs().max().item()
        assert diff < PIXEL_ATOL, (h, w, diff)
        assert torch.equal(ours["patch_mask"], theirs["image_attention_mask"][0].bool()), (h, w)
        rows, cols = ours["hd_layout"][:2].tolist()
        assert theirs["image_sizes"][0].tolist() == [rows * 448, cols * 448]
        count = processor.expand(image, entry, processor.prompt_settings(kwargs)).length
        assert (
            count
            == theirs["num_img_tokens"][0]
            == image_token_count(h, w, processor.prompt_settings(kwargs))
        )
        assert count == hf.get_number_of_image_tokens(h, w, kwargs)


def test_prompt_tags_and_kwargs(ckpt) -> None:
    processor = new_processor(ckpt, {"dynamic_hd": 2})
    tok = processor.tokenizer
    ids = processor.encode_prompt("<|user|><|image_1|> and <|image_2|>?<|end|><|assistant|>")
    assert ids.count(IMAGE_TOKEN_ID) == 2 and ids[0] == tok.convert_tokens_to_ids("<|user|>")
    images = [image_tensor(900, 1400, 1), image_tensor(100, 120, 2)]
    out = processor.process(ids, images, {})
    assert [f.data["pixel_values"].shape[0] for f in out.mm_features] == [3, 2]  # 2 crops max
    wide = processor.process(ids, images, {"num_crops": 6})  # per prompt, HF's default for 1
    assert wide.mm_features[0].data["pixel_values"].shape[0] > 3
    assert out.mm_features[0].mm_hash != wide.mm_features[0].mm_hash
    expanded = processor.process(out.prompt_token_ids, images, {})  # HF's expanded ids kept
    assert expanded.prompt_token_ids == out.prompt_token_ids


def test_processor_errors(ckpt) -> None:
    processor = new_processor(ckpt)
    with pytest.raises(ValueError, match="audio"):
        processor.encode_prompt("<|user|><|audio_1|>Transcribe<|end|>")
    with pytest.raises(ValueError, match="in order"):
        processor.encode_prompt("<|image_2|><|image_1|>")
    ids = processor.encode_prompt("<|user|><|image_1|>x<|end|>")
    with pytest.raises(ValueError, match="dynamic_hd"):
        processor.process(ids, [image_tensor(50, 50, 0)], {"max_crops": 3})
    with pytest.raises(ValueError, match="positive int"):
        processor.process(ids, [image_tensor(50, 50, 0)], {"dynamic_hd": 0})
    with pytest.raises(ValueError, match="1 images were given|2 images"):
        processor.process(ids, [image_tensor(50, 50, 0)] * 2, {})
    with pytest.raises(ValueError, match="aspect ratio"):
        processor.process(ids, [image_tensor(2, 2000, 0)], {})
    image = image_tensor(50, 50, 0)
    expanded = processor.process(ids, [image], {}).prompt_token_ids
    with pytest.raises(ValueError, match="more image tokens"):
        processor.process(expanded + [IMAGE_TOKEN_ID], [image], {})
    with pytest.raises(ValueError, match="more image tokens"):
        processor.process(expanded, [], {})


# ---------------------------------------------------------------------------------------------
# Rotary and the model


def test_longrope_matches_hf() -> None:
    config = tiny_phi4mm_config()
    rope = PhiRope.from_hf(config)
    assert rope.rotary_dim == ROTARY_DIM
    module = rope.build()
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](config, None)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=4097)
    assert not torch.allclose(short, long)
    positions = torch.tensor([0, 5, 4095, 4096, 9000])
    cos, sin = module(positions)
    for i, p in enumerate(positions.tolist()):
        inv = short if p < 4096 else long
        freqs = torch.cat([p * inv, p * inv])
        assert torch.allclose(cos[i], freqs.cos() * factor, atol=1e-6)
        assert torch.allclose(sin[i], freqs.sin() * factor, atol=1e-6)
    x = torch.randn(5, 3, 16)  # partial rotary: the last 4 dims pass through
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., ROTARY_DIM:], x[..., ROTARY_DIM:])
    assert not torch.allclose(out[..., :ROTARY_DIM], x[..., :ROTARY_DIM])


def _ours(path: str) -> Phi4MMForCausalLM:
    model = Phi4MMForCausalLM(load_hf_config(path))
    model.load_weights(iterate_weights(path))
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("layout", ["transformers", "published"])
def test_image_features_match_hf(ckpt, published_ckpt, ref, layout) -> None:
    model = _ours(ckpt if layout == "transformers" else published_ckpt)
    processor = new_processor(ckpt)
    prompt = ref.chat_prompt(3, QUESTION)
    images = [(300, 500, 1), (700, 460, 2), (90, 60, 3)]
    out = processor.process(processor.encode_prompt(prompt), [image_tensor(*a) for a in images], {})
    inputs = ref.inputs(prompt, [structured_image(w, h, v) for h, w, v in images])
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    ids = inputs["input_ids"]
    base = ref.model.model.embed_tokens(ids)
    hf = ref.model.model.embed_tokens_extend.image_embed(
        ids, base, inputs["image_pixel_values"], inputs["image_sizes"],
        inputs["image_attention_mask"],
    )[0][ids[0] == IMAGE_TOKEN_ID]  # fmt: skip
    ours = torch.cat(model.encode_images(out.mm_features))
    assert ours.shape == hf.shape
    assert (ours - hf).abs().max().item() < FEATURE_ATOL


def test_load_weights_rejects_missing_and_unexpected(ckpt) -> None:
    weights = dict(iterate_weights(ckpt))
    model = Phi4MMForCausalLM(load_hf_config(ckpt))
    missing = {k: v for k, v in weights.items() if "img_projection_down.weight" not in k}
    with pytest.raises(ValueError, match="missing"):
        model.load_weights(missing.items())
    extra = {**weights, "model.embed_tokens_extend.image_embed.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected"):
        Phi4MMForCausalLM(load_hf_config(ckpt)).load_weights(extra.items())
    config = load_hf_config(ckpt)
    config.sliding_window = 64
    with pytest.raises(ValueError, match="sliding_window"):
        Phi4MMForCausalLM(config)


def test_published_config_reads_as_transformers(ckpt, published_ckpt) -> None:
    ours, theirs = load_hf_config(published_ckpt), load_hf_config(ckpt)
    assert ours.architectures == ["Phi4MMForCausalLM"]
    assert PhiRope.from_hf(ours) == PhiRope.from_hf(theirs)
    for key in ("hidden_size", "num_key_value_heads", "tie_word_embeddings", "vocab_size"):
        assert getattr(ours, key) == getattr(theirs, key)
    assert ours.vision_config.to_dict() | {
        "_name_or_path": ""
    } == theirs.vision_config.to_dict() | {"_name_or_path": ""}


# ---------------------------------------------------------------------------------------------
# The engine


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 4096)
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


def test_published_layout_and_kwargs_match_reference(published_ckpt, ref, batch) -> None:
    llm = _llm(published_ckpt, max_lora_rank=320)
    outputs = _generate(llm, batch, mm_processor_kwargs={"dynamic_hd": 1})
    ref_inputs = ref.inputs
    ref.inputs = lambda prompt, images: ref_inputs(prompt, images, dynamic_hd=1)
    try:
        for (prompt, images), output in zip(batch, outputs):
            compare_with_reference(ref, prompt, images, output)
    finally:
        ref.inputs = ref_inputs
    full = _generate(llm, batch[:1])  # without the kwarg: more crops, a longer prompt
    assert len(full[0].prompt_token_ids) > len(outputs[0].prompt_token_ids)


def test_prefix_caching_and_chunked_prefill(ckpt, batch) -> None:
    baseline = _generate(_llm(ckpt, enable_prefix_caching=False), batch)

    tol = max(2e-3, TEST_ATOL)  # bf16 on the GPU: other step shapes round differently

    def check(outputs):
        assert_same_outputs(outputs, baseline, tol)

    llm = _llm(ckpt, enable_prefix_caching=True)
    check(_generate(llm, batch))
    second = _generate(llm, batch)
    check(second)
    assert all(o.num_cached_tokens > 0 for o in second)
    chunked = _llm(ckpt, max_num_batched_tokens=256, max_num_seqs=2, enable_prefix_caching=False)
    check(_generate(chunked, batch))  # every image's span is longer than a chunk


def test_swapping_images_changes_logprobs(ckpt, ref) -> None:
    prompt = ref.chat_prompt(2, QUESTION)
    a, b = structured_image(224, 168, 0), structured_image(224, 168, 5)  # same layout
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    out = _generate(_llm(ckpt), [(prompt, [a, b]), (prompt, [b, a])], params)
    assert_swap_changes_logprobs(*out)


def test_audio_is_refused(ckpt) -> None:
    llm = _llm(ckpt)
    with pytest.raises(ValueError, match="images only"):
        llm.generate({"prompt": "<|user|><|audio_1|>hi<|end|>"}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="audio"):
        llm.generate(
            {"prompt": "<|user|>hi<|end|>", "multi_modal_data": {"audio": [b""]}},
            GREEDY,
            use_tqdm=False,
        )


# ---------------------------------------------------------------------------------------------
# The bench preset


def test_bench_preset_is_the_published_shape(tmp_path, monkeypatch) -> None:
    from vlmx.bench.floor import meta_model
    from vlmx.bench.presets import preset_path

    monkeypatch.setenv("VLMX_CACHE_DIR", str(tmp_path))
    path = preset_path("phi-4-multimodal")
    config = load_hf_config(path)
    assert config.architectures == ["Phi4MMForCausalLM"]
    rope = PhiRope.from_hf(config)
    assert (rope.rotary_dim, rope.original_max_position_embeddings) == (96, 4096)
    assert rope.attention_factor == pytest.approx(1.1902380714238083)  # sqrt(1 + ln 32 / ln 4096)
    mc = model_config(path)
    model = meta_model(mc)  # shapes only
    decoder = sum(p.numel() for p in model.model.parameters())
    tower = sum(p.numel() for p in model.image_embed.img_processor.parameters())
    projection = sum(p.numel() for n, p in model.image_embed.named_parameters()) - tower
    assert decoder == 3_836_021_760  # Phi-4-mini: 3.84B, embeddings tied
    d, i = 1152, 4304  # SigLIP-so400m-patch14-448, its first 26 of 27 layers (feature_layer -2)
    layer = 4 * (d * d + d) + 4 * d + (d * i + i) + (i * d + d)
    assert tower == 26 * layer + (d * 3 * 14 * 14 + d) + 32 * 32 * d
    assert projection == 1152 * 3072 + 3072 + 3072 * 3072 + 3072 + 2 * 1152
    tokenizer = AutoTokenizer.from_pretrained(path, config=mc.hf_config)  # no phi4mm in HF
    processor = Phi4MMProcessor(mc, tokenizer, torch.device("cpu"))
    ids = processor.encode_prompt("<|user|><|image_1|><|image_2|>Hi<|end|><|assistant|>")
    assert ids[:3] == [200021, 200010, 200010] and ids[-2:] == [200020, 200019]


def test_bench_runs_vlmx_and_hf_on_a_tiny_checkpoint(ckpt, published_ckpt, tmp_path, capsys):
    import json

    from vlmx.bench.run import run_hf
    from vlmx.cli import main

    with pytest.raises(ValueError, match="published Phi-4 layout"):
        run_hf(published_ckpt, "w2-decode", 1)
    out_file = tmp_path / "results.json"
    args = ["bench", "--model", ckpt, "--workload", "w2-decode", "--output-len", "4"]
    args += ["--num-prompts", "2", "--backend", "both", "--hf-batch-size", "2"]
    args += ["--device", "cpu", "--json", str(out_file)]
    assert main(args) == 0
    assert capsys.readouterr().out.count("RESULT ") == 2
    vlmx_result, hf_result = json.loads(out_file.read_text())
    for result in (vlmx_result, hf_result):
        assert result["prompts"] == 2 and result["output_tokens"] == 2 * 4
    assert vlmx_result["input_tokens"] == hf_result["input_tokens"]  # the same prompts


# ---------------------------------------------------------------------------------------------
# The vision LoRA


def test_vision_lora_matches_peft(ckpt, published_ckpt, ref, batch) -> None:
    """The checkpoint's vision-lora (fused qkv_proj / gate_up_proj targets) through
    LoRARequest, as vLLM's example names it, against HF with the adapter applied by PEFT; a
    batch mixing it and the base model; the published layout's adapter folder too."""
    from peft import PeftModel

    from vlmx import LoRARequest

    lora = LoRARequest("vision", 1, f"{ckpt}/vision-lora")
    llm = _llm(ckpt, enable_lora=True, max_lora_rank=320)
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in batch]
    adapted = llm.generate(prompts, GREEDY, lora_request=lora, use_tqdm=False)
    mixed = llm.generate(prompts, GREEDY, lora_request=[lora, None], use_tqdm=False)
    base_model = ref.model
    # NOTE: PEFT injects its layers into the model it wraps: wrap a copy
    ref.model = PeftModel.from_pretrained(copy.deepcopy(base_model), f"{ckpt}/vision-lora")
    try:
        for (prompt, images), output in zip(batch, adapted):
            compare_with_reference(ref, prompt, images, output)
        assert mixed[0].outputs[0].token_ids == adapted[0].outputs[0].token_ids
    finally:
        ref.model = base_model
    compare_with_reference(ref, *batch[1], mixed[1])  # the base model, in the same batch
    base = _generate(llm, batch[:1])[0]
    assert base.outputs[0].token_ids != adapted[0].outputs[0].token_ids  # the adapter matters
    published = _llm(published_ckpt, enable_lora=True, max_lora_rank=320)
    lora_pub = LoRARequest("vision", 1, f"{published_ckpt}/vision-lora")
    again = published.generate(prompts[:1], GREEDY, lora_request=lora_pub, use_tqdm=False)
    assert again[0].outputs[0].token_ids == adapted[0].outputs[0].token_ids
