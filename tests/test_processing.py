"""`vlmx.models.processing` and `vlmx.models.processor_settings`: the helpers every family processor
shares."""

from __future__ import annotations

import json

import pytest
import torch

from vlmx.models import processing, processor_settings
from vlmx.multimodal.cache import TensorCache
from vlmx.multimodal.resize import ResizeTaps, resize_uint8_fixed_point


def _entry(num_floats: int) -> torch.Tensor:
    return torch.zeros(num_floats, dtype=torch.float32)  # 4 bytes a value


def _check_bytes(cache: TensorCache) -> None:
    """The cache's own account equals the bytes of what it holds, within its bound."""
    held = 0
    for entry in cache._entries.values():
        tensors = (entry,) if isinstance(entry, torch.Tensor) else entry
        held += sum(t.numel() * t.element_size() for t in tensors)
    assert cache.num_bytes == held <= cache.capacity_bytes


def test_cache_evicts_least_recently_used_by_bytes():
    cache: TensorCache[torch.Tensor] = TensorCache(capacity_bytes=100)
    for key in "abc":
        cache.put(key, _entry(10))  # 40 bytes each: c evicts a
    assert len(cache) == 2 and cache.get("a") is None
    assert cache.get("b") is not None  # b is now newer than c
    cache.put("d", _entry(10))
    assert cache.get("c") is None and cache.get("b") is not None and cache.get("d") is not None
    _check_bytes(cache)


def test_cache_holds_tuples_and_skips_oversized_entries():
    cache: TensorCache[tuple[torch.Tensor, ...]] = TensorCache(capacity_bytes=100)
    pair = (_entry(10), torch.zeros(3, dtype=torch.int64))  # 40 + 24 bytes
    cache.put("a", pair)
    assert cache.num_bytes == 64 and cache.get("a") is pair
    cache.put("a", (_entry(1),))  # a key already held keeps its entry
    assert cache.get("a") is pair
    cache.put("big", (_entry(30),))  # 120 bytes: never held, nothing evicted for it
    assert cache.get("big") is None and len(cache) == 1
    _check_bytes(cache)


def test_get_or_compute_computes_each_missing_key_once():
    cache: TensorCache[torch.Tensor] = TensorCache(capacity_bytes=1000)
    calls: list[list[int]] = []

    def compute(inputs: list[int]) -> list[torch.Tensor]:
        calls.append(inputs)
        return [torch.full((2,), float(x)) for x in inputs]

    first = cache.get_or_compute(["x", "y", "x"], [1, 2, 1], compute)
    assert calls == [[1, 2]] and first[0] is first[2]
    second = cache.get_or_compute(["y", "z"], [2, 3], compute)
    assert calls == [[1, 2], [3]] and second[0] is first[1]
    assert cache.get_or_compute(["z"], [3], compute)[0] is second[1] and len(calls) == 2
    _check_bytes(cache)


def test_get_or_compute_returns_entries_too_big_to_keep():
    cache: TensorCache[torch.Tensor] = TensorCache(capacity_bytes=4)
    out = cache.get_or_compute(["a"], [0], lambda xs: [_entry(8) for _ in xs])
    assert out[0].numel() == 8 and len(cache) == 0


@pytest.mark.parametrize(
    "ids, runs",
    [
        ([], []),
        ([1, 2, 3], []),
        ([9], [(0, 1)]),
        ([9, 9, 1, 9, 2, 9, 9, 9], [(0, 2), (3, 4), (5, 8)]),
        ([1, 9, 9, 9, 2], [(1, 4)]),
    ],
)
def test_find_token_runs(ids, runs):
    assert processing.find_token_runs(ids, 9) == runs


def test_input_checks():
    processing.check_image_tensors([torch.zeros(3, 4, 5, dtype=torch.uint8)])
    for bad in (torch.zeros(3, 4, 5), torch.zeros(4, 4, 5, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
            processing.check_image_tensors([bad])
    processing.check_no_video_placeholders([1, 2, 3], None, "<video>")
    processing.check_no_video_placeholders([1, 2, 3], 7, "<video>")
    with pytest.raises(ValueError, match=r"video placeholders \(<video>\)"):
        processing.check_no_video_placeholders([1, 7, 3], 7, "<video>")


def test_read_processor_files(tmp_path):
    assert processor_settings.read_processor_files(str(tmp_path)) == ({}, {})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))
    assert processor_settings.read_processor_files(str(tmp_path)) == (
        {"a": 1},
        {"image_seq_len": 4},
    )
    nested = {"image_processor": {"b": 2}, "patch_size": 3}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert processor_settings.read_processor_files(str(tmp_path)) == ({"b": 2}, nested)


def test_normalization_constants_rescale_and_normalize_in_one_step():
    mean, std = processing.normalization_constants(
        (0.5, 0.25, 0.0), (0.5, 0.5, 1.0), 1 / 255, "cpu"
    )
    assert mean.shape == std.shape == (3, 1, 1)
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1)
    expected = ((pixels / 255) - torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1)) / torch.tensor(
        [0.5, 0.5, 1.0]
    ).view(3, 1, 1)
    assert torch.allclose((pixels.float() - mean) / std, expected)


def test_config_and_kwargs_checks():
    processor_settings.check_processor_flags({"do_resize": True, "do_normalize": None})
    with pytest.raises(ValueError, match="do_rescale=false"):
        processor_settings.check_processor_flags({"do_rescale": False})
    processor_settings.check_processor_flags({"do_resize": False}, ("do_rescale",))
    processor_settings.reject_unknown_kwargs({"a": 1}, ("a", "b"), "Fam")
    with pytest.raises(ValueError, match=r"\['c'\] for Fam; supported: a, b$"):
        processor_settings.reject_unknown_kwargs({"a": 1, "c": 2}, ("a", "b"), "Fam")
    with pytest.raises(ValueError, match="supported: a=int$"):
        processor_settings.reject_unknown_kwargs({"c": 2}, ("a",), "Fam", "a=int")


def test_resample_and_kwarg_value_checks():
    ps = processor_settings
    ps.check_processor_flags({"resample": 3}, resample=(ps.BICUBIC,))
    ps.check_processor_flags({"resample": None}, resample=(ps.BICUBIC,))  # unset: the default
    with pytest.raises(ValueError, match="resample=2; vlmx supports 1 and 3"):
        ps.check_processor_flags({"resample": 2}, resample=(ps.LANCZOS, ps.BICUBIC))
    assert ps.first_set(None, 0, 5) == 0 and ps.first_set(None, None) is None
    assert ps.positive_int(3, "k") == 3
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match="mm_processor_kwargs k=.* must be a positive int"):
            ps.positive_int(bad, "k")
    assert ps.longest_edge_of({"longest_edge": 64}, "size") == 64
    with pytest.raises(ValueError, match=r"size=\{'height': 3\} is not supported"):
        ps.longest_edge_of({"height": 3}, "size")
    with pytest.raises(ValueError, match=r"size\['longest_edge'\]=0 must be a positive int"):
        ps.longest_edge_of({"longest_edge": 0}, "size")


def test_resize_taps_are_reused_and_bounded():
    taps = ResizeTaps(max_entries=2)
    images = torch.randint(0, 256, (1, 3, 9, 13), dtype=torch.uint8)
    expected = resize_uint8_fixed_point(images, 5, 7, "bicubic")
    assert torch.equal(resize_uint8_fixed_point(images, 5, 7, "bicubic", taps), expected)
    assert len(taps) == 2  # one per axis
    first = taps.get(13, 7, "bicubic", torch.device("cpu"))
    assert taps.get(13, 7, "bicubic", torch.device("cpu")) is first  # built once
    taps.get(20, 4, "lanczos", torch.device("cpu"))
    assert len(taps) == 2  # the least recently used went out
    assert taps.get(13, 7, "bicubic", torch.device("cpu")) is first


def test_preprocess_in_groups_batches_by_key_and_keeps_order():
    sizes = [(2, 3), (4, 4), (2, 3), (1, 5), (4, 4)]
    images = [torch.full((3, h, w), i, dtype=torch.uint8) for i, (h, w) in enumerate(sizes)]
    batches: list[tuple[tuple, int]] = []

    def run(key: tuple, batch: torch.Tensor) -> list[int]:
        batches.append((key, batch.shape[0]))
        return [int(x[0, 0, 0]) for x in batch]

    out = processing.preprocess_in_groups(images, lambda im: tuple(im.shape[-2:]), "cpu", run)
    assert out == list(range(len(images)))
    assert batches == [((2, 3), 2), ((4, 4), 2), ((1, 5), 1)]


def test_check_placeholder_count_says_what_to_put_in_the_prompt():
    from vlmx.models.processing import check_placeholder_count

    check_placeholder_count(2, 2, "<image>")
    with pytest.raises(ValueError) as e:
        check_placeholder_count(
            1, 3, "<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>"
        )
    assert str(e.value) == (
        "prompt has 1 image placeholders (<|image_pad|>) but 3 images were given; put one "
        "<|vision_start|><|image_pad|><|vision_end|> in the prompt per image (llm.chat writes "
        "them for you)"
    )
