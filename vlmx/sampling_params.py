"""How to sample one request's output: vLLM's `SamplingParams`, same names and defaults."""

from __future__ import annotations

import copy
import enum
import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Below this, a temperature means greedy (vLLM's `_SAMPLING_EPS`).
SAMPLING_EPS = 1e-5
# Smaller positive temperatures are raised to this: logits / 1e-3 overflow in half precision.
MIN_TEMPERATURE = 1e-2


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """Sampling parameters of one request, as vLLM's `SamplingParams` names them.

    `__post_init__` validates every field (a `ValueError` names the field, its allowed range and
    the value given) and normalises: `stop` str -> list, `stop_token_ids` None -> [],
    `top_k` -1 -> 0, `seed` -1 -> None, `logprobs` True -> 1; temperature < 1e-5 means greedy
    and resets top_p / top_k / min_p to off.
    """

    n: int = 1
    presence_penalty: float = 0.0  # subtracted once per token present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # over prompt + output tokens; > 1 discourages
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per output token (+ the sampled one); -1 = all
    prompt_logprobs: int | None = None  # not supported yet
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:
            self.seed = None
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1

        self._verify_args()

        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning(
                "temperature %s is below %s, which makes logits overflow; using %s",
                self.temperature,
                MIN_TEMPERATURE,
                MIN_TEMPERATURE,
            )
            self.temperature = MIN_TEMPERATURE
        if self.temperature < SAMPLING_EPS:
            # NOTE: as in vLLM, greedy ignores the truncation knobs; n > 1 would give n copies.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}")

    def _verify_args(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(
            -2.0 <= self.presence_penalty <= 2.0,
            f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        check(
            -2.0 <= self.frequency_penalty <= 2.0,
            f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        check(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0,
            f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}",
        )
        check(
            math.isfinite(self.temperature) and self.temperature >= 0.0,
            f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}",
        )
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be 0 or -1 (off) or an integer >= 1, got {self.top_k!r}",
        )
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(
            self.seed is None or _is_int(self.seed),
            f"seed must be an integer or None, got {self.seed!r}",
        )
        check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1 or None (up to max_model_len), "
            f"got {self.max_tokens!r}",
        )
        check(
            _is_int(self.min_tokens) and self.min_tokens >= 0,
            f"min_tokens must be an integer >= 0, got {self.min_tokens!r}",
        )
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}",
        )
        check(
            self.logprobs is None
            or (_is_int(self.logprobs) and (self.logprobs >= 0 or self.logprobs == -1)),
            f"logprobs must be None, an integer >= 0, or -1 (whole vocabulary), "
            f"got {self.logprobs!r}",
        )
        check(
            self.prompt_logprobs is None,
            f"prompt_logprobs is not supported by vlmx yet (got {self.prompt_logprobs}); "
            "leave it None",
        )
        check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}",
        )
        check(
            all(isinstance(s, str) for s in self.stop),
            f"stop must be a string or a list of strings, got {self.stop!r}",
        )
        check(all(self.stop), f"stop cannot contain an empty string, got {self.stop!r}")
        check(
            not (self.stop and not self.detokenize),
            "stop strings are only supported when detokenize is True; "
            "set detokenize=True or remove stop",
        )

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def uses_repetition_penalty(self) -> bool:
        """Sampling reads the prompt and output ids so far."""
        return self.repetition_penalty != 1.0

    @property
    def uses_output_counts(self) -> bool:
        """Sampling reads how often each id occurs in the output so far."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def stop_buffer_length(self) -> int:
        """Characters a stream holds back so that it never shows the start of a stop string."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
