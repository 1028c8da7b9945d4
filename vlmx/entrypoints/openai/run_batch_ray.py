"""`vlmx run-batch --ray`: an OpenAI batch file through `vlmx.ray`'s processor (one engine per
Ray actor), into the same output lines as the single-engine `run-batch`, resumable the same way.

```
IN.jsonl --triage (driver)--> bad lines, duplicates: answered at once        -> OUT.jsonl
         |                    custom_ids already in OUT: skipped
         +--> OUT.jsonl.pending ("N\\t<line>") --read_text--> BatchLineActor x concurrency
                                                    --iter_batches (driver)--> OUT.jsonl
```
The driver reads the input lazily, answers what needs no engine, and writes the lines to run to
a pending file beside the output (read on the driver's node, so the input need not be visible to
the other nodes). Each actor turns its rows back into requests with `run_batch`'s own
`parse_line` / `request_inputs`, runs them in one `LLM.generate` call, and returns the finished
output lines (`response_line` / `refused_line`), which the driver appends and flushes as batches
arrive. All of a body is honoured as in the single-engine path (chat and completions, per-line
sampling, `n`, logprobs), since the actor reads the body itself rather than `vlmx.ray`'s rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from vlmx.entrypoints.openai import convert
from vlmx.entrypoints.openai.run_batch import (
    BatchRequest,
    BatchSummary,
    count_lines,
    parse_line,
    read_done,
    read_lines,
    refused_line,
    request_inputs,
    response_line,
    triage,
    write_answer,
)
from vlmx.multimodal.chat import resolve_chat_template
from vlmx.ray.config import vlmxEngineProcessorConfig
from vlmx.ray.processor import EngineActor, Processor, import_ray

logger = logging.getLogger(__name__)

PENDING_SUFFIX = ".pending"  # OUT.jsonl.pending: this run's lines to run; removed at the end
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id


@dataclass(frozen=True)
class RayBatchOptions:
    """Where the engines run: `concurrency` actors of `num_gpus_per_engine` GPUs each (0: CPU),
    `batch_size` lines handed to an engine at once."""

    concurrency: int | tuple[int, int] = 1
    num_gpus_per_engine: float = 1.0
    num_cpus_per_engine: float = 1.0
    batch_size: int = 64


class BatchLineActor(EngineActor):
    """Rows: `text` = "N\\t<input line N>". Results: `answer` (the output line, JSON) and
    `num_images` per row; the input column is dropped (the driver keeps nothing per line)."""

    def __init__(self, config: vlmxEngineProcessorConfig, model_name: str) -> None:
        super().__init__(config)
        self.model_name = model_name
        self.context = convert.prompt_context(self.llm.llm_engine, config.chat_template)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.column("text").to_pylist()
        answers: list[dict[str, Any] | None] = [None] * len(rows)
        num_images = [0] * len(rows)
        requests: list[BatchRequest] = []
        prompts: list[dict[str, Any]] = []
        params: list[Any] = []
        where: list[int] = []  # row of each request
        for i, row in enumerate(rows):
            number, text = row.split("\t", 1)
            # NOTE: the driver parsed this very text into a request; it cannot raise BadLine.
            request = parse_line(int(number), text)
            try:
                prompt, sampling = request_inputs(self.context, request)
            except ValueError as e:
                answers[i] = refused_line(request, str(e))
                continue
            except Exception as e:  # a gap in validation must not cost the batch (as run_batch)
                logger.exception("line %d failed", request.line)
                answers[i] = refused_line(request, f"{type(e).__name__}: {e}")
                continue
            requests.append(request)
            prompts.append(prompt)
            params.append(sampling)
            where.append(i)
            num_images[i] = len((prompt.get("multi_modal_data") or {}).get("image") or [])
        outputs, failed = self._generate_all(prompts, params)
        for j, i in enumerate(where):
            if j in failed:
                answers[i], num_images[i] = refused_line(requests[j], failed[j]), 0
            else:
                answers[i] = response_line(requests[j], outputs[j], self.model_name)
        assert all(a is not None for a in answers), "every row gets its answer"
        lines = [json.dumps(a, ensure_ascii=False) for a in answers]
        return pa.table(
            {"answer": pa.array(lines, pa.string()), "num_images": pa.array(num_images, pa.int64())}
        )

    def _generate_all(self, prompts: list, params: list) -> tuple[list, dict[int, str]]:
        """The outputs of all `prompts` in one engine call, and {index: message} of refused ones."""
        from vlmx.llm import InvalidPromptsError

        if not prompts:
            return [], {}
        try:
            return self.llm.generate(prompts, params, use_tqdm=False), {}
        except InvalidPromptsError as e:  # NOTE: the engine ran the valid ones
            return e.outputs, e.errors


def processor_config(
    model: str,
    engine_kwargs: dict[str, Any],
    options: RayBatchOptions,
    chat_template: str | None = None,
) -> vlmxEngineProcessorConfig:
    """The processor's config. A `chat_template` (text, or a .jinja / .json file) is resolved
    here, so that a bad one fails at the start and actors on other machines get its text."""
    if chat_template is not None:
        # NOTE: with a template given, the model and tokenizer are not read.
        chat_template = resolve_chat_template(chat_template, model, None)
    return vlmxEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs,
        concurrency=options.concurrency,
        batch_size=options.batch_size,
        num_gpus=options.num_gpus_per_engine,
        num_cpus=options.num_cpus_per_engine,
        chat_template=chat_template,
    )


def run_batch_ray(
    in_path: str,
    out_path: str,
    config: vlmxEngineProcessorConfig,
    model_name: str,
    address: str | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Answer every line of `in_path` not yet in `out_path` (appended) through Ray actors.
    Ray is started (`address`: a running cluster; None: `RAY_ADDRESS`, else a local one) unless
    this process has initialised it already."""
    from tqdm import tqdm

    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address)
    start = time.perf_counter()
    done = read_done(out_path)
    summary = BatchSummary()
    bar = tqdm(
        total=count_lines(in_path), desc="run-batch", unit="req", disable=None if progress else True
    )
    bar.update(done.num_lines)
    pending = out_path + PENDING_SUFFIX
    try:
        with open(out_path, "a", encoding="utf-8") as out:
            num_pending = _triage_file(in_path, pending, done, out, summary, bar)
            if num_pending:
                processor = Processor(
                    config, None, None, None, None, BatchLineActor, {"model_name": model_name}
                )
                dataset = processor(_pending_dataset(ray, pending, num_pending, config))
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    answers = batch.column("answer").to_pylist()
                    for answer, images in zip(answers, batch.column("num_images").to_pylist()):
                        summary.num_images += images
                        write_answer(out, json.loads(answer), summary, bar)
    finally:
        bar.close()
        if os.path.exists(pending):
            os.remove(pending)
    summary.num_skipped = done.num_lines
    summary.seconds = time.perf_counter() - start
    return summary


def _triage_file(in_path: str, pending: str, done, out, summary: BatchSummary, bar) -> int:
    """Answer the lines that need no engine, write the others to `pending`; how many."""
    seen: Counter = Counter()
    num_pending = 0
    with open(pending, "w", encoding="utf-8") as f:
        for number, text in read_lines(in_path):
            verdict = triage(number, text, done, seen)
            if isinstance(verdict, BatchRequest):
                f.write(f"{number}\t{text.rstrip(chr(13) + chr(10))}\n")
                num_pending += 1
            elif verdict is not None:
                write_answer(out, verdict, summary, bar)
    return num_pending


def _pending_dataset(ray: Any, pending: str, num_pending: int, config) -> Any:
    """The pending lines as a Dataset, read on this (the driver's) node, in blocks of about a
    batch each so that every engine gets work (at most 1000 blocks)."""
    here = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}
    num_blocks = min(1000, max(1, -(-num_pending // config.batch_size)))
    return ray.data.read_text(pending, override_num_blocks=num_blocks, label_selector=here)
