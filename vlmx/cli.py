"""`vlmx` command line: `vlmx generate` runs one multi-image prompt."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="answer one question about one or more images",
        description="Answer a question about images. With no --model, runs the built-in demo "
        "(a tiny random-weight Qwen2.5-VL-shaped model: its answer is noise).",
    )
    p.add_argument("question", nargs="?", default="What is the content of each image?")
    p.add_argument("--model", default="demo", help="checkpoint folder or hub id (default: demo)")
    p.add_argument(
        "--image",
        action="append",
        default=None,
        help="image file or URL (http(s), data:, file://); repeat for several",
    )
    p.add_argument("--method", choices=["generate", "chat"], default="generate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--verbose", action="store_true", help="log engine details")
    _add_lora_args(p)
    p.add_argument("--lora-path", default=None, help="a PEFT LoRA adapter folder to apply")


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    """vLLM's LoRA engine arguments."""
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    p.add_argument("--max-loras", type=int, default=1, help="adapters on the device at once")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-cpu-loras", type=int, default=None, help="default: --max-loras")
    p.add_argument(
        "--enable-tower-connector-lora",
        action="store_true",
        help="adapters may target the vision tower and projector",
    )


def _lora_kwargs(args: argparse.Namespace) -> dict:
    return {
        "enable_lora": args.enable_lora,
        "max_loras": args.max_loras,
        "max_lora_rank": args.max_lora_rank,
        "max_cpu_loras": args.max_cpu_loras,
        "enable_tower_connector_lora": args.enable_tower_connector_lora,
    }


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from vlmx.bench.floor import CARDS
    from vlmx.bench.presets import PRESETS
    from vlmx.bench.workloads import WORKLOADS

    p = sub.add_parser(
        "bench",
        help="throughput on a named multi-image workload",
        description="Run a named workload and print requests/s, images/s, input and output "
        "tokens/s, time to first token, peak GPU memory and the ratio to the hardware floor. "
        f"Presets (real-size configs, random weights): {', '.join(sorted(PRESETS))}.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder, hub id or preset name")
    p.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        nargs="+",
        default=["w1-multi"],
        help="one or more; vlmx runs them all on one engine (caches reset before each run)",
    )
    p.add_argument("--backend", choices=["vlmx", "hf", "both"], default="vlmx")
    p.add_argument("--api", choices=["generate", "chat"], nargs="+", default=["generate"])
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="timed runs of each workload and api (vlmx), each after its own warm-up",
    )
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--output-len", type=int, default=None, help="default: the workload's")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--hf-num-prompts", type=int, default=None, help="default: --num-prompts")
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="prompts per transformers generate call (default: the largest that fits)",
    )
    p.add_argument("--card", choices=sorted(CARDS), default=None, help="default: detected")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="read each step's samples before scheduling the next (async is the CUDA default)",
    )
    p.add_argument(
        "--timeline",
        default=None,
        metavar="FILE",
        help="write one line per step of the timed run (time, period, launch time, tokens, "
        "requests, images) to FILE; the result gains a summary per kind of step. With several "
        "runs, FILE gains each run's workload, api and number before its extension",
    )
    p.add_argument(
        "--num-loras",
        type=int,
        default=0,
        help="random LoRA adapters (rank --lora-rank on all decoder linear layers, written to a "
        "temp folder) spread across the prompts in turn; 0: none",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the --num-loras adapters")
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="adapters on the GPU at once with --num-loras (default: --num-loras)",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="profile the timed run with torch.profiler; write a summary (GPU busy time, top "
        "kernels and host functions) and a Chrome trace into DIR (per run, as for --timeline)",
    )


def _bench(args: argparse.Namespace) -> int:
    import gc
    import json
    import tempfile

    import torch

    from vlmx.bench.run import build_llm, describe, run_hf, run_vlmx
    from vlmx.bench.workloads import WORKLOADS

    if args.runs < 1:
        raise ValueError(f"--runs must be at least 1, got {args.runs}")
    results = []

    def report(result: dict) -> None:
        results.append(result)
        print(describe(result))
        print("RESULT " + json.dumps(result), flush=True)

    if args.num_loras < 0:
        raise ValueError(f"--num-loras must be >= 0, got {args.num_loras}")
    if args.backend in ("vlmx", "both"):
        lora_dir = tempfile.TemporaryDirectory(prefix="vlmx-bench-lora-")
        lora_requests, lora_kwargs = None, {}
        if args.num_loras:
            from vlmx.bench.lora import write_random_adapters
            from vlmx.bench.run import resolve_model

            path = resolve_model(args.model)[0]
            lora_requests = write_random_adapters(
                path, args.lora_rank, args.num_loras, lora_dir.name
            )
            lora_kwargs = {
                "enable_lora": True,
                "max_loras": args.max_loras or args.num_loras,
                "max_cpu_loras": args.num_loras,
                "max_lora_rank": args.lora_rank,
            }
        llm = build_llm(
            args.model,
            max(WORKLOADS[w].images_per_prompt for w in args.workload),
            args.max_num_seqs,
            device=args.device,
            enforce_eager=args.enforce_eager,
            async_scheduling=False if args.no_async_scheduling else None,
            **lora_kwargs,
        )
        many = len(args.workload) * len(args.api) * args.runs > 1
        for workload in args.workload:
            for api in args.api:
                for run in range(1, args.runs + 1):
                    tag = f"{workload}-{api}-{run}"
                    result = run_vlmx(
                        args.model,
                        workload,
                        args.num_prompts,
                        api=api,
                        card=args.card,
                        output_len=args.output_len,
                        profile_dir=_per_run(args.profile, tag, many),
                        timeline_path=_per_run(args.timeline, tag, many),
                        llm=llm,
                        lora_requests=lora_requests,
                    ).summary()
                    report({**result, "run": run} if args.runs > 1 else result)
        del llm
        lora_dir.cleanup()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.backend in ("hf", "both"):
        n = args.hf_num_prompts or args.num_prompts
        for workload in args.workload:
            hf = run_hf(args.model, workload, n, args.hf_batch_size, args.output_len).summary()
            report(hf)
            ours = [
                r
                for r in results
                if r["backend"] == "vlmx" and r["workload"] == workload and r["api"] == "generate"
            ]
            if ours:
                ratio = ours[0]["img_per_s"] / max(hf["img_per_s"], 1e-9)
                print(f"vlmx / hf images/s ({workload}): {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _per_run(path: str | None, tag: str, many: bool) -> str | None:
    """`path` for the only run; with several, `tag` inserted before its extension."""
    if path is None or not many:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{tag}{ext}"


def _generate(args: argparse.Namespace) -> int:
    from vlmx import LLM, SamplingParams
    from vlmx.multimodal.chat import render_chat, resolve_chat_template

    images = args.image
    if images is None and args.model == "demo":
        from vlmx.demo.checkpoint import demo_images

        images = demo_images()
    images = images or []
    if args.model == "demo":
        print(
            "vlmx demo: a tiny Qwen2.5-VL-shaped model with random weights, so the answer is "
            "noise. Pass --model PATH_OR_HUB_ID for a real one.",
            file=sys.stderr,
        )
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        seed=args.seed,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        device=args.device,
        limit_mm_per_prompt={"image": max(len(images), 1)},
        **_lora_kwargs(args),
    )
    loaded = time.perf_counter()
    lora = None
    if args.lora_path is not None:
        from vlmx import LoRARequest

        lora = LoRARequest("cli", 1, args.lora_path)
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    if args.method == "chat":
        content = [{"type": "image_url", "image_url": {"url": x}} for x in images]
        content.append({"type": "text", "text": args.question})
        outputs = llm.chat(
            [{"role": "user", "content": content}], params, use_tqdm=False, lora_request=lora
        )
    else:
        engine = llm.llm_engine
        template = resolve_chat_template(
            None, engine.config.model_config.model_path, engine.tokenizer
        )
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.question}]
        prompt = render_chat(engine.tokenizer, [{"role": "user", "content": content}], template)
        outputs = llm.generate(
            {"prompt": prompt, "multi_modal_data": {"image": images}},
            params,
            use_tqdm=False,
            lora_request=lora,
        )
    done = time.perf_counter()
    out = outputs[0]
    print(out.outputs[0].text)
    num_out = len(out.outputs[0].token_ids)
    run_s = done - loaded
    print(
        f"[{len(images)} images, {len(out.prompt_token_ids)} prompt tokens, {num_out} output "
        f"tokens in {run_s:.2f} s ({num_out / max(run_s, 1e-9):.1f} tok/s); model load "
        f"{loaded - start:.2f} s; device {llm.llm_engine.config.device}]",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmx", description="Fast multi-image VLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "bench":
            return _bench(args)
    except ValueError as e:
        from vlmx.llm import InvalidPromptsError

        if isinstance(e, InvalidPromptsError) and len(e.errors) == 1:
            e = next(iter(e.errors.values()))
        print(f"vlmx: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
