"""The `vlmx serve` and `vlmx run-batch` subcommands: their options (vLLM's spellings), how the
engine options become `EngineArgs`, and what each command runs. `vlmx.cli` registers them with
`add_entrypoint_commands`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from vlmx.engine.engine_args import EngineArgs

# (flag, EngineArgs field, type, help); a type of "json" parses a JSON object.
_ENGINE_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--tokenizer", "tokenizer", str, "tokenizer folder or hub id (default: the model's)"),
    ("--revision", "revision", str, "model revision on the hub"),
    ("--dtype", "dtype", str, "auto, bfloat16, float16 or float32"),
    ("--device", "device", str, "auto, cuda or cpu"),
    ("--seed", "seed", int, "engine seed"),
    ("--max-model-len", "max_model_len", int, "longest prompt + output in tokens"),
    ("--max-num-seqs", "max_num_seqs", int, "most sequences in one step"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
    ("--block-size", "block_size", int, "tokens per KV cache block"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "share of GPU memory used"),
    ("--num-gpu-blocks-override", "num_gpu_blocks_override", int, "KV blocks, instead of sizing"),
    ("--mm-input-gb", "mm_input_gb", float, "GiB for processed images of queued requests"),
    ("--limit-mm-per-prompt", "limit_mm_per_prompt", "json", "e.g. '{\"image\": 2}'"),
    ("--mm-processor-kwargs", "mm_processor_kwargs", "json", "e.g. '{\"max_pixels\": 1003520}'"),
    ("--hf-overrides", "hf_overrides", "json", "JSON merged into the checkpoint's config"),
    ("--load-format", "load_format", str, "auto, safetensors or dummy (random weights)"),
    ("--max-logprobs", "max_logprobs", int, "largest logprobs / top_logprobs a request may ask"),
    ("--image-fetch-timeout", "image_fetch_timeout", float, "seconds of one image download"),
    ("--image-max-bytes", "image_max_bytes", int, "bytes of one encoded image"),
    ("--image-max-pixels", "image_max_pixels", int, "width * height of one image"),
)
_ENGINE_FLAGS = (
    ("--trust-remote-code", "trust_remote_code", True, "run the checkpoint's own code"),
    ("--enforce-eager", "enforce_eager", True, "no CUDA graphs for decode steps"),
    ("--no-enable-prefix-caching", "enable_prefix_caching", False, "turn prefix caching off"),
)


def _json_object(flag: str) -> Callable[[str], dict]:
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON object, got {text!r}")
        return value

    return parse


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for flag, name, kind, help_text in _ENGINE_OPTIONS:
        parse = _json_object(flag) if kind == "json" else kind
        group.add_argument(flag, dest=name, type=parse, default=None, help=help_text)
    for flag, name, value, help_text in _ENGINE_FLAGS:
        action = "store_true" if value else "store_false"
        group.add_argument(flag, dest=name, action=action, default=not value, help=help_text)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineArgs` fields the options give (all but the model); others keep defaults."""
    given = {name: getattr(args, name) for _, name, _, _ in _ENGINE_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    flags = {name: getattr(args, name) for _, name, _, _ in _ENGINE_FLAGS}
    return {**given, **flags}


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """`EngineArgs` from the parsed options; options not given keep EngineArgs' defaults."""
    return EngineArgs(model=args.model, **engine_kwargs(args))


# -- vlmx serve -------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /metrics). With no model, serves the built-in demo.",
    )
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (or MODEL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None, help="names clients use")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--chat-template", default=None, help="template text or a .jinja file")
    p.add_argument(
        "--allowed-local-media-path", default=None, help="folder whose images may be read"
    )
    p.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=None,
        help="the only hosts image URLs may name (then private addresses are allowed for them)",
    )
    p.add_argument("--uvicorn-log-level", default="info")
    p.add_argument("--verbose", action="store_true", help="log engine details")
    add_engine_options(p)
    p.set_defaults(entrypoint=_serve)


def _serve(args: argparse.Namespace) -> int:
    from vlmx.engine.engine import LLMEngine
    from vlmx.entrypoints.openai.api_server import ServerArgs, run_server

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag or args.model or "demo"
    engine = LLMEngine(engine_args(args).create_engine_config())
    server = ServerArgs(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name or [args.model],
        api_key=args.api_key,
        chat_template=args.chat_template,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=args.allowed_media_domains or [],
        uvicorn_log_level=args.uvicorn_log_level,
    )
    run_server(engine, server)
    return 0


# -- vlmx run-batch ---------------------------------------------------------------------------


def _add_run_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run-batch",
        help="run an OpenAI batch file (JSONL), resumable",
        description="Run the requests of an OpenAI batch file (lines with custom_id, method, "
        "url /v1/chat/completions or /v1/completions, body) and append one answer line per "
        "input line to the output. Rerunning after a kill resumes: lines already answered are "
        "kept and only the missing custom_ids run.",
    )
    p.add_argument("-i", "--input-file", required=True, help="input JSONL")
    p.add_argument("-o", "--output-file", required=True, help="output JSONL (appended)")
    p.add_argument("--model", default="demo", help="checkpoint folder or hub id")
    p.add_argument("--served-model-name", default=None, help="model name in the answers")
    p.add_argument("--chat-template", default=None, help="template text or a .jinja file")
    p.add_argument(
        "--window", type=int, default=None, help="lines in flight (default 2 * max-num-seqs)"
    )
    p.add_argument("--verbose", action="store_true", help="log engine details")
    ray = p.add_argument_group("ray (--ray: one engine per Ray actor, across GPUs and machines)")
    ray.add_argument("--ray", action="store_true", help="run the file through Ray Data")
    ray.add_argument("--concurrency", type=int, default=1, help="engines (actors)")
    ray.add_argument("--num-gpus-per-engine", type=float, default=1.0, help="0: CPU engines")
    ray.add_argument("--num-cpus-per-engine", type=float, default=1.0)
    ray.add_argument("--batch-size", type=int, default=64, help="lines given to an engine at once")
    ray.add_argument("--ray-address", default=None, help="a running cluster (default: local)")
    add_engine_options(p)
    p.set_defaults(entrypoint=_run_batch)


def _run_batch(args: argparse.Namespace) -> int:
    from vlmx.engine.engine import LLMEngine
    from vlmx.entrypoints.openai.run_batch import BatchRunner

    if args.ray:
        return _run_batch_ray(args)
    engine = LLMEngine(engine_args(args).create_engine_config())
    runner = BatchRunner(
        engine, args.served_model_name or args.model, args.window, args.chat_template
    )
    summary = runner.run(args.input_file, args.output_file, progress=sys.stderr.isatty())
    print(summary.describe(), file=sys.stderr)
    return 0


def _run_batch_ray(args: argparse.Namespace) -> int:
    from vlmx.entrypoints.openai import run_batch_ray as rb
    from vlmx.ray.processor import import_ray

    if args.window is not None:
        raise ValueError("--window is for the single-engine run-batch; with --ray use --batch-size")
    try:
        import_ray()
    except ImportError as e:  # NOTE: one line naming the extra, not a traceback
        raise ValueError(str(e)) from None
    options = rb.RayBatchOptions(
        concurrency=args.concurrency,
        num_gpus_per_engine=args.num_gpus_per_engine,
        num_cpus_per_engine=args.num_cpus_per_engine,
        batch_size=args.batch_size,
    )
    config = rb.processor_config(args.model, engine_kwargs(args), options, args.chat_template)
    summary = rb.run_batch_ray(
        args.input_file,
        args.output_file,
        config,
        args.served_model_name or args.model,
        address=args.ray_address,
        progress=sys.stderr.isatty(),
    )
    print(summary.describe(), file=sys.stderr)
    return 0


def add_entrypoint_commands(sub: argparse._SubParsersAction) -> None:
    """Add `serve` and `run-batch`; each sets `args.entrypoint`, the function that runs it."""
    _add_serve(sub)
    _add_run_batch(sub)
