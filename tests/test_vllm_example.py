"""vLLM's offline multi-image example, run as a user runs it after one textual edit.

The user's edit is `from vllm` -> `from vlmx` in the imports; nothing else of the file changes but
its two image URLs, whose host is replaced by a loopback server that serves images under the
same paths. The file runs as `__main__` (`--model-type ROW --method generate|chat`), and resolves
its hub ids from a local Hugging Face cache (`tests/hub_cache.py`, offline) that holds a tiny
random checkpoint in the published hub layout under each supported row's hub id.

- A supported row prints exactly the text that vlmx's `LLM` gives for the same request built in
  this test, whose greedy tokens match the Hugging Face model's where its margin is clear.
- An unsupported row fails with a `ValueError` naming what is missing. Its hub id holds a stub
  (`config.json` with the published `architectures` and `model_type`, and a small tokenizer where
  the example loads one before building the engine). A family issue flips its row in `ROWS`.

The example is vLLM's `examples/offline_inference/vision_language_multi_image.py`, kept beside
the repository at `../shared/seed/`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import (
    AriaForConditionalGeneration,
    AutoProcessor,
    AutoTokenizer,
    Gemma3ForConditionalGeneration,
    Idefics3ForConditionalGeneration,
    MllamaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from tests.families import aria_checkpoint, idefics3_checkpoint
from tests.families.gemma3_checkpoint import build_gemma3_checkpoint
from tests.families.h2ovl_checkpoint import build_h2ovl_checkpoint
from tests.families.mllama_checkpoint import build_mllama_checkpoint
from tests.families.phi3v_checkpoint import build_phi3v_checkpoint
from tests.families.phi4mm_checkpoint import build_phi4mm_checkpoint
from tests.hf_reference import HFReference, compare_with_reference
from tests.hub_cache import add_snapshot, use_hub_cache
from tests.loopback import serve_files
from tests.small_tokenizer import build_small_tokenizer
from vlmx import LLM, SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT.parent / "shared" / "seed" / "vision_language_multi_image.py"
IMAGE_HOST = "https://upload.wikimedia.org"
QUESTION = "What is the content of each image?"
QWEN_WARNING = (
    "WARNING: `qwen-vl-utils` not installed, input images will not be automatically resized. "
    "You can enable this functionality by `pip install qwen-vl-utils`.\n"
)


@dataclass(frozen=True)
class Row:
    """One `--model-type` of the example: its hub id and what running it gives today."""

    hub_id: str
    error: str | None = None  # None: runs; else a regex of the ValueError's message
    stub: dict | None = None  # unsupported rows: the published config.json's identity
    stub_tokenizer: bool = False  # the example loads a tokenizer before building the engine


def _unsupported(architecture: str) -> str:
    return rf"checkpoint architectures \['{architecture}'\] are not supported by vlmx"


ROWS = {
    "qwen2_vl": Row("Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2_5_vl": Row("Qwen/Qwen2.5-VL-3B-Instruct"),
    "gemma3": Row("google/gemma-3-4b-it"),
    "idefics3": Row("HuggingFaceM4/Idefics3-8B-Llama3"),
    "aria": Row("rhymes-ai/Aria"),
    "deepseek_vl_v2": Row(
        "deepseek-ai/deepseek-vl2-tiny",
        _unsupported("DeepseekVLV2ForCausalLM"),
        {"architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2"},
    ),
    "h2ovl_chat": Row("h2oai/h2ovl-mississippi-800m"),  # published layout, no folder code
    "internvl_chat": Row(
        "OpenGVLab/InternVL2-2B",
        # NOTE: vlmx reads the published layout now; the stub is no whole checkpoint, and the
        # row does not run yet (the tokenizer built from tokenizer.model is not done)
        r"config.json of model_type 'internvl_chat' has no vision_config / llm_config",
        {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat"},
        stub_tokenizer=True,
    ),
    "mllama": Row("meta-llama/Llama-3.2-11B-Vision-Instruct"),
    "NVLM_D": Row(
        "nvidia/NVLM-D-72B",
        r"tensor_parallel_size=4",
        {"architectures": ["NVLM_D"], "model_type": "NVLM_D"},
        stub_tokenizer=True,
    ),
    "phi3_v": Row("microsoft/Phi-3.5-vision-instruct"),  # published layout, no code run
    "phi4_mm": Row("microsoft/Phi-4-multimodal-instruct"),  # published layout + vision-lora/
    # NOTE: fails on its arguments before looking for the checkpoint, so it needs no stub.
    "pixtral_hf": Row("mistral-community/pixtral-12b", r"tensor_parallel_size=2"),
    "qwen_vl_chat": Row(
        "Qwen/Qwen-VL-Chat",
        # NOTE: a stub (the published identity only); the model is supported (tests/
        # test_qwen_vl.py), but this row does not run yet: the example's ChatML template takes
        # string content (chat_template_content_format "string") and it loads the tokenizer
        # with the folder's code (AutoTokenizer, trust_remote_code=True)
        r"config.json of model_type 'qwen' lacks the published fields",
        {"architectures": ["QWenLMHeadModel"], "model_type": "qwen"},
        stub_tokenizer=True,
    ),
}
SUPPORTED = [row for row, spec in ROWS.items() if spec.error is None]
HF_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "gemma3": Gemma3ForConditionalGeneration,
    "idefics3": Idefics3ForConditionalGeneration,
    "aria": AriaForConditionalGeneration,
    "mllama": MllamaForConditionalGeneration,
}
IDEFICS3_SIZE = {"longest_edge": 2 * 364}  # the example's mm_processor_kwargs["size"]
# The engine arguments the example's loaders pass, for the requests this test builds itself.
ENGINE_KWARGS = {
    "qwen2_vl": {"max_model_len": 32768, "max_num_seqs": 5},
    "qwen2_5_vl": {"max_model_len": 32768, "max_num_seqs": 5},
    "gemma3": {"max_model_len": 8192, "max_num_seqs": 2},
    "idefics3": {
        "max_model_len": 8192,
        "max_num_seqs": 16,
        "enforce_eager": True,
        "mm_processor_kwargs": {"size": IDEFICS3_SIZE},
    },
    # the example's own: the tokenizer's code never runs; bfloat16, so compared within
    # ARIA_ATOL of the float32 reference
    "aria": {"tokenizer_mode": "slow", "trust_remote_code": True, "dtype": "bfloat16"},
    "mllama": {"max_model_len": 4096, "max_num_seqs": 16},
    "phi3_v": {
        "trust_remote_code": True,
        "max_model_len": 4096,
        "max_num_seqs": 2,
        "mm_processor_kwargs": {"num_crops": 4},
    },
    "h2ovl_chat": {
        "trust_remote_code": True,  # the example's own: no code of the folder runs
        "max_model_len": 8192,
        "mm_processor_kwargs": {"max_dynamic_patch": 4},
    },
    "phi4_mm": {
        "max_model_len": 10000,
        "max_num_seqs": 2,
        "enable_lora": True,
        "max_lora_rank": 320,
    },
}
ARIA_ATOL = 0.1
ARIA_PROMPT = (
    "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>\n<fim_prefix><|img|><fim_suffix>\n"
    f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)
MLLAMA_PROMPT = f"<|image|><|image|><|begin_of_text|>{QUESTION}"  # the example's
PHI3V_PROMPT = f"<|user|>\n<|image_1|>\n<|image_2|>\n{QUESTION}<|end|>\n<|assistant|>\n"
PHI4_PROMPT = f"<|user|><|image_1|><|image_2|>{QUESTION}<|end|><|assistant|>"
IDEFICS3_PROMPT = (
    "<|begin_of_text|>User:Image-1: <image>\n\nImage-2: <image>\n\n"
    f"{QUESTION}<end_of_utterance>\nAssistant:"
)


def build_idefics3(folder: Path) -> str:
    """Tiny Idefics3 with the published tiles (364 px, longest edge 4 * 364), so that the
    example's `size={"longest_edge": 2 * 364}` gives 2 x 2 tiles: 26 px patches (14 x 14),
    pixel shuffle 2 -> 49 tokens per tile."""
    family = idefics3_checkpoint.FAMILIES["idefics3"]
    tiny_config = idefics3_checkpoint.tiny_config

    def published_tiles(name: str):
        config = tiny_config(name)
        config.vision_config.image_size, config.vision_config.patch_size = 364, 26
        return config

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(idefics3_checkpoint.FAMILIES, "idefics3", (*family[:3], 364, 2, 4 * 364, True))
        mp.setattr(idefics3_checkpoint, "IMAGE_SEQ_LEN", 49)
        mp.setattr(idefics3_checkpoint, "tiny_config", published_tiles)
        return idefics3_checkpoint.build_checkpoint(folder, "idefics3")


def build_stub(folder: Path, spec: Row) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec.stub, indent=2))
    if spec.stub_tokenizer:
        chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end|>"]
        tokenizer = build_small_tokenizer(512, specials, chat_template, eos_token="<|im_end|>")
        tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def hub_snapshots(tmp_path_factory, qwen2_vl_hub_ckpt, qwen2_5_vl_hub_ckpt) -> dict[str, str]:
    """Every row's checkpoint (or stub) in one hub cache, used for this module's tests;
    returns row -> snapshot folder."""
    cache = tmp_path_factory.mktemp("hub-cache")
    build = tmp_path_factory.mktemp("hub-src")
    sources = {
        "qwen2_vl": qwen2_vl_hub_ckpt,
        "qwen2_5_vl": qwen2_5_vl_hub_ckpt,
        "gemma3": build_gemma3_checkpoint(build / "gemma3", "hub"),
        "idefics3": build_idefics3(build / "idefics3"),
        "aria": aria_checkpoint.build_checkpoint(build / "aria"),
        "mllama": build_mllama_checkpoint(build / "mllama"),
        "phi4_mm": build_phi4mm_checkpoint(build / "phi4_mm", "published"),
        "phi3_v": build_phi3v_checkpoint(build / "phi3_v"),
        "h2ovl_chat": build_h2ovl_checkpoint(build / "h2ovl_chat"),
    }
    for row, spec in ROWS.items():
        if spec.stub is not None:
            sources[row] = build_stub(build / row, spec)
    snapshots = {row: add_snapshot(cache, ROWS[row].hub_id, src) for row, src in sources.items()}
    with pytest.MonkeyPatch.context() as mp:
        use_hub_cache(mp, cache)
        yield snapshots


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def example(tmp_path_factory, test_images):
    """The example with the user's edit, its image URLs on loopback; yields its path, the
    loopback URLs and the images they serve (decoded here)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    urls = re.findall(rf'"({re.escape(IMAGE_HOST)}/[^"]+)"', text)
    assert len(urls) == 2, urls
    edited = text.replace("from vllm", "from vlmx")
    assert not re.search(r"^\s*(from|import) vllm", edited, re.MULTILINE)
    bodies = [jpeg(image) for image in test_images[1:3]]  # 320x160 and 150x330
    files = {url.removeprefix(IMAGE_HOST): (body, "image/jpeg") for url, body in zip(urls, bodies)}
    with serve_files(files) as base:
        path = tmp_path_factory.mktemp("example") / EXAMPLE.name
        path.write_text(edited.replace(IMAGE_HOST, base), encoding="utf-8")
        images = [Image.open(io.BytesIO(body)).convert("RGB") for body in bodies]
        yield path, [base + p for p in files], images


@dataclass
class ExampleRun:
    printed: str  # what the example printed
    calls: list  # (LLM method name, its prompt argument, the outputs it returned), in order


def run_example(path: Path, row: str, method: str) -> ExampleRun:
    """Run the edited example as a script, recording what it printed and the `LLM` calls it
    made (the wrapped methods run unchanged)."""
    run = ExampleRun("", [])
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        for name in ("generate", "chat"):
            mp.setattr(LLM, name, _recorded(getattr(LLM, name), name, run.calls))
        mp.setattr(sys, "argv", [str(path), "--model-type", row, "--method", method])
        runpy.run_path(str(path), run_name="__main__")
    run.printed = out.getvalue()
    return run


def _recorded(method, name: str, calls: list):
    def wrapper(self, prompts, *args, **kwargs):
        outputs = method(self, prompts, *args, **kwargs)
        calls.append((name, prompts, outputs))
        return outputs

    return wrapper


@pytest.fixture(scope="module")
def direct(hub_snapshots, tmp_path_factory):
    """row -> (vlmx LLM built here with the example's engine arguments, HF reference)."""
    built = {}

    def get(row: str) -> tuple[LLM, HFReference]:
        if row not in built:
            llm = LLM(ROWS[row].hub_id, limit_mm_per_prompt={"image": 2}, **ENGINE_KWARGS[row])
            if row == "phi4_mm":
                from tests.test_phi4mm import Phi4Reference

                # the same weights in transformers' layout (HF reads the published layout only
                # with the checkpoint's code)
                ref = Phi4Reference(build_phi4mm_checkpoint(tmp_path_factory.mktemp("phi4_hf")))
            elif row == "phi3_v":
                from tests.test_phi3v import Phi3VReference

                ref = Phi3VReference(hub_snapshots[row])  # num_crops 4, as the example's
                assert ref.num_crops == ENGINE_KWARGS[row]["mm_processor_kwargs"]["num_crops"]
            elif row == "h2ovl_chat":
                from tests.test_h2ovl import H2OVLReference

                # the same weights as transformers' InternVL (the same seed, built again)
                root = tmp_path_factory.mktemp("h2ovl_hf")
                build_h2ovl_checkpoint(root / "published", reference_folder=root / "hf")
                ref = H2OVLReference(hub_snapshots[row], str(root / "hf"))
                ref.kwargs = ENGINE_KWARGS[row]["mm_processor_kwargs"]
            else:
                ref = HFReference(hub_snapshots[row], model_cls=HF_CLASSES[row])
            if row == "idefics3":  # the example's mm_processor_kwargs, for the reference too
                ref.processor.image_processor.size = IDEFICS3_SIZE
            built[row] = llm, ref
        return built[row]

    return get


def generate_prompt(row: str) -> str:
    if row == "idefics3":
        return IDEFICS3_PROMPT
    if row == "aria":
        return ARIA_PROMPT
    if row == "mllama":
        return MLLAMA_PROMPT
    if row == "phi3_v":  # the example's own prompt (the published template has no images)
        return PHI3V_PROMPT
    if row == "phi4_mm":  # the example's own prompt (the published template has no images)
        return PHI4_PROMPT
    if row == "h2ovl_chat":  # the example's own prompt: its <image> lines in a string message
        placeholders = "".join(f"Image-{i}: <image>\n\n" for i in (1, 2))
        messages = [{"role": "user", "content": f"{placeholders}{QUESTION}"}]
        tokenizer = AutoTokenizer.from_pretrained(ROWS[row].hub_id)  # from the hub cache
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    messages = [{"role": "user", "content": content}]
    if row in ("qwen2_vl", "qwen2_5_vl"):
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
    processor = AutoProcessor.from_pretrained(ROWS[row].hub_id)  # from the hub cache
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


GREEDY = SamplingParams(temperature=0.0, max_tokens=128)


@pytest.mark.parametrize("method", ["generate", "chat"])
@pytest.mark.parametrize("row", SUPPORTED)
def test_example_runs_and_prints_vlmx_text(row, method, example, direct):
    path, urls, images = example
    llm, ref = direct(row)
    if method == "generate":
        prompt = generate_prompt(row)
        [output] = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, GREEDY)
    else:
        content = [{"type": "text", "text": QUESTION}]
        content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        [output] = llm.chat([{"role": "user", "content": content}], GREEDY)
        prompt = ref.processor.apply_chat_template(
            [{"role": "user", "content": [content[0], {"type": "image"}, {"type": "image"}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert output.prompt == prompt
        # NOTE: chat tokenizes the rendered template without adding special tokens, as vLLM
        # does; for a tokenizer that adds <bos> itself, the reference's text prompt is the
        # rendering without its leading <bos> (see test_gemma3's chat test).
        tokenizer = ref.processor.tokenizer
        if tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]:
            prompt = prompt.removeprefix(tokenizer.bos_token)
    compare_with_reference(ref, prompt, images, output, ARIA_ATOL if row == "aria" else None)
    completion = output.outputs[0]
    assert completion.token_ids and completion.text

    run = run_example(path, row, method)

    [(called, prompts, [example_output])] = run.calls
    assert called == method
    if method == "generate":  # the example's own images, as fetched from the loopback server
        assert prompts["prompt"] == prompt
        fetched = prompts["multi_modal_data"]["image"]
        assert len(fetched) == len(images)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(fetched, images))
    assert example_output.prompt == output.prompt
    assert example_output.prompt_token_ids == output.prompt_token_ids
    assert example_output.outputs[0].token_ids == completion.token_ids
    warning = QWEN_WARNING if row in ("qwen2_vl", "qwen2_5_vl") else ""
    assert run.printed == warning + completion.text + "\n"


@pytest.mark.parametrize("method", ["generate", "chat"])
@pytest.mark.parametrize("row", [row for row in ROWS if row not in SUPPORTED])
def test_unsupported_row_fails_clearly(row, method, example, hub_snapshots):
    path, _, _ = example
    with pytest.raises(ValueError, match=ROWS[row].error):
        run_example(path, row, method)


def test_every_row_of_the_example_is_listed(example):
    path, _, _ = example
    rows = set(re.findall(r'^\s+"(\w+)": load_\w+,$', path.read_text(), re.MULTILINE))
    assert rows == set(ROWS)


def test_hub_ids_resolve_from_the_test_cache_only(hub_snapshots):
    from huggingface_hub import snapshot_download

    from vlmx.models.loader import resolve_model_path

    for row, snapshot in hub_snapshots.items():
        assert snapshot_download(ROWS[row].hub_id) == snapshot
        assert resolve_model_path(ROWS[row].hub_id) == snapshot
    with pytest.raises(ValueError, match="could not be downloaded"):
        resolve_model_path("vlmx-tests/not-in-the-cache")


def test_the_example_imports_resolve(direct):
    from vlmx.lora.request import LORA_DISABLED, LoRARequest
    from vlmx.multimodal import media
    from vlmx.multimodal.utils import fetch_image

    assert fetch_image is media.fetch_image
    llm, _ = direct("gemma3")
    with pytest.raises(ValueError, match=re.escape(LORA_DISABLED)):
        llm.llm_engine.add_lora(lora_request=LoRARequest("vision", 1, "vision-lora"))


def test_flexible_argument_parser_takes_underscores_and_equals():
    from vlmx.utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    parser.add_argument("--model-type", "-m", default="phi3_v")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(["--model_type", "qwen2_vl", "--max_model_len=64"])
    assert (args.model_type, args.max_model_len, args.rest) == ("qwen2_vl", 64, [])
    args = parser.parse_args(["-m", "gemma3", "--max-model-len", "8", "--", "--keep_this"])
    assert (args.model_type, args.max_model_len, args.rest) == ("gemma3", 8, ["--keep_this"])
    args = parser.parse_args(["--model-type=a_b_c"])  # a value keeps its underscores
    assert args.model_type == "a_b_c"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model_typo", "x"])
