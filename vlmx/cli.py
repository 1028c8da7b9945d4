"""`vlmx` command line: `vlmx generate` runs one multi-image prompt."""

from __future__ import annotations

import argparse
import logging
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
    )
    loaded = time.perf_counter()
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    if args.method == "chat":
        content = [{"type": "image_url", "image_url": {"url": x}} for x in images]
        content.append({"type": "text", "text": args.question})
        outputs = llm.chat([{"role": "user", "content": content}], params, use_tqdm=False)
    else:
        engine = llm.llm_engine
        template = resolve_chat_template(
            None, engine.config.model_config.model_path, engine.tokenizer
        )
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.question}]
        prompt = render_chat(engine.tokenizer, [{"role": "user", "content": content}], template)
        outputs = llm.generate(
            {"prompt": prompt, "multi_modal_data": {"image": images}}, params, use_tqdm=False
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "generate":
            return _generate(args)
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
