"""The step records: the only things that cross between the engine and the workers.

The scheduler describes each step in plain data and the worker keeps its own state from it, so a
worker never reads the engine's `Request` objects (and can live in another process, one per
tensor-parallel rank). A request crosses in full once, on its first step (`NewRequestData`); after
that only what changed crosses (`CachedRequestData`: its computed-token count, the blocks it was
given, whether it came back after preemption). The worker knows the tokens it sampled itself.

```
step N:    new [A: ids, images, params, blocks 0 1]   cached []
step N+1:  new [B: ...]                               cached [A: computed 7, new blocks [2]]
step N+2:  finished [A]                               cached [B: computed 9, new blocks []]
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmx.lora.request import LoRARequest
from vlmx.multimodal.inputs import MMFeature
from vlmx.sampling_params import SamplingParams

# Stands in for a sampled token until the host reads it. It never reaches the model: an input
# that is such a token is read from the previous step's samples on the device.
PLACEHOLDER_TOKEN_ID = 0


@dataclass(slots=True, frozen=True)
class NewRequestData:
    """A request's first step on the workers: everything they need of it, once."""

    request_id: str
    prompt_token_ids: list[int]
    mm_features: list[MMFeature]  # one per image: encoder inputs, mm_hash, placeholder span
    sampling_params: SamplingParams
    block_ids: list[int]  # its KV blocks so far (prefix-cache hits first)
    num_computed_tokens: int  # tokens whose KV is already in those blocks (prefix hits)
    mrope_positions: torch.Tensor | None = None  # [3, num_prompt_tokens] int64, M-RoPE only
    mrope_position_delta: int = 0
    lora_int_id: int = 0
    lora_request: LoRARequest | None = None  # the adapter (0 / None: the base model)


@dataclass(slots=True)
class CachedRequestData:
    """The requests of a step that the workers already hold, one list entry per request (in the
    order of `SchedulerOutput.request_ids`, new requests left out): only what changed.

    A resumed request (back after preemption, recomputed from token 0 or its prefix hits) has
    all its blocks in `new_block_ids`, replacing the ones it held before.
    """

    request_ids: list[str] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # [] where none were added
    resumed: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.request_ids)

    def append(
        self, request_id: str, num_computed_tokens: int, new_block_ids: list[int], resumed: bool
    ) -> None:
        self.request_ids.append(request_id)
        self.num_computed_tokens.append(num_computed_tokens)
        self.new_block_ids.append(new_block_ids)
        self.resumed.append(resumed)


@dataclass(slots=True)
class SchedulerOutput:
    """One step, as the workers receive it."""

    request_ids: list[str] = field(default_factory=list)  # batch order
    num_scheduled_tokens: list[int] = field(default_factory=list)  # tokens of request_ids[i]
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: CachedRequestData = field(default_factory=CachedRequestData)
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)  # id -> images to encode
    freed_mm_hashes: list[str] = field(default_factory=list)  # encoder outputs to drop
    # Since the previous step: requests that ended (the workers drop their state) and requests
    # preempted (the workers keep their state, for their tokens, until they resume).
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def num_images(self) -> int:
        """Images the step encodes."""
        return sum(len(indexes) for indexes in self.encoder_inputs.values())

    @property
    def is_empty(self) -> bool:
        return not self.request_ids


@dataclass(slots=True)
class RunnerOutput:
    """What the workers return for a step, one entry per scheduled request (batch order)."""

    sampled_token_ids: list[int | None]  # None: a prefill chunk short of the prompt's end
    logprobs: list[dict | None]  # {token_id: Logprob} where logprobs were asked for
