"""What `LLM.generate` returns: vLLM's `RequestOutput` / `CompletionOutput` / `Logprob`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log probability at one step.

    rank: 1-based position of the token in that step's distribution (1 = most likely), None
    where unknown. decoded_token: the token's text on its own, None until decoded.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per output token: token id -> Logprob, holding the top-k ids and the sampled id.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request.

    finish_reason: None while generating, then "stop" (eos, a stop token id or a stop string),
    "length" (max_tokens or max_model_len) or "abort". stop_reason: the stop string or stop token
    id that ended it; None when it ended on eos, on length, or has not ended.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of one request's life, as vLLM reports them."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far (all of them at the end).

    num_cached_tokens: prompt tokens whose KV came from the prefix cache.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
