"""vLLM's offline API, as vLLM's examples use it: building an `LLM`, the prompt forms `generate`
takes, what it returns, sampling options, `chat`, `mm_processor_kwargs` and `fetch_image`."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from tests.engine_helpers import check_idle
from vlmx import (
    LLM,
    CompletionOutput,
    EngineArgs,
    InvalidPromptsError,
    LoRARequest,
    RequestOutput,
    SamplingParams,
)
from vlmx.multimodal import fetch_image

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)
TEXT = "Hello, my name is"


def chat_prompt(num_images: int, question: str = "What is in each image?") -> str:
    return (
        f"<|im_start|>user\n{PLACEHOLDER * num_images}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def _tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _engine_args(model: str, **kwargs) -> EngineArgs:
    # vLLM's multi-image example's arguments for Qwen2-VL, sized down; float32 on the CPU.
    return EngineArgs(
        model=model,
        max_model_len=2048,
        max_num_seqs=5,
        limit_mm_per_prompt={"image": 2},
        seed=0,
        dtype="float32",
        device="cpu",
        **kwargs,
    )


@pytest.fixture(scope="module")
def llm(qwen2_vl_ckpt) -> LLM:
    return LLM(**dataclasses.asdict(_engine_args(qwen2_vl_ckpt)))


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def first_token(llm) -> int:
    """The token greedy decoding of TEXT starts with."""
    return llm.generate(TEXT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids[0]


# ---------------------------------------------------------------------------------------------
# Building an LLM


def test_llm_from_asdict_engine_args(llm, qwen2_vl_ckpt):
    config = llm.llm_engine.config
    assert config.scheduler_config.max_num_seqs == 5
    assert config.scheduler_config.max_model_len == 2048
    assert config.model_config.max_images_per_prompt == 2
    assert config.seed == 0
    assert llm.engine_args == _engine_args(qwen2_vl_ckpt)


def test_asdict_with_seed_override(llm, qwen2_vl_ckpt):
    """vLLM's examples: `LLM(**(asdict(engine_args) | {"seed": args.seed}))`, seed may be None."""
    unseeded = LLM(**(dataclasses.asdict(_engine_args(qwen2_vl_ckpt)) | {"seed": None}))
    assert unseeded.llm_engine.config.seed is None
    prompts = [TEXT, {"prompt": chat_prompt(1), "multi_modal_data": {"image": _image(0)}}]
    expected = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert _tokens(unseeded.generate(prompts, GREEDY, use_tqdm=False)) == expected
    sampled = unseeded.generate(TEXT, SamplingParams(temperature=1.0, max_tokens=3), use_tqdm=False)
    assert len(sampled[0].outputs[0].token_ids) == 3


def test_default_sampling_params(llm):
    params = llm.get_default_sampling_params()
    assert isinstance(params, SamplingParams)
    (output,) = llm.generate(TEXT, use_tqdm=False)  # sampled: may end on eos
    assert 1 <= len(output.outputs[0].token_ids) <= params.max_tokens


# ---------------------------------------------------------------------------------------------
# Prompts


def _image(idx: int) -> Image.Image:
    from vlmx.demo.images import structured_image

    sizes = [(224, 224), (320, 160), (150, 330), (64, 96)]
    width, height = sizes[idx]
    return structured_image(width, height, idx)


def test_prompt_forms(llm, tokenizer):
    """str, {"prompt"}, {"prompt_token_ids"}, alone or in a list: the same request."""
    text_ids = tokenizer.encode(TEXT)
    outputs = [
        llm.generate(TEXT, GREEDY, use_tqdm=False),
        llm.generate([TEXT], GREEDY, use_tqdm=False),
        llm.generate({"prompt": TEXT}, GREEDY, use_tqdm=False),
        llm.generate([{"prompt_token_ids": text_ids}], [GREEDY], use_tqdm=False),
    ]
    for out in outputs:
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], RequestOutput)
        assert out[0].prompt_token_ids == text_ids
    assert len({tuple(out[0].outputs[0].token_ids) for out in outputs}) == 1
    assert [out[0].prompt for out in outputs] == [TEXT, TEXT, TEXT, None]


def test_prompt_token_ids_with_images(llm, tokenizer):
    images = [_image(0), _image(1)]
    text = chat_prompt(2)
    by_text = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, GREEDY)
    by_ids = llm.generate(
        {"prompt_token_ids": tokenizer.encode(text), "multi_modal_data": {"image": images}}, GREEDY
    )
    assert by_ids[0].prompt_token_ids == by_text[0].prompt_token_ids
    assert len(by_text[0].prompt_token_ids) > len(tokenizer.encode(text)) + 2  # expanded
    assert _tokens(by_ids) == _tokens(by_text)


def test_sampling_params_one_or_one_per_prompt(llm):
    prompts = [TEXT, "The capital of France is", "1, 2, 3,"]
    lengths = [1, 3, 2]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(t) for t in _tokens(outputs)] == lengths
    shared = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert [t[:n] for t, n in zip(_tokens(shared), lengths)] == _tokens(outputs)
    with pytest.raises(ValueError, match=r"2 sampling_params for 3 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)


def test_single_image_not_in_a_list(llm):
    image = _image(1)
    single = llm.generate({"prompt": chat_prompt(1), "multi_modal_data": {"image": image}}, GREEDY)
    listed = llm.generate(
        {"prompt": chat_prompt(1), "multi_modal_data": {"image": [image]}}, GREEDY
    )
    assert single[0].prompt_token_ids == listed[0].prompt_token_ids
    assert _tokens(single) == _tokens(listed)


def test_tensor_and_array_images_match_pil(llm):
    images = [_image(2), _image(3)]
    array = [np.asarray(im) for im in images]  # [H, W, 3] uint8
    tensor = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in array]  # [3, H, W] uint8
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=1)
    outputs = llm.generate(
        [{"prompt": chat_prompt(2), "multi_modal_data": {"image": x}} for x in (images, tensor)]
        + [{"prompt": chat_prompt(2), "multi_modal_data": {"image": array}}],
        params,
        use_tqdm=False,
    )
    pil, *others = outputs
    for other in others:
        assert other.prompt_token_ids == pil.prompt_token_ids
        assert other.outputs[0].token_ids == pil.outputs[0].token_ids
        assert other.outputs[0].cumulative_logprob == pil.outputs[0].cumulative_logprob


# ---------------------------------------------------------------------------------------------
# Outputs


def test_outputs_in_input_order(llm, tokenizer):
    """More prompts than max_num_seqs=5, finishing in another order than they came."""
    prompts = [
        TEXT,
        {"prompt": chat_prompt(1), "multi_modal_data": {"image": _image(0)}},
        "The capital of France is",
        {"prompt": chat_prompt(2), "multi_modal_data": {"image": [_image(1), _image(3)]}},
        "1, 2, 3,",
        {"prompt_token_ids": tokenizer.encode("Once upon a time")},
        "A" * 40,
    ]
    lengths = [7, 2, 5, 1, 6, 3, 4]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts)
    assert len({o.request_id for o in outputs}) == len(prompts)
    for prompt, n, out in zip(prompts, lengths, outputs):
        assert isinstance(out.request_id, str) and out.finished
        text = prompt if isinstance(prompt, str) else prompt.get("prompt")
        assert out.prompt == text
        if text is not None and "multi_modal_data" not in prompt:
            assert out.prompt_token_ids == tokenizer.encode(text)
        (completion,) = out.outputs
        assert isinstance(completion, CompletionOutput) and completion.index == 0
        assert len(completion.token_ids) == n
        assert completion.finish_reason == "length" and completion.stop_reason is None
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.logprobs is None and completion.cumulative_logprob is None


def test_stop_token_ids(llm, first_token):
    (out,) = llm.generate(
        TEXT, SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=[first_token])
    )
    completion = out.outputs[0]
    assert completion.finish_reason == "stop"
    assert completion.stop_reason == first_token
    assert completion.token_ids == [first_token]  # kept in the ids, as in vLLM
    assert completion.text == ""  # but not in the text


def test_min_tokens_holds_back_stop_token_ids(llm, first_token):
    params = SamplingParams(
        temperature=0.0, max_tokens=6, min_tokens=3, stop_token_ids=[first_token]
    )
    completion = llm.generate(TEXT, params, use_tqdm=False)[0].outputs[0]
    assert len(completion.token_ids) >= 3
    assert first_token not in completion.token_ids[:3]
    if completion.finish_reason == "stop":
        assert completion.token_ids[-1] == first_token == completion.stop_reason
    else:
        assert completion.finish_reason == "length" and len(completion.token_ids) == 6


@pytest.fixture(scope="module")
def eos_llm(qwen2_vl_ckpt, first_token, tmp_path_factory) -> LLM:
    """The same model, with the first greedy token of TEXT declared an eos token."""
    folder = tmp_path_factory.mktemp("eos") / "ckpt"
    shutil.copytree(qwen2_vl_ckpt, folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    eos = config.get("eos_token_id") or []
    config["eos_token_id"] = [*(eos if isinstance(eos, list) else [eos]), first_token]
    path.write_text(json.dumps(config))
    return LLM(**dataclasses.asdict(_engine_args(str(folder))))


def test_eos_ignore_eos_and_min_tokens(eos_llm, first_token):
    def run(**kwargs) -> CompletionOutput:
        params = SamplingParams(temperature=0.0, max_tokens=5, **kwargs)
        return eos_llm.generate(TEXT, params, use_tqdm=False)[0].outputs[0]

    stopped = run()
    assert stopped.token_ids == [first_token] and stopped.text == ""
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None  # eos: no reason

    ignored = run(ignore_eos=True)
    assert len(ignored.token_ids) == 5 and ignored.token_ids[0] == first_token
    assert ignored.finish_reason == "length"

    held = run(min_tokens=3)
    assert len(held.token_ids) >= 3 and first_token not in held.token_ids[:3]


def test_stop_strings(llm):
    base = llm.generate(TEXT, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    text = base[0].outputs[0].text
    # A 3-character stop string whose first occurrence starts past the text's start.
    start = next(k for k in range(1, len(text) - 2) if text.find(text[k : k + 3]) == k)
    stop = text[start : start + 3]

    def run(**kwargs) -> CompletionOutput:
        params = SamplingParams(temperature=0.0, max_tokens=10, stop=[stop, "never-seen"], **kwargs)
        return llm.generate(TEXT, params, use_tqdm=False)[0].outputs[0]

    cut = run()
    assert cut.text == text[:start]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert len(cut.token_ids) < len(base[0].outputs[0].token_ids)
    kept = run(include_stop_str_in_output=True)
    assert kept.text == text[: start + 3] and kept.stop_reason == stop


def test_n_completions_with_seed(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=6)
    prompts = [TEXT, {"prompt": chat_prompt(1), "multi_modal_data": {"image": _image(0)}}]
    first = llm.generate(prompts, params, use_tqdm=False)
    second = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(first, second):
        assert [c.index for c in a.outputs] == [0, 1]
        assert all(len(c.token_ids) == 6 for c in a.outputs)
        assert a.outputs[0].token_ids != a.outputs[1].token_ids
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.text for c in a.outputs] == [c.text for c in b.outputs]


def test_seeded_sampling_is_reproducible_and_ignores_neighbours(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=6)
    target = {"prompt": chat_prompt(1), "multi_modal_data": {"image": _image(2)}}
    alone = _tokens(llm.generate([TEXT, target], seeded, use_tqdm=False))
    assert alone == _tokens(llm.generate([TEXT, target], seeded, use_tqdm=False))
    neighbours = [
        ("1, 2, 3,", SamplingParams(temperature=1.0, max_tokens=8)),  # unseeded
        (target, seeded),
        ({"prompt": chat_prompt(2), "multi_modal_data": {"image": [_image(0), _image(1)]}}, GREEDY),
        ("The capital of France is", SamplingParams(temperature=0.7, seed=99, max_tokens=3)),
        (TEXT, seeded),
    ]
    batch = llm.generate([p for p, _ in neighbours], [s for _, s in neighbours], use_tqdm=False)
    assert [batch[4].outputs[0].token_ids, batch[1].outputs[0].token_ids] == alone


def test_logprobs(llm, tokenizer):
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=2)
    prompts = [TEXT, {"prompt": chat_prompt(1), "multi_modal_data": {"image": _image(3)}}]
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids) == 4
        total = 0.0
        for token_id, entry in zip(completion.token_ids, completion.logprobs):
            assert token_id in entry and 2 <= len(entry) <= 3  # top 2 + the sampled one
            for tid, logprob in entry.items():
                assert type(logprob).__name__ == "Logprob"
                assert logprob.logprob <= 0.0 and math.isfinite(logprob.logprob)
                assert logprob.decoded_token == tokenizer.decode([tid])
            ranks = sorted(lp.rank for lp in entry.values())
            assert ranks[:2] == [1, 2]
            assert entry[token_id].rank == 1  # greedy takes the top token
            total += entry[token_id].logprob
        assert completion.cumulative_logprob == pytest.approx(total)


def test_lora_request_is_refused_without_enable_lora(llm):
    lora = LoRARequest("a", 1, "/x")
    messages = [{"role": "user", "content": "Hi"}]
    calls = [
        lambda: llm.generate(TEXT, GREEDY, lora_request=lora),
        lambda: llm.generate([TEXT, TEXT], GREEDY, lora_request=[lora, lora]),
        lambda: llm.chat(messages, GREEDY, lora_request=lora),
        lambda: llm.llm_engine.add_request("lora", TEXT, GREEDY, lora_request=lora),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"lora_request was given.*enable_lora=False"):
            call()
    assert not llm.llm_engine.has_unfinished_requests()


def test_get_tokenizer(llm, tokenizer):
    assert tokenizer is llm.llm_engine.tokenizer
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tokenizer.eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------
# fetch_image


def test_fetch_image_from_path_and_data_url(tmp_path):
    rgb = _image(1)
    path = tmp_path / "rgb.png"
    rgb.save(path)
    from_path = fetch_image(str(path))
    assert isinstance(from_path, Image.Image) and from_path.mode == "RGB"
    assert from_path.size == rgb.size and np.array_equal(np.asarray(from_path), np.asarray(rgb))

    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    from_url = fetch_image(url)
    assert isinstance(from_url, Image.Image) and from_url.mode == "RGB"
    assert from_url.size == (20, 10) and from_url.getpixel((3, 3)) == (255, 0, 0)


# ---------------------------------------------------------------------------------------------
# mm_processor_kwargs, against transformers' processor


MAX_PIXELS = 150_000  # a 640x480 image is 391 image tokens by default, 177 with this
BIG_MIN_PIXELS = 200_000  # a 64x96 image is 6 image tokens by default, 256 with this


@pytest.fixture(scope="module")
def hf_processor(qwen2_vl_ckpt):
    return AutoProcessor.from_pretrained(qwen2_vl_ckpt)


def _hf_ids(processor, text: str, image: Image.Image, **size) -> list[int]:
    """transformers 5.24 takes the pixel budget as size={"shortest_edge": min_pixels,
    "longest_edge": max_pixels} (min_pixels / max_pixels call kwargs are deprecated)."""
    base = processor.image_processor.size
    kwargs = {}
    if size:
        kwargs["size"] = {
            "shortest_edge": size.get("min_pixels", base.shortest_edge),
            "longest_edge": size.get("max_pixels", base.longest_edge),
        }
    return list(processor(text=[text], images=[image], **kwargs)["input_ids"][0])


def test_mm_processor_kwargs_per_prompt_match_transformers(llm, hf_processor):
    from vlmx.demo.images import structured_image

    text = chat_prompt(1)
    large, small = structured_image(640, 480, 1), structured_image(64, 96, 4)
    default = _hf_ids(hf_processor, text, large)
    reduced = _hf_ids(hf_processor, text, large, max_pixels=MAX_PIXELS)
    enlarged = _hf_ids(hf_processor, text, small, min_pixels=BIG_MIN_PIXELS)
    assert len(reduced) < len(default)
    with warnings.catch_warnings():  # the deprecated call form, for the same result
        warnings.simplefilter("ignore", FutureWarning)
        legacy = hf_processor(text=[text], images=[large], images_kwargs={"max_pixels": MAX_PIXELS})
    assert list(legacy["input_ids"][0]) == reduced

    def prompt(image, **kwargs) -> dict:
        p = {"prompt": text, "multi_modal_data": {"image": image}}
        return p | ({"mm_processor_kwargs": kwargs} if kwargs else {})

    outputs = llm.generate(
        [
            prompt(large),
            prompt(large, max_pixels=MAX_PIXELS),
            prompt(small, min_pixels=BIG_MIN_PIXELS),
        ],
        GREEDY,
        use_tqdm=False,
    )
    assert [o.prompt_token_ids for o in outputs] == [default, reduced, enlarged]

    message = [
        {
            "role": "user",
            "content": [
                {"type": "image_pil", "image_pil": large},
                {"type": "text", "text": "What is in each image?"},
            ],
        }
    ]
    chat = llm.chat(message, GREEDY, use_tqdm=False, mm_processor_kwargs={"max_pixels": MAX_PIXELS})
    assert sum(t == 151655 for t in chat[0].prompt_token_ids) == reduced.count(151655)

    with pytest.raises(InvalidPromptsError, match=r"unknown mm_processor_kwargs \['max_pixel'\]"):
        llm.generate([prompt(small), prompt(large, max_pixel=MAX_PIXELS)], GREEDY, use_tqdm=False)


def test_mm_processor_kwargs_engine_wide_match_transformers(qwen2_vl_ckpt, hf_processor):
    from vlmx.demo.images import structured_image

    text = chat_prompt(1)
    large = structured_image(640, 480, 1)
    args = _engine_args(qwen2_vl_ckpt, mm_processor_kwargs={"max_pixels": MAX_PIXELS})
    reduced_llm = LLM(**dataclasses.asdict(args))
    prompt = {"prompt": text, "multi_modal_data": {"image": large}}
    default_max = hf_processor.image_processor.size.longest_edge
    outputs = reduced_llm.generate(
        [prompt, prompt | {"mm_processor_kwargs": {"max_pixels": default_max}}],
        GREEDY,
        use_tqdm=False,
    )
    # Per-prompt kwargs override the engine-wide ones.
    assert [o.prompt_token_ids for o in outputs] == [
        _hf_ids(hf_processor, text, large, max_pixels=MAX_PIXELS),
        _hf_ids(hf_processor, text, large),
    ]
    with pytest.raises(ValueError, match=r"unknown mm_processor_kwargs \['fps'\]"):
        LLM(**dataclasses.asdict(_engine_args(qwen2_vl_ckpt, mm_processor_kwargs={"fps": 1})))


# ---------------------------------------------------------------------------------------------
# chat


def _user(*images, text: str = "What is in each image?") -> dict:
    content = [{"type": "image_pil", "image_pil": im} for im in images]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


# A template on one line, as chat templates often come (newlines written as {{ '\\n' }}).
TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] "
    "{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for part in m.content %}"
    "{% if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part.text }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.mark.parametrize(
    "template",
    # The same template over several lines (a newline after a block tag is not rendered).
    [TEMPLATE, TEMPLATE.replace("%}{%", "%}\n{%")],
    ids=["one-line", "multi-line"],
)
def test_chat_with_template_string(llm, template):
    messages = [{"role": "system", "content": "Be brief."}, _user(_image(0), text="Describe.")]
    (out,) = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template)
    expected = f"[system] Be brief.\n[user] {PLACEHOLDER}Describe.\n[assistant] "
    assert out.prompt == expected
    (same,) = llm.generate({"prompt": expected, "multi_modal_data": {"image": [_image(0)]}}, GREEDY)
    assert out.prompt_token_ids == same.prompt_token_ids
    assert out.outputs[0].token_ids == same.outputs[0].token_ids


def test_chat_generation_prompt_and_continue_final_message(llm):
    user = _user(_image(3))
    (default,) = llm.chat([user], GREEDY, use_tqdm=False)
    assert default.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    (no_prompt,) = llm.chat([user], GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert no_prompt.prompt.endswith("What is in each image?<|im_end|>\n")
    assert no_prompt.prompt == default.prompt[: -len("<|im_start|>assistant\n")]

    partial = {"role": "assistant", "content": "The image shows"}
    (continued,) = llm.chat(
        [user, partial],
        GREEDY,
        use_tqdm=False,
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert continued.prompt == default.prompt + "The image shows"
    assert len(continued.outputs[0].token_ids) == GREEDY.max_tokens

    with pytest.raises(ValueError, match=r"cannot both be True"):
        llm.chat([user, partial], GREEDY, use_tqdm=False, continue_final_message=True)


def test_chat_batch_of_conversations(llm):
    conversations = [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
        [_user(_image(0), _image(1))],
        [
            _user(_image(2), text="What is this?"),
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": "Which colours?"},
        ],
    ]
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    assert len(outputs) == 3
    assert [o.prompt.count("<|vision_start|>") for o in outputs] == [0, 2, 1]
    assert "You are terse." in outputs[0].prompt and "Which colours?" in outputs[2].prompt
    images = [[], [_image(0), _image(1)], [_image(2)]]
    expected = llm.generate(
        [
            {"prompt": o.prompt, "multi_modal_data": {"image": im}} if im else o.prompt
            for o, im in zip(outputs, images)
        ],
        GREEDY,
        use_tqdm=False,
    )
    assert [o.prompt_token_ids for o in outputs] == [e.prompt_token_ids for e in expected]
    assert _tokens(outputs) == _tokens(expected)
    (single,) = llm.chat(conversations[1], GREEDY, use_tqdm=False)
    assert single.outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_chat_takes_one_message_dict(llm):
    """`llm.chat` takes one message, one conversation or a list of them, as vLLM's does."""
    user = _user(_image(3))
    (one,) = llm.chat(user, GREEDY, use_tqdm=False)
    (listed,) = llm.chat([user], GREEDY, use_tqdm=False)
    (nested,) = llm.chat([[user]], GREEDY, use_tqdm=False)
    assert one.prompt == listed.prompt == nested.prompt
    assert one.outputs[0].token_ids == listed.outputs[0].token_ids == nested.outputs[0].token_ids


@pytest.mark.parametrize(
    ("messages", "cause"),
    [
        ([], r"got an empty list"),
        ("What is this?", r"got a str"),
        ([{"role": "user", "content": "hi"}, [{"role": "user", "content": "hi"}]], r"mixes"),
        ([{"role": "user", "content": "hi"}, "hi"], r"item 1 is a str"),
    ],
)
def test_chat_rejects_other_forms_at_once(llm, messages, cause):
    with pytest.raises(ValueError, match=cause) as excinfo:
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert not isinstance(excinfo.value, InvalidPromptsError)
    assert "one conversation (a list of such dicts)" in str(excinfo.value)


def test_chat_reports_a_bad_conversation_and_runs_the_rest(llm):
    good = [{"role": "user", "content": "Hi!"}]
    with pytest.raises(InvalidPromptsError) as excinfo:
        llm.chat([good, ["hello"], []], GREEDY, use_tqdm=False)
    errors = excinfo.value.errors
    assert sorted(errors) == [1, 2]
    assert "messages[0] must be a dict" in errors[1] and "messages is empty" in errors[2]
    (expected,) = llm.chat(good, GREEDY, use_tqdm=False)
    assert excinfo.value.outputs[0].outputs[0].token_ids == expected.outputs[0].token_ids


# ---------------------------------------------------------------------------------------------
# One LLM shared by threads


def test_two_threads_get_their_own_outputs(llm):
    """Calls from two threads on one LLM run one at a time: each gets exactly the outputs it
    gets alone, whatever the other runs meanwhile (generate against chat, different prompts)."""
    texts = [f"{TEXT} {name}" for name in ("Ada", "Bob", "Cy", "Dee", "Eve", "Fay")]
    long = SamplingParams(temperature=0.0, max_tokens=7)
    conversations = [[_user(_image(i % 4), text=f"Image {i}?")] for i in range(4)]
    alone_generate = _tokens(llm.generate(texts, long, use_tqdm=False))
    alone_chat = _tokens(llm.chat(conversations, GREEDY, use_tqdm=False))
    assert len({tuple(t) for t in alone_generate}) > 1
    barrier = threading.Barrier(2)
    results: dict[str, list] = {"generate": [], "chat": []}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                if name == "generate":
                    results[name].append(_tokens(llm.generate(texts, long, use_tqdm=False)))
                else:
                    results[name].append(_tokens(llm.chat(conversations, GREEDY, use_tqdm=False)))
        except BaseException as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert results["generate"] == [alone_generate] * 3
    assert results["chat"] == [alone_chat] * 3
    check_idle(llm)


def test_reset_during_another_threads_call_returns_false(llm, monkeypatch):
    started, release = threading.Event(), threading.Event()
    engine = llm.llm_engine
    process_prompt = engine.process_prompt

    def slow_process_prompt(prompt):
        started.set()
        release.wait(timeout=60)
        return process_prompt(prompt)

    monkeypatch.setattr(engine, "process_prompt", slow_process_prompt)
    outputs: list = []
    thread = threading.Thread(target=lambda: outputs.append(llm.generate(TEXT, GREEDY)))
    thread.start()
    assert started.wait(timeout=60)
    assert not llm.reset_prefix_cache() and not llm.reset_mm_cache()
    release.set()
    thread.join(timeout=60)
    assert len(outputs) == 1 and len(outputs[0]) == 1
    assert llm.reset_prefix_cache() and llm.reset_mm_cache()


# ---------------------------------------------------------------------------------------------
# Image limits are engine arguments


def test_image_limits_are_engine_args(qwen2_vl_ckpt, llm, monkeypatch):
    """The limits are read once, when the engine is built: a field that is set, else its
    VLMX_IMAGE_* variable; changing the variable later changes nothing, and other engines keep
    their own limits."""
    monkeypatch.setenv("VLMX_IMAGE_MAX_PIXELS", "20000")
    strict = LLM(**dataclasses.asdict(_engine_args(qwen2_vl_ckpt, image_max_bytes=500_000)))
    monkeypatch.delenv("VLMX_IMAGE_MAX_PIXELS")
    limits = strict.llm_engine.config.model_config.media_limits
    assert (limits.max_pixels, limits.max_bytes, limits.timeout_s) == (20000, 500_000, 10.0)
    prompts = [
        {"prompt": chat_prompt(1), "multi_modal_data": {"image": _image(3)}},  # 64x96 fits
        {"prompt": chat_prompt(1), "multi_modal_data": {"image": _image(0)}},  # 224x224
    ]
    with pytest.raises(InvalidPromptsError) as excinfo:
        strict.generate(prompts, GREEDY, use_tqdm=False)
    assert sorted(excinfo.value.errors) == [1]
    message = excinfo.value.errors[1]
    assert "224x224 = 50176 pixels, over the limit of 20000" in message
    assert "image_max_pixels" in message
    assert len(llm.generate(prompts, GREEDY, use_tqdm=False)) == 2  # the default limits
