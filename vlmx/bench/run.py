"""Run a workload through vlmx or through transformers' `generate`, and measure it."""

from __future__ import annotations

import base64
import functools
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import torch

from vlmx.bench.floor import (
    CARDS,
    Floor,
    WorkItem,
    detect_card,
    has_floor,
    meta_model,
    workload_floor,
)
from vlmx.bench.phi4_hf import PHI4_ARCHITECTURES, load_phi4_hf
from vlmx.bench.presets import PRESETS, preset_path
from vlmx.bench.profiling import profiler, write_profile, write_timeline
from vlmx.bench.workloads import WORKLOADS, prompt_form, prompts_for
from vlmx.multimodal.chat import load_chat_template


@dataclass
class BenchResult:
    backend: str
    workload: str
    api: str
    num_prompts: int
    wall_s: float
    num_images: int
    input_tokens: int
    output_tokens: int
    peak_gpu_gib: float | None
    ttft_s: list[float] = field(default_factory=list)
    floor: Floor | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {
            "backend": self.backend,
            "workload": self.workload,
            "api": self.api,
            "prompts": self.num_prompts,
            "wall_s": round(self.wall_s, 2),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "req_per_s": round(self.num_prompts / self.wall_s, 2),
            "img_per_s": round(self.num_images / self.wall_s, 2),
            "in_tok_per_s": round(self.input_tokens / self.wall_s, 1),
            "out_tok_per_s": round(self.output_tokens / self.wall_s, 1),
            "peak_gpu_gib": self.peak_gpu_gib,
        }
        if self.ttft_s:
            ttft = sorted(self.ttft_s)
            out["ttft_median_s"] = round(statistics.median(ttft), 3)
            out["ttft_p90_s"] = round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], 3)
        if self.floor is not None:
            f = self.floor
            out["floor_s"] = _sig(f.seconds)
            out["floor_compute_s"] = _sig(f.compute_s)
            out["floor_memory_s"] = _sig(f.memory_s)
            out["floor_ratio"] = _sig(f.seconds / self.wall_s)
            out["floor_card"] = f.card
            flops_rate, bytes_rate = CARDS[f.card]
            out["floor_tflop_per_s"] = _sig(flops_rate / 1e12)  # dense bf16
            out["floor_tb_per_s"] = _sig(bytes_rate / 1e12)
        out.update(self.extra)
        return out


def describe(result: dict) -> str:
    """A `BenchResult.summary()` as one line for people."""
    run = f" run {result['run']}" if "run" in result else ""
    parts = [
        f"{result['workload']} / {result['api']} / {result['backend']}{run}, "
        f"{result['prompts']} prompts in {result['wall_s']} s: {result['img_per_s']} images/s",
        f"{result['req_per_s']} req/s",
        f"{result['in_tok_per_s']:,.0f} in tok/s",
        f"{result['out_tok_per_s']:,.0f} out tok/s",
    ]
    if "ttft_median_s" in result:
        parts.append(f"TTFT median {result['ttft_median_s']} s, p90 {result['ttft_p90_s']} s")
    if result.get("peak_gpu_gib") is not None:
        parts.append(f"peak {result['peak_gpu_gib']} GiB")
    if "floor_s" in result:
        parts.append(
            f"floor {result['floor_s']} s ({result['floor_card']} at "
            f"{result['floor_tflop_per_s']:g} TFLOP/s, {result['floor_tb_per_s']:g} TB/s): "
            f"{result['floor_ratio']} of it"
        )
    return "; ".join(parts)


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def resolve_model(model: str) -> tuple[str, str]:
    """(checkpoint folder, load_format): presets get random weights."""
    if model in PRESETS:
        return preset_path(model), "dummy"
    return model, "auto"


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_key(image) -> tuple:
    """A PIL image's content, as a key (its size, mode and a hash of its pixels)."""
    return image.size, image.mode, blake3.blake3(image.tobytes()).hexdigest()


def _peak_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def build_llm(model: str, images_per_prompt: int, max_num_seqs: int = 256, **engine_kwargs):
    """The `LLM` the bench measures (one may serve several workloads and runs)."""
    from vlmx import LLM

    path, load_format = resolve_model(model)
    return LLM(
        model=path,
        load_format=load_format,
        max_model_len=8192,
        max_num_seqs=max_num_seqs,
        limit_mm_per_prompt={"image": images_per_prompt},
        seed=0,
        **engine_kwargs,
    )


def _turns(question: str, image_parts: list[dict]) -> list[dict]:
    """The bench's conversation: a system turn, then the images and the question."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [*image_parts, {"type": "text", "text": question}]},
    ]


# NOTE: families whose HF processor takes a batch's images as one flat list; the others take
# each prompt's images as one list (LLaVA-OneVision processes a prompt of several images
# differently from one of a single image)
_FLAT_IMAGE_TYPES = ("qwen2_vl", "qwen2_5_vl", "aria")


def prompt_writer(hf_config, apply_chat_template: Callable[..., str]) -> Callable[[str, int], str]:
    """How the bench writes a `generate` prompt of a question and its images: the family's own
    form where the bench has one (the anchor's Qwen-VL prompt, vLLM's example forms for Aria,
    Mllama and Phi-4), else the checkpoint's chat template (`apply_chat_template`, a
    tokenizer's or processor's) over the `chat` API's turns."""
    form = prompt_form(hf_config.model_type)
    if form is not None:
        return form

    def render(question: str, num_images: int) -> str:
        turns = _turns(question, [{"type": "image"}] * num_images)
        return apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    return render


def _bench_batch(api: str, requests: list, prompt: Callable[[str, int], str]) -> list:
    """The workload's (question, images) pairs as `generate` prompts (written by `prompt`) or
    `chat` conversations (images as data URLs, as a client sends them)."""
    if api == "chat":
        return [
            _turns(q, [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in ims])
            for q, ims in requests
        ]
    return [
        {"prompt": prompt(q, len(ims)), "multi_modal_data": {"image": ims}} for q, ims in requests
    ]


def _work_items(requests: list, outputs: list, processor) -> tuple[list[WorkItem], set]:
    """What each request computed, for the floor, and the distinct images encoded.

    NOTE: an image seen before is counted as served by the encoder cache (w3-shared's pool of
    16 stays in it); KV from the prefix cache as the engine reports it."""
    items, encoded = [], set()
    for (_, images), out in zip(requests, outputs):
        patches = []
        for im in images:
            key = _image_key(im)
            if key not in encoded:
                encoded.add(key)
                if hasattr(processor, "num_image_tokens"):  # Qwen-VL's: the floor's input
                    patches.append(4 * processor.num_image_tokens(im.height, im.width, {}))
        items.append(
            WorkItem(
                len(out.prompt_token_ids),
                len(out.outputs[0].token_ids),
                patches,
                num_cached_tokens=out.num_cached_tokens or 0,
            )
        )
    return items, encoded


def run_vlmx(
    model: str,
    workload: str,
    num_prompts: int,
    api: str = "generate",
    max_num_seqs: int = 256,
    card: str | None = None,
    output_len: int | None = None,
    profile_dir: str | None = None,
    timeline_path: str | None = None,
    llm=None,
    lora_requests: list | None = None,
    **engine_kwargs,
) -> BenchResult:
    """One timed run of `workload`, after a 4-prompt warm-up on other images.

    `llm`: an LLM from `build_llm` to reuse. Its prefix and image caches are reset first, so
    the run computes what it would in a fresh process (which may still pay first-use costs
    that a later run does not). None builds one from `model` and `engine_kwargs`.
    `lora_requests`: adapters spread over the prompts in turn (the LLM needs enable_lora)."""
    from vlmx import SamplingParams

    if llm is None:
        k = WORKLOADS[workload].images_per_prompt
        llm = build_llm(model, k, max_num_seqs, **engine_kwargs)
    elif not (llm.reset_prefix_cache() and llm.reset_mm_cache()):
        raise RuntimeError("the LLM has unfinished requests; it cannot be reused for a run")
    max_num_seqs = llm.llm_engine.config.scheduler_config.max_num_seqs
    requests, out_len = prompts_for(workload, num_prompts)
    out_len = output_len or out_len
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)

    def run(batch):
        loras = None
        if lora_requests:
            loras = [lora_requests[i % len(lora_requests)] for i in range(len(batch))]
        if api == "chat":
            return llm.chat(batch, params, use_tqdm=False, lora_request=loras)
        return llm.generate(batch, params, use_tqdm=False, lora_request=loras)

    mc, tokenizer = llm.llm_engine.config.model_config, llm.get_tokenizer()
    template = load_chat_template(mc.model_path, tokenizer)
    prompt = prompt_writer(
        mc.hf_config, functools.partial(tokenizer.apply_chat_template, chat_template=template)
    )
    warm, _ = prompts_for(workload, 4, seed=99)
    run(_bench_batch(api, warm, prompt))
    batch = _bench_batch(api, requests, prompt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    engine = llm.llm_engine
    if timeline_path is not None:
        engine.step_log = []
    with profiler(profile_dir) as prof:
        start, start_pc = time.monotonic(), time.perf_counter()  # the steps' clock is the latter
        outputs = run(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.monotonic() - start
    extra = {}
    if prof is not None:
        extra["gpu_busy_fraction"] = write_profile(prof, profile_dir, wall)
    if engine.step_log is not None:
        extra["steps"] = write_timeline(engine.step_log, start_pc, timeline_path)
        engine.step_log = None

    items, encoded = _work_items(requests, outputs, engine.processor)
    card = card or detect_card()
    floor = None
    if card is not None:
        model = meta_model(mc)
        if has_floor(model):  # the floor's model: a Qwen-VL-shaped one
            floor = workload_floor(model, mc.hf_config, items, max_num_seqs, card)
    return BenchResult(
        backend="vlmx",
        workload=workload,
        api=api,
        num_prompts=num_prompts,
        wall_s=wall,
        num_images=sum(len(ims) for _, ims in requests),
        input_tokens=sum(i.num_prompt_tokens for i in items),
        output_tokens=sum(i.num_output_tokens for i in items),
        peak_gpu_gib=_peak_gib(),
        ttft_s=[o.metrics.first_token_time - start for o in outputs],
        floor=floor,
        extra={
            "cached_prompt_tokens": sum(i.num_cached_tokens for i in items),
            "encoded_images": len(encoded),
            "kv_blocks": engine.num_kv_blocks,
            "preemptions": engine.scheduler.num_preemptions,
            "cuda_graphs": engine.executor.cuda_graphs,
            "num_loras": len(lora_requests or ()),
            **extra,
        },
    )


def run_hf(
    model: str,
    workload: str,
    num_prompts: int,
    batch_size: int | None = None,
    output_len: int | None = None,
) -> BenchResult:
    """transformers' `generate` on the same prompts and images, `batch_size` prompts at a time
    (left-padded), random bf16 weights for presets; preprocessing included in the time.

    batch_size None: the largest that fits. On CUDA the measured run starts at
    min(num_prompts, 256) prompts a batch and, on out-of-memory, starts again at half (larger
    batches only ever ran faster here); on the CPU it is min(num_prompts, 32).
    """
    from vlmx.models.loader import load_hf_config

    path, load_format = resolve_model(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if load_hf_config(path).architectures[0] in PHI4_ARCHITECTURES:
        hf_model, make_inputs = load_phi4_hf(path, load_format, device, dtype)
    else:
        hf_model, make_inputs = _load_auto_hf(path, load_format, device, dtype)
    requests, out_len = prompts_for(workload, num_prompts)
    out_len = output_len or out_len

    @torch.inference_mode()
    def run(reqs: list, batch_size: int) -> tuple[int, int]:
        num_in = num_out = 0
        for i in range(0, len(reqs), batch_size):
            chunk = reqs[i : i + batch_size]
            inputs = make_inputs(chunk)
            out = hf_model.generate(
                **inputs, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False
            )
            num_in += int(inputs["attention_mask"].sum())
            num_out += (out.shape[1] - inputs["input_ids"].shape[1]) * len(chunk)
        return num_in, num_out

    return _time_hf(run, workload, num_prompts, batch_size, device, requests)


def _load_auto_hf(path: str, load_format: str, device: torch.device, dtype: torch.dtype):
    """(transformers model through `AutoModelForImageTextToText`, make_inputs), as
    `load_phi4_hf` for Phi-4."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if load_format == "dummy":
        config = AutoConfig.from_pretrained(path)
        with torch.device(device):
            hf_model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    else:
        hf_model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    hf_model.eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    prompt = prompt_writer(hf_model.config, processor.apply_chat_template)
    nested = hf_model.config.model_type not in _FLAT_IMAGE_TYPES

    def make_inputs(chunk: list) -> dict:
        images = [ims for _, ims in chunk] if nested else [im for _, ims in chunk for im in ims]
        return processor(
            text=[prompt(q, len(ims)) for q, ims in chunk],
            images=images,
            padding=True,
            return_tensors="pt",
        ).to(device, dtype=dtype)  # floating inputs in the model's dtype (Aria's pixels)

    return hf_model, make_inputs


def _time_hf(run, workload: str, num_prompts: int, batch_size, device, requests) -> BenchResult:
    """The timed HF run after a warm-up, halving the batch on out-of-memory (see `run_hf`)."""
    fixed = batch_size is not None
    if batch_size is None:
        batch_size = min(num_prompts, 256 if device.type == "cuda" else 32)
    run(prompts_for(workload, 2, seed=99)[0], batch_size)
    while True:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.monotonic()
        try:
            num_in, num_out = run(requests, batch_size)
        except torch.OutOfMemoryError:
            if fixed or batch_size == 1:
                raise
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:  # outside the handler, so the failed batch's tensors are freed
            batch_size //= 2
            torch.cuda.empty_cache()
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.monotonic() - start
        break
    return BenchResult(
        backend="hf",
        workload=workload,
        api="generate",
        num_prompts=num_prompts,
        wall_s=wall,
        num_images=sum(len(ims) for _, ims in requests),
        input_tokens=num_in,
        output_tokens=num_out,
        peak_gpu_gib=_peak_gib(),
        extra={"batch_size": batch_size},
    )
