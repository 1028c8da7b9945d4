import pytest

from vlmx.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (
        16,
        0,
        None,
        None,
        None,
    )
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.include_stop_str_in_output
    assert p.sampling_type == SamplingType.RANDOM and not p.is_greedy


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, seed=-1, stop_token_ids=[5, 5, 7], logprobs=True)
    assert p.stop == ["###"] and p.top_k == 0 and p.seed is None
    assert p.stop_token_ids == [5, 7] and p.logprobs == 1
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_greedy_resets_truncation_and_sampling_type():
    p = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1, seed=3)
    assert p.is_greedy and p.sampling_type == SamplingType.GREEDY
    assert (p.top_k, p.top_p, p.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=1e-3).temperature == pytest.approx(1e-2)


def test_stop_buffer_length():
    assert SamplingParams(stop=["ab", "wxyz"]).stop_buffer_length == 3
    assert SamplingParams(stop=["ab"], include_stop_str_in_output=True).stop_buffer_length == 0
    assert SamplingParams().stop_buffer_length == 0


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], stop_token_ids=[1])
    q = p.clone()
    q.stop.append("y")
    q.stop_token_ids.append(2)
    assert (
        p.stop == ["x"]
        and p.stop_token_ids == [1]
        and q == SamplingParams(stop=["x", "y"], stop_token_ids=[1, 2])
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be an integer >= 1, got 0"),
        (dict(temperature=-1.0), "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(top_p=0), "top_p must be in (0, 1], got 0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_k=-2), "top_k must be 0 or -1 (off) or an integer >= 1, got -2"),
        (dict(top_k=2.5), "top_k must be 0 or -1 (off) or an integer >= 1, got 2.5"),
        (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0, got 0.0"),
        (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2], got 3.0"),
        (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2, 2], got -2.5"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1 or None"),
        (dict(min_tokens=-1), "min_tokens must be an integer >= 0, got -1"),
        (dict(min_tokens=20, max_tokens=10), "min_tokens must be <= max_tokens=10, got 20"),
        (dict(logprobs=-2), "logprobs must be None, an integer >= 0, or -1"),
        (dict(prompt_logprobs=1), "prompt_logprobs is not supported by vlmx yet"),
        (dict(stop=["a", ""]), "stop cannot contain an empty string"),
        (dict(stop=[1]), "stop must be a string or a list of strings"),
        (dict(stop="x", detokenize=False), "stop strings are only supported when detokenize"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be non-negative integers"),
        (dict(seed=1.5), "seed must be an integer or None"),
        (dict(temperature=0.0, n=2), "n must be 1 when using greedy sampling, got 2"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert message in str(excinfo.value)
