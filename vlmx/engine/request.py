"""A request as the engine tracks it, from arrival to its last token."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from vlmx.lora.request import LoRARequest
from vlmx.multimodal.inputs import MMFeature
from vlmx.outputs import RequestMetrics
from vlmx.sampling_params import SamplingParams
from vlmx.step import PLACEHOLDER_TOKEN_ID


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass(eq=False)
class Request:
    """Token ids of prompt and output, images, and how far the KV cache has computed them.

    ```
    all_token_ids:  [ prompt ........................ | output ...... ]
                      ^0         ^num_computed_tokens               ^num_tokens
    ```
    One step computes `all_token_ids[num_computed_tokens : num_computed_tokens + n]`; a sample is
    drawn only when that reaches `num_tokens`. Preemption resets `num_computed_tokens` to 0
    (recompute), keeping the output so far.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    mm_features: list[MMFeature]
    sampling_params: SamplingParams
    eos_token_ids: set[int]
    max_tokens: int  # output tokens allowed (sampling_params.max_tokens capped by max_model_len)
    mrope_positions: torch.Tensor | None = None  # [3, num_prompt_tokens] int64
    mrope_position_delta: int = 0
    lora_int_id: int = 0
    arrival_index: int = 0
    lora_request: LoRARequest | None = None

    all_token_ids: list[int] = field(init=False)
    mm_end: int = field(init=False)  # where the last image placeholder ends (0: no images)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # one entry per output token
    cumulative_logprob: float = 0.0
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hits at first schedule; -1 = not scheduled yet
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of full blocks, in order
    # Async scheduling: the last token is reserved for a sample not read from the GPU yet.
    placeholder_pending: bool = False
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.mm_end = max((f.placeholder.end for f in self.mm_features), default=0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        if not self.output_token_ids:
            self.metrics.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_placeholder(self) -> None:
        """Reserve the next output token before its value is known (async scheduling): the next
        step can be scheduled, and its input read on the GPU from this step's sample."""
        assert not self.placeholder_pending, self.request_id
        self.output_token_ids.append(PLACEHOLDER_TOKEN_ID)
        self.all_token_ids.append(PLACEHOLDER_TOKEN_ID)
        self.placeholder_pending = True

    def fill_placeholder(self, token_id: int) -> None:
        assert self.placeholder_pending, self.request_id
        if len(self.output_token_ids) == 1:
            self.metrics.first_token_time = time.monotonic()
        self.output_token_ids[-1] = token_id
        self.all_token_ids[-1] = token_id
        self.placeholder_pending = False
