import pytest
import torch

from vlmx.sampling_params import SamplingParams
from vlmx.worker.sampler import (
    Sampler,
    apply_penalties,
    build_sampling_metadata,
    logprobs_to_dicts,
    make_generator,
)

VOCAB = 32


def metadata(
    params,
    vocab=VOCAB,
    token_ids=None,
    prompt_lens=None,
    num_output_tokens=None,
    stop_token_ids=None,
    generators=None,
    device="cpu",
    argmax_cache=None,
):
    n = len(params)
    return build_sampling_metadata(
        params,
        token_ids=token_ids if token_ids is not None else [[] for _ in range(n)],
        prompt_lens=prompt_lens if prompt_lens is not None else [0] * n,
        num_output_tokens=num_output_tokens if num_output_tokens is not None else [0] * n,
        stop_token_ids=stop_token_ids if stop_token_ids is not None else [set() for _ in range(n)],
        generators=generators if generators is not None else [None] * n,
        vocab_size=vocab,
        device=device,
        argmax_cache=argmax_cache,
    )


def sample(logits, params, sampler=None, **kwargs):
    md = metadata(params, vocab=logits.shape[-1], **kwargs)
    return (sampler or Sampler(torch.Generator().manual_seed(0)))(logits, md)


def draws(row_logits, params, num_draws=20000, seed=0, whole_vocab=False):
    """`num_draws` samples of one row, drawn as one batch of identical rows.

    whole_vocab: add a row without top-k, which takes the batch off the top-k candidate path.
    """
    logits = row_logits[None].repeat(num_draws, 1)
    batch = [params] * num_draws
    if whole_vocab:
        logits, batch = torch.cat([logits, row_logits[None]]), batch + [SamplingParams()]
    out = sample(logits, batch, Sampler(torch.Generator().manual_seed(seed)))
    return out.sampled_token_ids[:num_draws]


def reference_probs(row_logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Independent reference: softmax(l / T), keep top-k, then the nucleus, then min-p."""
    probs = torch.softmax(row_logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    kept = probs[keep] / probs[keep].sum()
    total, nucleus = 0.0, []
    for token, p in zip(keep, kept.tolist()):
        nucleus.append(token)
        total += p
        if total >= top_p:
            break
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus]
    out[out < out.max() * min_p] = 0.0
    return out / out.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 16)
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.logprobs is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_argmax_only_batch_reads_the_logits_as_they_are(dtype, monkeypatch):
    """An argmax-only batch takes the argmax of the half-precision logits (no float32 copy);
    ties (common at 16 bits) go to the first maximum, as the float32 argmax's."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randint(-3, 4, (64, VOCAB), generator=gen).to(dtype)  # many tied maxima
    expected = logits.float().argmax(-1)
    monkeypatch.setattr(
        torch.Tensor, "float", lambda self: pytest.fail("the logits were copied to float32")
    )
    out = sample(logits, [SamplingParams(temperature=0.0)] * 64)
    assert torch.equal(out.sampled_token_ids, expected)
    assert out.logprobs is None


def test_input_logits_not_modified():
    logits = torch.randn(4, VOCAB)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, top_k=3, top_p=0.8, min_p=0.1, logprobs=2)]
    sample(logits, params * 4, token_ids=[[1, 2, 3]] * 4, prompt_lens=[1] * 4)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
        SamplingParams(top_k=1, top_p=0.9),
        SamplingParams(temperature=0.01),
    ],
)
def test_degenerate_truncation_equals_greedy(params):
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    out = sample(logits, [params] * 64)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=4),
        dict(top_p=0.6),
        dict(temperature=0.8, top_k=5, top_p=0.8),
        dict(min_p=0.2),
        dict(temperature=1.5, top_k=6, top_p=0.9, min_p=0.1),
    ],
)
@pytest.mark.parametrize("whole_vocab", [False, True])
def test_distribution_matches_reference(knobs, whole_vocab):
    row = torch.tensor([1.0, 2.0, 0.5, -1.0, 1.5, 0.0, 2.2, -0.3])
    expected = reference_probs(row, **knobs)
    tokens = draws(row, SamplingParams(**knobs), whole_vocab=whole_vocab)
    freq = torch.bincount(tokens, minlength=row.numel()).double() / tokens.numel()
    # Masked tokens are never drawn; kept ones within ~4 standard deviations (n = 20000).
    assert torch.all(freq[expected == 0] == 0), (freq, expected)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_top_k_keeps_ties_on_both_paths():
    row = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    for whole_vocab in (False, True):
        tokens = draws(row, SamplingParams(top_k=2, temperature=0.5), 3000, whole_vocab=whole_vocab)
        assert set(tokens.tolist()) == {0, 2, 3, 4}


def test_seeded_row_same_on_both_paths():
    vocab = 500
    gen = torch.Generator().manual_seed(9)
    row, other = torch.randn(vocab, generator=gen) * 2, torch.randn(vocab, generator=gen)
    seeded = SamplingParams(seed=5, top_k=40, top_p=0.9, min_p=0.01)

    def run(neighbour):
        generator, tokens = make_generator(5, "cpu"), []
        for _ in range(30):
            params = [seeded] + ([neighbour] if neighbour else [])
            logits = torch.stack([row, other][: len(params)])
            md = metadata(params, vocab=vocab, generators=[generator] + [None] * (len(params) - 1))
            assert md.use_top_k_candidates == (neighbour is None or neighbour.top_k > 0)
            tokens.append(Sampler()(logits, md).sampled_token_ids[0].item())
        return tokens

    alone = run(None)
    assert len(set(alone)) > 3
    assert run(SamplingParams(top_k=3)) == alone  # candidate path, larger batch
    assert run(SamplingParams(temperature=0.9)) == alone  # whole-vocabulary path


def test_masked_tokens_never_drawn_large_vocab():
    vocab = 1000
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    top5 = set(row.topk(5).indices.tolist())
    assert set(draws(row, SamplingParams(top_k=5), 5000).tolist()) <= top5
    probs = row.softmax(-1)
    allowed = set((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    assert set(draws(row, SamplingParams(min_p=0.3), 5000).tolist()) <= allowed


def test_seeded_rows_reproducible_whatever_the_batch():
    vocab = 100
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(vocab, generator=gen)
    others = torch.randn(6, vocab, generator=gen)
    seeded = SamplingParams(seed=1234, top_p=0.95)

    def run(position, neighbours, neighbour_params, default_seed, steps=5):
        generator = make_generator(1234, "cpu")
        sampler = Sampler(torch.Generator().manual_seed(default_seed))
        tokens = []
        for _ in range(steps):
            rows = list(neighbours)
            rows.insert(position, target)
            params = list(neighbour_params)
            params.insert(position, seeded)
            gens = [make_generator(99, "cpu") if p.seed is not None else None for p in params]
            gens[position] = generator
            out = sampler(torch.stack(rows), metadata(params, vocab=vocab, generators=gens))
            tokens.append(out.sampled_token_ids[position].item())
        return tokens

    alone = run(0, [], [], default_seed=0)
    mixed = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=99, top_k=3)]
    assert run(2, others[:3], mixed, default_seed=1) == alone
    assert run(0, others[3:6], mixed[::-1], default_seed=2) == alone
    assert len(set(alone)) > 1  # it does sample, not always the same token
    # A different seed gives a different sequence.
    other = Sampler()(
        torch.stack([target] * 5),
        metadata(
            [seeded] * 5, vocab=vocab, generators=[make_generator(s, "cpu") for s in range(5)]
        ),
    )
    assert len(set(other.sampled_token_ids.tolist())) > 1


def test_unseeded_rows_use_the_default_generator():
    logits = torch.zeros(50, VOCAB)
    params = [SamplingParams()] * 50
    a = sample(logits, params, Sampler(torch.Generator().manual_seed(7)))
    b = sample(logits, params, Sampler(torch.Generator().manual_seed(7)))
    c = sample(logits, params, Sampler(torch.Generator().manual_seed(8)))
    assert torch.equal(a.sampled_token_ids, b.sampled_token_ids)
    assert not torch.equal(a.sampled_token_ids, c.sampled_token_ids)


def test_penalties_against_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0], [2.0, -1.0, 0.5, -0.5, 3.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # same batch, no penalty: unchanged
    ]
    token_ids = [[0, 1, 2, 2, 1], [0, 1, 2, 2, 1]]  # prompt [0, 1], output [2, 2, 1]
    md = metadata(params, vocab=5, token_ids=token_ids, prompt_lens=[2, 2])
    got = apply_penalties(logits, md)
    # token 0: in prompt -> 2 / 2 = 1
    # token 1: seen, negative -> -1 * 2 = -2; once in output -> -2 - 0.5 - 0.25 = -2.75
    # token 2: seen, positive -> 0.5 / 2 = 0.25; twice in output -> 0.25 - 1.0 - 0.25 = -1.0
    # tokens 3, 4: unseen -> unchanged
    expected = torch.tensor([[1.0, -2.75, -1.0, -0.5, 3.0], [2.0, -1.0, 0.5, -0.5, 3.0]])
    torch.testing.assert_close(got, expected)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    out = sample(logits, [greedy], token_ids=[[0]], prompt_lens=[1])
    assert out.sampled_token_ids.tolist() == [1]  # 3 / 2 = 1.5 < 2
    freq = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    # Token 0 only in the prompt: frequency counts output tokens only.
    assert sample(logits, [freq], token_ids=[[0]], prompt_lens=[1]).sampled_token_ids.item() == 0
    out = sample(logits, [freq], token_ids=[[0]], prompt_lens=[0])
    assert out.sampled_token_ids.item() == 1


def test_min_tokens_masks_stop_tokens():
    eos, stop_id = 3, 5
    logits = torch.zeros(4, VOCAB)
    logits[:, eos] = 10.0
    logits[:, stop_id] = 9.0
    logits[:, 7] = 8.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=3),
        SamplingParams(temperature=0.0, min_tokens=3),
        SamplingParams(min_tokens=3),
        SamplingParams(temperature=0.0),
    ]
    out = sample(
        logits,
        params,
        num_output_tokens=[1, 3, 0, 0],
        stop_token_ids=[{eos, stop_id}] * 4,
    )
    # Row 0 is below min_tokens; row 1 reached it; row 2 samples (never a stop id); row 3 free.
    assert out.sampled_token_ids.tolist()[:2] == [7, eos]
    assert out.sampled_token_ids[3].item() == eos
    tokens = draws(logits[0], SamplingParams(min_tokens=2), 2000)  # via num_output_tokens=0
    assert eos in tokens.tolist()  # without the stop set, eos is drawn
    many = sample(
        logits[:1].repeat(2000, 1),
        [SamplingParams(min_tokens=2)] * 2000,
        stop_token_ids=[{eos, stop_id}] * 2000,
    )
    assert not set(many.sampled_token_ids.tolist()) & {eos, stop_id}


def test_argmax_metadata_is_cached_per_sampler():
    """An argmax-only batch's metadata is built once per batch size, in the cache of the sampler
    passed in; another sampler's cache, or none, builds its own."""
    greedy = [SamplingParams(temperature=0.0)] * 3
    a, b = Sampler(), Sampler()
    first = metadata(greedy, argmax_cache=a.argmax_metadata)
    assert metadata(greedy, argmax_cache=a.argmax_metadata) is first
    assert metadata(greedy[:2], argmax_cache=a.argmax_metadata) is not first  # per batch size
    assert metadata(greedy, argmax_cache=b.argmax_metadata) is not first
    assert metadata(greedy) is not first
    assert metadata(greedy, vocab=VOCAB + 1, argmax_cache=a.argmax_metadata) is not first
    wants_more = [SamplingParams(temperature=0.0, logprobs=1)] * 3
    kept = metadata(wants_more, argmax_cache=a.argmax_metadata)
    assert metadata(wants_more, argmax_cache=a.argmax_metadata) is not kept  # never cached
    assert len(a.argmax_metadata) == 3 and len(b.argmax_metadata) == 1
    logits = torch.randn(3, VOCAB)
    assert torch.equal(a(logits, first).sampled_token_ids, logits.argmax(dim=-1))


def test_all_greedy_batch_still_masks_below_min_tokens():
    """A batch of greedy rows takes the argmax-only metadata unless a row still masks its stop
    ids, wants logprobs or has a penalty."""
    eos = 3
    logits = torch.zeros(2, VOCAB)
    logits[:, eos] = 10.0
    logits[:, 7] = 8.0
    greedy = SamplingParams(temperature=0.0, min_tokens=2)
    plain = metadata([greedy, greedy], num_output_tokens=[2, 5], stop_token_ids=[{eos}] * 2)
    assert plain.all_greedy and plain.min_tokens_rows is None and plain.max_num_logprobs is None
    out = sample(logits, [greedy, greedy], num_output_tokens=[1, 5], stop_token_ids=[{eos}] * 2)
    assert out.sampled_token_ids.tolist() == [7, eos]
    with_logprobs = metadata([SamplingParams(temperature=0.0, logprobs=2)] * 2)
    assert with_logprobs.max_num_logprobs == 2
    penalised = metadata([SamplingParams(temperature=0.0, repetition_penalty=1.5)] * 2)
    assert penalised.repetition_penalty is not None


def test_logprobs_are_raw_and_include_the_sampled_token():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, VOCAB, generator=gen)
    logits[3, 0], logits[3, 20] = 5.0, 4.0  # token 0 is in the prompt: penalised to 5 / 3
    logits = logits.to(torch.bfloat16)
    params = [
        SamplingParams(logprobs=3, repetition_penalty=1.8, temperature=1.5),
        SamplingParams(logprobs=0),
        SamplingParams(),
        SamplingParams(temperature=0.0, logprobs=1, repetition_penalty=3.0),
        SamplingParams(logprobs=-1, top_k=2),
        SamplingParams(logprobs=2, min_p=0.5),
    ]
    token_ids = [list(range(10))] * 6
    out = sample(logits, params, token_ids=token_ids, prompt_lens=[10] * 6)
    lp = out.logprobs
    assert lp is not None
    raw = torch.log_softmax(logits.float(), dim=-1)
    sampled = out.sampled_token_ids
    assert lp.logprob_token_ids.shape == (6, VOCAB + 1) and lp.logprobs.shape == (6, VOCAB + 1)
    assert torch.equal(lp.logprob_token_ids[:, 0], sampled)
    torch.testing.assert_close(lp.logprobs[:, 0], raw.gather(1, sampled[:, None])[:, 0])
    top = raw.topk(VOCAB, dim=-1)
    assert torch.equal(lp.logprob_token_ids[:, 1:], top.indices)
    torch.testing.assert_close(lp.logprobs[:, 1:], top.values)
    expected_ranks = (raw > raw.gather(1, sampled[:, None])).sum(-1) + 1
    assert torch.equal(lp.sampled_token_ranks, expected_ranks)
    # The greedy penalised row picked a token that is not the raw argmax: its rank says so.
    assert sampled[3].item() == 20 and lp.sampled_token_ranks[3].item() == 2

    dicts = logprobs_to_dicts(lp, [p.logprobs for p in params])
    assert dicts[2] is None
    assert list(dicts[1]) == [sampled[1].item()]
    assert dicts[1][sampled[1].item()].rank == lp.sampled_token_ranks[1].item()
    for i, k in [(0, 3), (3, 1), (5, 2), (4, VOCAB)]:
        row = dicts[i]
        top_ids = top.indices[i, :k].tolist()
        assert set(row) == set(top_ids) | {sampled[i].item()}
        assert [row[t].rank for t in top_ids] == list(range(1, k + 1))
        for token, entry in row.items():
            assert entry.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
            assert entry.decoded_token is None


def test_mixed_batch_greedy_and_random():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(1, VOCAB, generator=gen).repeat(400, 1)
    greedy, random = SamplingParams(temperature=0.0), SamplingParams(temperature=2.0)
    params = [greedy if i % 2 == 0 else random for i in range(400)]
    out = sample(logits, params).sampled_token_ids
    assert torch.all(out[0::2] == logits[0].argmax())
    assert len(set(out[1::2].tolist())) > 5


def test_empty_batch():
    out = sample(torch.zeros(0, VOCAB), [])
    assert out.sampled_token_ids.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    device = torch.device("cuda")
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=2),
        SamplingParams(top_k=5, top_p=0.9, min_p=0.05, seed=1, frequency_penalty=0.5),
        SamplingParams(top_p=0.8, min_tokens=4, presence_penalty=0.3),
        SamplingParams(top_k=3),
    ]
    md = metadata(
        params,
        vocab=1000,
        token_ids=[[1, 2, 3]] * 4,
        prompt_lens=[1] * 4,
        num_output_tokens=[2] * 4,
        stop_token_ids=[{7}] * 4,
        generators=[None, make_generator(1, device), None, None],
        device=device,
    )
    logits = torch.randn(4, 1000, device=device, dtype=torch.bfloat16)
    sampler = Sampler()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, md)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.sampled_token_ids.device.type == "cuda"
    assert 7 not in out.sampled_token_ids[1:].tolist()
    assert not md.use_top_k_candidates
    for batch in (
        [SamplingParams(top_k=3, seed=2), SamplingParams(top_k=50, top_p=0.5, min_p=0.1)],
        [SamplingParams(top_k=3), SamplingParams(temperature=0.5)],  # top-k threshold on [B, V]
    ):
        gens = [make_generator(2, device) if p.seed is not None else None for p in batch]
        md = metadata(batch, vocab=1000, generators=gens, device=device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler(logits[:2], md)
        finally:
            torch.cuda.set_sync_debug_mode("default")
