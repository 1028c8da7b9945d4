"""`build_llm_processor`: a function `Dataset -> Dataset` that runs one vlmx engine per Ray actor
over the rows, as `ray.data.llm.build_llm_processor` does for vLLM.

```
Dataset --map(preprocess)--> rows --map_batches(EngineActor x concurrency)--> + results
        --map(postprocess)--> Dataset
```

Each actor builds its `vlmx.LLM` once and takes `batch_size` rows at a time: every row of a
batch goes to the engine in one `LLM.chat` (or `LLM.generate`) call, so the engine batches them
continuously, and a row the engine refuses (unreadable image, too many images, prompt too long,
bad sampling values) gets its message in the `error` column while the others run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmx.ray.config import vlmxEngineProcessorConfig
from vlmx.ray.rows import RESULT_COLUMNS, RowRequest, result_columns, row_request

RAY_MISSING = 'vlmx.ray needs Ray Data, an optional extra: pip install "vlmx[ray]"'


def import_ray() -> Any:
    """The `ray` module with `ray.data` loaded; ImportError naming the extra if missing."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(f"{RAY_MISSING} ({e})") from e
    return ray


class EngineActor:
    """A Ray Data actor (the callable class of `map_batches`): one `vlmx.LLM`, built once.

    `__call__` takes a batch as a `pyarrow.Table` and returns it with `RESULT_COLUMNS` added.
    """

    def __init__(self, config: vlmxEngineProcessorConfig) -> None:
        from vlmx.llm import LLM

        kwargs = dict(config.engine_kwargs)
        if config.num_gpus == 0:
            kwargs.setdefault("device", "cpu")
        self.config = config
        self.llm = LLM(model=config.model_source, **kwargs)
        # NOTE: as vLLM's LLM: the checkpoint's defaults only where no sampling params are given.
        self.checkpoint_params = dict(self.llm.llm_engine.default_sampling_kwargs)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        requests: list[RowRequest | None] = [None] * len(rows)
        errors: list[str | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            try:
                requests[i] = row_request(row, self.config, self.checkpoint_params)
            except ValueError as e:
                errors[i] = str(e)
        outputs = self._run(requests, errors)
        values = [result_columns(out, err) for out, err in zip(outputs, errors)]
        types = (pa.string(), pa.int64(), pa.int64(), pa.string(), pa.string())
        table = batch.drop_columns([c for c in RESULT_COLUMNS if c in batch.column_names])
        for idx, (name, kind) in enumerate(zip(RESULT_COLUMNS, types)):
            table = table.append_column(name, pa.array([v[idx] for v in values], type=kind))
        return table

    def _run(self, requests: list[RowRequest | None], errors: list[str | None]) -> list[Any]:
        """The outputs of `requests` in order (None where a row failed; `errors` gains why):
        conversations in one `LLM.chat` call, raw prompts in one `LLM.generate` call."""
        from vlmx.llm import InvalidPromptsError

        outputs: list[Any] = [None] * len(requests)
        chat_idx = [i for i, r in enumerate(requests) if r is not None and r.prompt is None]
        prompt_idx = [i for i, r in enumerate(requests) if r is not None and r.prompt is not None]
        for indexes, call in ((chat_idx, self._chat), (prompt_idx, self._generate)):
            if not indexes:
                continue
            items = [requests[i] for i in indexes]
            try:
                results, failed = call(items), {}
            except InvalidPromptsError as e:  # NOTE: the engine ran the valid ones
                results, failed = e.outputs, e.errors
            for j, i in enumerate(indexes):
                outputs[i] = results[j]
                if j in failed:
                    errors[i] = failed[j]
        return outputs

    def _chat(self, requests: list[RowRequest]) -> list[Any]:
        return self.llm.chat(
            [r.conversation for r in requests],
            [r.sampling_params for r in requests],
            use_tqdm=False,
            chat_template=self.config.chat_template,
            chat_template_kwargs=self.config.chat_template_kwargs,
        )

    def _generate(self, requests: list[RowRequest]) -> list[Any]:
        return self.llm.generate(
            [r.prompt for r in requests], [r.sampling_params for r in requests], use_tqdm=False
        )


class Processor:
    """`Dataset -> Dataset`: preprocess, the engines, postprocess (see `build_llm_processor`)."""

    def __init__(
        self,
        config: vlmxEngineProcessorConfig,
        preprocess: Callable[[dict], dict] | None,
        postprocess: Callable[[dict], dict] | None,
        preprocess_map_kwargs: dict[str, Any] | None,
        postprocess_map_kwargs: dict[str, Any] | None,
        actor: type[EngineActor] = EngineActor,
        actor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        # NOTE: a subclass of EngineActor reads other rows (vlmx run-batch --ray's batch lines).
        self.actor = actor
        self.actor_kwargs = actor_kwargs or {}
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.preprocess_map_kwargs = preprocess_map_kwargs or {}
        self.postprocess_map_kwargs = postprocess_map_kwargs or {}

    def __call__(self, dataset: Any) -> Any:
        ray = import_ray()
        config = self.config
        if self.preprocess is not None:
            dataset = dataset.map(self.preprocess, **self.preprocess_map_kwargs)
        remote_args = dict(config.ray_remote_args)
        if config.accelerator_type is not None:
            remote_args["accelerator_type"] = config.accelerator_type
        min_size, max_size = config.min_max_concurrency
        dataset = dataset.map_batches(
            self.actor,
            fn_constructor_kwargs={"config": config, **self.actor_kwargs},
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=min_size, max_size=max_size),
            num_gpus=config.num_gpus,
            num_cpus=config.num_cpus,
            **remote_args,
        )
        if self.postprocess is not None:
            dataset = dataset.map(self.postprocess, **self.postprocess_map_kwargs)
        return dataset


def build_llm_processor(
    config: vlmxEngineProcessorConfig,
    preprocess: Callable[[dict], dict] | None = None,
    postprocess: Callable[[dict], dict] | None = None,
    preprocess_map_kwargs: dict[str, Any] | None = None,
    postprocess_map_kwargs: dict[str, Any] | None = None,
) -> Processor:
    """A processor: call it on a `ray.data.Dataset` to get the Dataset of results (lazily, as
    Ray Data runs everything). `preprocess` maps each input row to the row the engines read
    (columns as `vlmxEngineProcessorConfig` says); `postprocess` maps each result row (input
    columns plus `generated_text`, `num_input_tokens`, `num_generated_tokens`, `finish_reason`,
    `error`) to what you keep. The `*_map_kwargs` go to their `Dataset.map` (e.g. num_cpus).

    Raises ImportError naming the `vlmx[ray]` extra when Ray Data is not installed.
    """
    import_ray()
    if not isinstance(config, vlmxEngineProcessorConfig):
        raise ValueError(f"config must be a vlmxEngineProcessorConfig, got {type(config).__name__}")
    return Processor(config, preprocess, postprocess, preprocess_map_kwargs, postprocess_map_kwargs)
