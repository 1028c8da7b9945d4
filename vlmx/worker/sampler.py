"""Batched sampling on the logits' device: one row per request, each with its own params.

Order per step, as vLLM v1's sampler:

```
logits [B, V] ──► raw logprobs (log_softmax, float32) ─────────────────► top-k ids + values,
   │                                                                     sampled id's logprob+rank
   ├─ repetition / frequency / presence penalties
   ├─ min_tokens: stop token ids -> -inf while the output is shorter than min_tokens
   ├─ greedy rows: argmax ─────────────────────────────────────┐
   └─ random rows: / temperature -> top-k -> top-p -> min-p    │
        -> probs -> argmax(probs / q), q ~ Exp(1) ─────────────┴─► sampled_token_ids [B]
```

Nothing in `Sampler.__call__` reads a tensor value on the host: every branch is on Python-side
flags computed by `build_sampling_metadata` from the params, so a step never waits on the device.
Rows with a generator (requests with a seed) draw their `q` from it, so a seeded request gives the
same tokens whatever else is in the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import torch

from vlmx.device import host_to_device
from vlmx.outputs import Logprob
from vlmx.sampling_params import SamplingParams

# When every random row has a top-k at most this, truncation and the draw run on the
# [B, max_top_k] best logits of each row instead of the whole vocabulary (no sort of [B, V]).
MAX_TOP_K_CANDIDATES = 1024
# Extra candidates, so that tokens tied with the k-th value are kept, as the whole-vocabulary
# path keeps them (up to this many ties).
TOP_K_TIE_SLACK = 8


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling inputs of one step, already on the logits' device.

    Optional tensors are None when no row of the batch uses that feature, so that the sampler
    skips it entirely.
    """

    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows
    is_greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # [B] int64, 0 = off, else in [1, V]
    max_top_k: int  # largest k of the rows that use top-k, 0 if none
    use_top_k_candidates: bool  # every random row has top-k <= MAX_TOP_K_CANDIDATES
    top_p: torch.Tensor | None  # [B] float32, 1.0 = off
    min_p: torch.Tensor | None  # [B] float32, 0.0 = off
    generators: dict[int, torch.Generator]  # row -> its request's generator (random rows only)
    repetition_penalty: torch.Tensor | None  # [B] float32, 1.0 = off
    frequency_penalty: torch.Tensor | None  # [B] float32, 0.0 = off
    presence_penalty: torch.Tensor | None  # [B] float32, 0.0 = off
    seen_token_mask: torch.Tensor | None  # [B, V] bool, token in prompt or output (repetition)
    output_token_counts: torch.Tensor | None  # [B, V] float32, occurrences in the output
    min_tokens_rows: torch.Tensor | None  # [N] int64 \ (row, token) pairs whose logit is set
    min_tokens_token_ids: torch.Tensor | None  # [N] int64 / to -inf (stop ids before min_tokens)
    max_num_logprobs: int | None  # columns of top-k logprobs to return; None = no row wants them


# `build_sampling_metadata`'s argmax-only metadata by (device, batch size, vocabulary size); each
# `Sampler` holds one (`Sampler.argmax_metadata`).
ArgmaxMetadataCache = dict[tuple[torch.device, int, int], SamplingMetadata]


@dataclass(slots=True)
class LogprobsTensors:
    """Column 0 is the sampled token; columns 1..k the top-k of the raw distribution, best first."""

    logprob_token_ids: torch.Tensor  # [B, k + 1] int64
    logprobs: torch.Tensor  # [B, k + 1] float32
    sampled_token_ranks: torch.Tensor  # [B] int64, 1-based rank of the sampled token


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`: one per seeded request, kept for its life."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def _token_counts(rows: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32: how many times each token id occurs in each row (ids outside V ignored)."""
    lengths = [len(r) for r in rows]
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=sum(lengths))
    row_idx = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    row_idx_d, ids = host_to_device(np.stack([row_idx, flat]), device)  # [2, num_tokens]
    ids = torch.where((ids < 0) | (ids >= vocab_size), vocab_size, ids)  # -> spare column
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.float32, device=device)
    counts.view(-1).scatter_add_(
        0, row_idx_d * (vocab_size + 1) + ids, torch.ones(ids.shape, device=device)
    )
    return counts[:, :vocab_size]


def build_sampling_metadata(
    params: list[SamplingParams],
    token_ids: list[list[int]],
    prompt_lens: list[int],
    num_output_tokens: list[int],
    stop_token_ids: list[AbstractSet[int]],
    generators: list[torch.Generator | None],
    vocab_size: int,
    device: torch.device | str,
    argmax_cache: ArgmaxMetadataCache | None = None,
) -> SamplingMetadata:
    """One step's `SamplingMetadata` for rows `params[i]` (row i of the logits).

    token_ids[i]: row i's prompt + output ids so far; read only for rows with a penalty (others
    may pass []). prompt_lens[i] splits it. num_output_tokens[i]: tokens generated so far.
    stop_token_ids[i]: the ids that end row i (eos unless ignore_eos, plus `stop_token_ids`);
    they are masked while num_output_tokens[i] < min_tokens. generators[i]: row i's seeded
    generator or None (the sampler's default generator). argmax_cache: where an argmax-only
    batch's metadata is kept, to be returned again (the runner passes its sampler's); None
    builds it anew.
    """
    device = torch.device(device)
    num_rows = len(params)
    assert (
        len(token_ids)
        == len(prompt_lens)
        == len(num_output_tokens)
        == len(stop_token_ids)
        == len(generators)
        == num_rows
    )
    # A batch that only takes the argmax (no penalty, mask or logprobs) gets the same metadata
    # every step: built once per batch size (the sampler reads none of its tensors).
    plain_key = None
    if argmax_cache is not None and _argmax_only_rows(params, num_output_tokens, stop_token_ids):
        plain_key = (device, num_rows, vocab_size)
        if plain_key in argmax_cache:
            return argmax_cache[plain_key]
    greedy = [p.is_greedy for p in params]
    random_rows = [i for i in range(num_rows) if not greedy[i]]
    # Greedy params have top_k / top_p / min_p reset to off by SamplingParams.
    top_ks = [min(p.top_k, vocab_size) for p in params]

    rows = _row_tensors(
        params, greedy, top_ks, num_output_tokens, stop_token_ids, vocab_size, device
    )
    temperature, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty = rows[0]
    top_k, is_greedy, min_tokens_rows, min_tokens_token_ids = rows[1]
    num_masked = len(min_tokens_rows)

    seen_token_mask, output_token_counts = _penalty_counts(
        params, token_ids, prompt_lens, vocab_size, device
    )
    num_logprobs = [vocab_size if p.logprobs == -1 else p.logprobs for p in params]
    requested = [min(n, vocab_size) for n in num_logprobs if n is not None]

    metadata = SamplingMetadata(
        temperature=temperature,
        is_greedy=is_greedy,
        all_greedy=not random_rows,
        all_random=bool(random_rows) and len(random_rows) == num_rows,
        top_k=top_k if any(top_ks) else None,
        max_top_k=max(top_ks, default=0),
        use_top_k_candidates=bool(random_rows)
        and all(0 < top_ks[i] <= MAX_TOP_K_CANDIDATES for i in random_rows),
        top_p=top_p if any(p.top_p < 1.0 for p in params) else None,
        min_p=min_p if any(p.min_p > 0.0 for p in params) else None,
        generators={i: generators[i] for i in random_rows if generators[i] is not None},
        repetition_penalty=repetition_penalty if seen_token_mask is not None else None,
        frequency_penalty=frequency_penalty if output_token_counts is not None else None,
        presence_penalty=presence_penalty if output_token_counts is not None else None,
        seen_token_mask=seen_token_mask,
        output_token_counts=output_token_counts,
        min_tokens_rows=min_tokens_rows if num_masked else None,
        min_tokens_token_ids=min_tokens_token_ids if num_masked else None,
        max_num_logprobs=max(requested) if requested else None,
    )
    if plain_key is not None:
        assert argmax_cache is not None
        argmax_cache[plain_key] = metadata
    return metadata


def _row_tensors(
    params: list[SamplingParams],
    greedy: list[bool],
    top_ks: list[int],
    num_output_tokens: list[int],
    stop_token_ids: list[AbstractSet[int]],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The per-row parameters on the device: floats [6, B] (temperature, top_p, min_p, the
    three penalties) and (top_k [B], is_greedy [B], the (row, token id) pairs masked until
    min_tokens)."""
    num_rows = len(params)
    # NOTE: one host -> device copy per dtype; the per-row tensors are views of its rows.
    floats = host_to_device(
        [
            [1.0 if g else p.temperature for p, g in zip(params, greedy)],
            [p.top_p for p in params],
            [p.min_p for p in params],
            [p.repetition_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.presence_penalty for p in params],
        ],
        device,
        torch.float32,
    )  # [6, B]
    mask_pairs = [
        (i, t)
        for i, p in enumerate(params)
        if num_output_tokens[i] < p.min_tokens
        for t in sorted(stop_token_ids[i])
        if 0 <= t < vocab_size
    ]
    num_masked = len(mask_pairs)
    ints = host_to_device(
        top_ks + greedy + [i for i, _ in mask_pairs] + [t for _, t in mask_pairs],
        device,
        torch.int64,
    )  # [2 * B + 2 * num_masked]: top_k | is_greedy | masked rows | masked token ids
    top_k, is_greedy = ints[:num_rows], ints[num_rows : 2 * num_rows].bool()
    min_tokens_rows = ints[2 * num_rows : 2 * num_rows + num_masked]
    min_tokens_token_ids = ints[2 * num_rows + num_masked :]
    return floats, (top_k, is_greedy, min_tokens_rows, min_tokens_token_ids)


def _argmax_only_rows(
    params: list[SamplingParams],
    num_output_tokens: list[int],
    stop_token_ids: list[AbstractSet[int]],
) -> bool:
    """Whether every row only takes the argmax: greedy, no logprobs, penalty or stop mask."""
    return all(
        p.is_greedy
        and p.logprobs is None
        and not p.uses_repetition_penalty
        and not p.uses_output_counts
        and (n >= p.min_tokens or not stop_ids)
        for p, n, stop_ids in zip(params, num_output_tokens, stop_token_ids)
    )


def _penalty_counts(
    params: list[SamplingParams],
    token_ids: list[list[int]],
    prompt_lens: list[int],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(seen_token_mask [B, V] bool, for repetition penalties; output_token_counts [B, V], for
    frequency / presence penalties), each None where no row uses it."""
    use_repetition = [p.uses_repetition_penalty for p in params]
    use_output_counts = [p.uses_output_counts for p in params]
    seen_token_mask = output_token_counts = None
    if any(use_repetition):
        rows = [ids if use else [] for ids, use in zip(token_ids, use_repetition)]
        seen_token_mask = _token_counts(rows, vocab_size, device) > 0
    if any(use_output_counts):
        rows = [
            ids[n:] if use else [] for ids, n, use in zip(token_ids, prompt_lens, use_output_counts)
        ]
        output_token_counts = _token_counts(rows, vocab_size, device)
    return seen_token_mask, output_token_counts


def _argmax_only(md: SamplingMetadata) -> bool:
    """Whether nothing but the argmax is asked: no logprobs, penalties or min_tokens mask."""
    return (
        md.max_num_logprobs is None
        and md.repetition_penalty is None
        and md.output_token_counts is None
        and md.min_tokens_rows is None
    )


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF / vLLM: over prompt + output, positive logits / penalty, others * penalty),
    then frequency (- penalty * count) and presence (- penalty if present) over the output."""
    if md.repetition_penalty is not None:
        assert md.seen_token_mask is not None
        penalty = torch.where(md.seen_token_mask, md.repetition_penalty[:, None], 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if md.output_token_counts is not None:
        assert md.frequency_penalty is not None and md.presence_penalty is not None
        counts = md.output_token_counts
        logits = logits - md.frequency_penalty[:, None] * counts
        logits = logits - md.presence_penalty[:, None] * (counts > 0)
    return logits


def truncate_sorted(
    sorted_logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p on logits sorted ascending along the last dim [B, W]; dropped -> -inf.

    top-k keeps values >= the k-th largest (ties kept; k = 0 keeps all). top-p keeps the smallest
    set of most likely tokens whose probability sums to >= p, as vLLM computes it: drop a token
    while the ascending cumulative sum up to it stays <= 1 - p; the largest always stays.
    """
    width = sorted_logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k == 0, width, top_k.clamp(max=width))
        kth = sorted_logits.gather(1, (width - k)[:, None])  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, W]
        drop = cumulative <= 1.0 - top_p[:, None]
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return sorted_logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int
) -> torch.Tensor:
    """`truncate_sorted` over the whole vocabulary [B, V]; top-k alone needs no sort."""
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        assert top_k is not None and max_top_k > 0
        top_values = logits.topk(max_top_k, dim=-1).values  # [B, max_top_k], descending
        kth = top_values.gather(1, (top_k.clamp(1, max_top_k) - 1)[:, None])  # [B, 1]
        kth = torch.where(top_k[:, None] == 0, float("-inf"), kth)
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, sorted_idx = logits.sort(dim=-1)  # ascending
    sorted_logits = truncate_sorted(sorted_logits, top_k, top_p)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def gather_logprobs(
    logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor
) -> LogprobsTensors:
    """Top-`num_logprobs` of `logprobs` [B, V] per row, after the logprob + rank of `token_ids`."""
    token_logprobs = logprobs.gather(1, token_ids[:, None])  # [B, 1]
    ranks = (logprobs >= token_logprobs).sum(dim=-1)  # [B]
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)  # [B, k]
    return LogprobsTensors(
        logprob_token_ids=torch.cat([token_ids[:, None], top_ids], dim=1),
        logprobs=torch.cat([token_logprobs, top_logprobs], dim=1),
        sampled_token_ranks=ranks,
    )


class Sampler:
    """Samples one token per row of `logits` [B, V] as `SamplingMetadata` says.

    generator: draws for rows without their own generator (None = torch's default generator of
    the logits' device). `argmax_metadata` is this sampler's cache for `build_sampling_metadata`
    (`argmax_cache=`): an argmax-only batch's metadata is built once per batch size.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator
        self.argmax_metadata: ArgmaxMetadataCache = {}

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2, logits.shape
        if md.all_greedy and _argmax_only(md):
            # NOTE: widening to float32 is exact and keeps the order, so the argmax of the
            # logits as computed is the float32 copy's (first maximum on ties, as there) without
            # writing that copy: [B, vocab] float32, a tenth of a millisecond at 256 rows.
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1), logprobs=None)
        logits = logits.float()  # NOTE: no copy if already float32: nothing below is in place
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]

        logits = apply_penalties(logits, md)
        if md.min_tokens_rows is not None:
            neg_inf = torch.full((), float("-inf"), device=logits.device)  # no host copy
            logits = logits.index_put((md.min_tokens_rows, md.min_tokens_token_ids), neg_inf)
        sampled = self._sample(logits, md)

        logprobs = None
        if raw_logprobs is not None:
            assert md.max_num_logprobs is not None
            logprobs = gather_logprobs(raw_logprobs, md.max_num_logprobs, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        greedy = None if md.all_random else logits.argmax(dim=-1)
        if md.all_greedy:
            assert greedy is not None
            return greedy

        logits = logits / md.temperature[:, None]
        if md.use_top_k_candidates:
            sampled = self._sample_top_k_candidates(logits, md)
        else:
            logits = apply_top_k_top_p(logits, md.top_k, md.top_p, md.max_top_k)
            if md.min_p is not None:
                logits = apply_min_p(logits, md.min_p)
            q = self._exponential(logits, md.generators)  # [B, V]
            sampled = logits.softmax(dim=-1).div_(q).argmax(dim=-1)
        if greedy is None:
            return sampled
        return torch.where(md.is_greedy, greedy, sampled)

    def _sample_top_k_candidates(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Every random row has top-k: truncate and draw among the K = max_top_k (+ slack for
        ties) best logits of each row, instead of sorting the whole vocabulary.

        Seeded rows still draw a whole vocabulary row of q from their generator and use the
        candidates' entries, so their tokens match the whole-vocabulary path's.
        """
        assert md.top_k is not None
        num_candidates = min(md.max_top_k + TOP_K_TIE_SLACK, logits.shape[-1])
        values, token_ids = logits.topk(num_candidates, dim=-1)  # [B, K] descending
        values, token_ids = values.flip(-1), token_ids.flip(-1)  # ascending
        values = truncate_sorted(values, md.top_k, md.top_p)
        if md.min_p is not None:
            values = apply_min_p(values, md.min_p)
        if md.generators:
            q = self._exponential(logits, md.generators).gather(1, token_ids)  # [B, K]
        else:
            q = self._exponential(values, {})
        choice = values.softmax(dim=-1).div_(q).argmax(dim=-1)  # [B]
        return token_ids.gather(1, choice[:, None])[:, 0]

    def _exponential(
        self, like: torch.Tensor, generators: dict[int, torch.Generator]
    ) -> torch.Tensor:
        """q ~ Exp(1), shaped as `like`; rows in `generators` drawn from their own generator.

        argmax(probs / q) then picks token i with probability probs[i] (the exponential race).
        """
        q = torch.empty_like(like, dtype=torch.float32)
        if len(generators) < like.shape[0]:
            q.exponential_(generator=self.generator)
        for row, generator in generators.items():
            q[row].exponential_(generator=generator)
        # NOTE: q == 0 would turn a masked token's 0 / 0 into NaN, which argmax picks.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


def logprobs_to_dicts(
    tensors: LogprobsTensors, num_logprobs: list[int | None]
) -> list[dict[int, Logprob] | None]:
    """Host-side: one `{token id: Logprob}` per row (None where the row asked for none).

    Row i holds the sampled token first (its rank from `sampled_token_ranks`), then its own top
    `num_logprobs[i]` (-1 = all columns) with ranks 1..k; a sampled token also in the top-k takes
    the top-k rank, as in vLLM. `decoded_token` is left None.
    """
    token_ids = tensors.logprob_token_ids.tolist()
    logprobs = tensors.logprobs.tolist()
    ranks = tensors.sampled_token_ranks.tolist()
    out: list[dict[int, Logprob] | None] = []
    for i, num in enumerate(num_logprobs):
        if num is None:
            out.append(None)
            continue
        num = len(token_ids[i]) - 1 if num == -1 else num
        entries = {token_ids[i][0]: Logprob(logprobs[i][0], ranks[i])}
        for col in range(1, num + 1):
            entries[token_ids[i][col]] = Logprob(logprobs[i][col], col)
        out.append(entries)
    return out
