"""Qwen2-VL / Qwen2.5-VL processor: images -> patches on the model's device, placeholders, M-RoPE.

Matches transformers 5.24 `Qwen2VLImageProcessor` (the default, torchvision backend), which both
families share, op for op:

```
uint8 [3, H, W] --tvF.resize(bicubic, antialias, on uint8)--> uint8 [3, h, w]  (h, w: smart_resize)
  --.float(), (x - mean * 255) / (std * 255)--> float32 [3, h, w]  (rescale fused in normalize)
  --patchify--> [grid_h * grid_w, 3 * temporal_patch * patch * patch]  (grid_h = h / patch)
```

and `Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index` for the positions of a prompt
with still images (Qwen2.5-VL's time interval applies to videos only).

HF runs it on the CPU by default, where torchvision resizes uint8 with a fixed-point kernel (PIL's
algorithm, int16 weights); on CUDA torchvision resizes in float32 and rounds, which differs by up
to ~17 levels at sharp edges. `resize_uint8_bicubic_aa` reproduces the CPU kernel bit for bit on
any device, so the output equals HF's default whatever the device.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as tvF

from vlmx.config import ModelConfig
from vlmx.multimodal.hashing import hash_image, hash_with_settings
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange, ProcessedPrompt

logger = logging.getLogger(__name__)

SUPPORTED_KWARGS = ("min_pixels", "max_pixels")
MAX_ASPECT_RATIO = 200
DEFAULT_CACHE_BYTES = 512 * 1024**2

_BICUBIC = 3  # PIL's resampling id, as configs store it


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """Image-processor settings; the defaults are Qwen2VLImageProcessor's class defaults."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)  # OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The size Qwen2-VL resizes a `height` x `width` image to (HF's `smart_resize` rules).

    Both sides become multiples of `factor` (= patch_size * merge_size), the area is brought into
    [min_pixels, max_pixels] by a common scale, and the aspect ratio is kept as rounding allows.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {height}x{width} pixels has aspect ratio "
            f"{max(height, width) / min(height, width):.1f}; Qwen2-VL accepts at most "
            f"{MAX_ASPECT_RATIO}. Crop or pad the image first."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def read_image_settings(model_path: str) -> dict:
    """The raw image-processor dict of a checkpoint, found as transformers finds it.

    `processor_config.json` with an "image_processor" key (what transformers 5 `save_pretrained`
    writes) wins over `preprocessor_config.json` (the layout of checkpoints on the hub).
    """
    nested = os.path.join(model_path, "processor_config.json")
    if os.path.isfile(nested):
        with open(nested) as f:
            processor = json.load(f)
        if "image_processor" in processor:
            return processor["image_processor"]
    legacy = os.path.join(model_path, "preprocessor_config.json")
    if os.path.isfile(legacy):
        with open(legacy) as f:
            return json.load(f)
    logger.warning(
        "%s has no processor_config.json or preprocessor_config.json; using "
        "Qwen2VLImageProcessor's defaults",
        model_path,
    )
    return {}


def _first(*values):
    return next((v for v in values if v is not None), None)


def resolve_image_settings(raw: dict, mm_processor_kwargs: dict) -> ImageSettings:
    """Defaults < checkpoint file < engine-wide `mm_processor_kwargs`.

    In the file, top-level min_pixels / max_pixels win over `size` (as in HF's `__init__`).
    """
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if raw.get(key) is False:
            raise ValueError(f"image processor config sets {key}=false; vlmx supports only true")
    size = raw.get("size") or {}
    min_pixels = _first(raw.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"))
    max_pixels = _first(raw.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"))
    if _first(raw.get("resample"), _BICUBIC) != _BICUBIC:
        raise ValueError(f"image processor config has resample={raw['resample']}; vlmx supports 3")
    default = ImageSettings()
    kwargs = check_kwargs(
        {
            "min_pixels": _first(min_pixels, default.min_pixels),
            "max_pixels": _first(max_pixels, default.max_pixels),
        },
        mm_processor_kwargs,
    )
    for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
        kwargs[key] = _first(raw.get(key), getattr(default, key))
    for key in ("image_mean", "image_std"):
        kwargs[key] = tuple(_first(raw.get(key), getattr(default, key)))
    return ImageSettings(**kwargs)


def check_kwargs(base: dict, overrides: dict) -> dict:
    """`base` (min_pixels, max_pixels) updated by `overrides`, validated."""
    unknown = sorted(set(overrides) - set(SUPPORTED_KWARGS))
    if unknown:
        raise ValueError(
            f"unknown mm_processor_kwargs {unknown} for Qwen2-VL; supported: "
            f"{', '.join(SUPPORTED_KWARGS)}"
        )
    merged = {**base, **overrides}
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"mm_processor_kwargs {key}={value!r} must be a positive int")
    if merged["min_pixels"] > merged["max_pixels"]:
        raise ValueError(
            f"mm_processor_kwargs min_pixels={merged['min_pixels']} is larger than "
            f"max_pixels={merged['max_pixels']}"
        )
    return merged


def patchify(images: torch.Tensor, patch: int, merge: int, temporal_patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, grid_h * grid_w, C * temporal_patch * patch * patch].

    Patches come in merge-window order (the vision encoder merges each merge x merge window of
    neighbours into one token), and within a patch the values in (C, T, py, px) order, the still
    frame repeated along T:

    ```
    grid 4x4, merge 2:   0  1 | 4  5      patch index of each grid cell
                         2  3 | 6  7
                        ------+------
                         8  9 | 12 13
                        10 11 | 14 15
    ```
    """
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, gh/m, gw/m, m, m, C, p, p]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch, -1, -1)  # [.., C, T, p, p]
    return x.reshape(b, gh * gw, c * temporal_patch * patch * patch)


def _keys_cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic with a = -0.5 (PIL's), in torch's evaluation order (`HelperInterpCubic`)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


@functools.lru_cache(maxsize=256)
def _aa_taps(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fixed-point antialiased bicubic taps of one axis, as torch's CPU uint8 kernel computes them
    (`_compute_indices_min_size_weights_aa`, `_compute_index_ranges_int16_weights`).

    Returns source indexes [out, taps] int64, int16-range weights [out, taps] int32 (0 past each
    output's window) and their precision p in bits: out = (sum(src * w) + 2**(p-1)) >> p.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    num_taps = math.ceil(support) * 2 + 1
    center = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)  # [out]
    first = (center - support + 0.5).trunc().clamp(min=0)  # [out] (C++ casts truncate)
    width = ((center + support + 0.5).trunc().clamp(max=in_size) - first).clamp(0, num_taps)
    tap = torch.arange(num_taps, dtype=torch.float64)  # [taps]
    weights = _keys_cubic((tap + first[:, None] - center[:, None] + 0.5) * inv_scale)
    weights = torch.where(tap < width[:, None], weights, 0.0)  # [out, taps] float64
    total = torch.zeros(out_size, dtype=torch.float64)
    for j in range(num_taps):  # NOTE: summed in tap order, as the C++ loop does, for equal bits
        total = total + weights[:, j]
    weights = torch.where(total[:, None] != 0, weights / total[:, None], weights)
    wt_max = weights.max().item()
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = torch.where(scaled < 0, (scaled - 0.5).trunc(), (scaled + 0.5).trunc())
    index = (first[:, None] + tap).clamp(max=in_size - 1).long()  # [out, taps]
    return index.to(device), fixed.to(device, torch.int32), precision


def _resample_axis(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    """One fixed-point pass along `dim` of an int32 [B, C, H, W] tensor holding 0..255."""
    index, weights, precision = _aa_taps(x.shape[dim], out_size, x.device)
    shape = [1, 1, 1, 1]
    shape[dim] = out_size
    acc = torch.full((), 1 << (precision - 1), dtype=torch.int32, device=x.device)
    for j in range(index.shape[1]):  # NOTE: |acc| < 2**31, as sum(|w|) < 1.3 * 2**22
        acc = acc + x.index_select(dim, index[:, j]) * weights[:, j].view(shape)
    return acc.bitwise_right_shift_(precision).clamp_(0, 255)


def resize_uint8_bicubic_aa(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [B, C, H, W] -> [B, C, height, width], on any device equal to what
    `tvF.resize(images, [height, width], BICUBIC, antialias=True)` gives on the CPU."""
    if images.device.type == "cpu":
        return tvF.resize(images, [height, width], tvF.InterpolationMode.BICUBIC, antialias=True)
    return _resize_fixed_point(images, height, width)


def _resize_fixed_point(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torch's CPU uint8 kernel in tensor ops: a width pass, then a height pass, each to uint8."""
    x = images.to(torch.int32)  # [B, C, H, W]
    if width != x.shape[-1]:
        x = _resample_axis(x, 3, width)
    if height != x.shape[-2]:
        x = _resample_axis(x, 2, height)
    return x.to(torch.uint8)


class _ByteLRU:
    """Processor outputs by mm_hash, least recently used out first, bounded by tensor bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if key in self._entries or size > self.capacity_bytes:
            return
        while self.num_bytes + size > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= sum(t.numel() * t.element_size() for t in old)
        self._entries[key] = entry
        self.num_bytes += size


class Qwen2VLProcessor:
    """The processor of Qwen2-VL and Qwen2.5-VL (see `vlmx.models.interface`).

    ```
    prompt ids:  t t <vs> <|image_pad|> <ve> t       one pad per image (or already expanded)
    expanded:    t t <vs> P P P P P P   <ve> t       grid_t * grid_h * grid_w / merge**2 pads
    positions:   0 1  2   3 3 3 4 4 4    6   7       row axis shown: image of 2x3 merged tokens
    ```
    """

    # How a user makes this family's images cost fewer tokens (quoted in error messages).
    shrink_images_hint = "mm_processor_kwargs={'max_pixels': ...}"

    def __init__(
        self,
        model_config: ModelConfig,
        device: torch.device,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        hf_config = model_config.hf_config
        self.device = torch.device(device)
        self.dtype = model_config.dtype
        self.settings = resolve_image_settings(
            read_image_settings(model_config.model_path), model_config.mm_processor_kwargs or {}
        )
        vision = hf_config.vision_config
        s = self.settings
        ours = (s.patch_size, s.temporal_patch_size, s.merge_size)
        theirs = (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
        if ours != theirs:
            raise ValueError(
                f"image processor (patch_size, temporal_patch_size, merge_size)={ours} does not "
                f"match the model's vision_config {theirs}; fix the checkpoint's processor config"
            )
        self.image_token_id: int = hf_config.image_token_id
        self.video_token_id: int | None = getattr(hf_config, "video_token_id", None)
        # NOTE: same ops as HF's _fuse_mean_std_and_rescale_factor, so the float32 constants agree.
        scale = 1.0 / s.rescale_factor
        self._mean = (torch.tensor(s.image_mean) * scale).view(-1, 1, 1).to(self.device)  # [C,1,1]
        self._std = (torch.tensor(s.image_std) * scale).view(-1, 1, 1).to(self.device)  # [C,1,1]
        self._merge = s.merge_size
        self._factor = s.patch_size * s.merge_size  # both sides of a resized image divide by it
        self.cache = _ByteLRU(cache_bytes)

    def image_settings(self, mm_processor_kwargs: dict) -> dict:
        """min_pixels / max_pixels for one prompt: the engine-wide values, updated by its kwargs."""
        base = {"min_pixels": self.settings.min_pixels, "max_pixels": self.settings.max_pixels}
        return check_kwargs(base, mm_processor_kwargs or {})

    def num_image_tokens(self, height: int, width: int, mm_processor_kwargs: dict) -> int:
        """Placeholder tokens an image of `height` x `width` pixels expands to."""
        kw = self.image_settings(mm_processor_kwargs)
        h, w = smart_resize(height, width, self._factor, kw["min_pixels"], kw["max_pixels"])
        return (h // self.settings.patch_size) * (w // self.settings.patch_size) // self._merge**2

    def preprocess(
        self, images: list[torch.Tensor], min_pixels: int, max_pixels: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 [3, H, W] images -> per image (pixel_values, image_grid_thw), no cache.

        pixel_values: [grid_h * grid_w, 3 * temporal_patch * patch * patch] model dtype, on device;
        image_grid_thw: [3] int64 on the CPU, (1, grid_h, grid_w).
        Images that share (input size, target size) are resized and normalized in one batch.
        """
        s = self.settings
        groups: dict[tuple[int, int, int, int], list[int]] = {}
        for i, image in enumerate(images):
            height, width = image.shape[-2:]
            target = smart_resize(height, width, self._factor, min_pixels, max_pixels)
            groups.setdefault((height, width, *target), []).append(i)
        out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(images)  # type: ignore[list-item]
        for (_, _, height, width), idxs in groups.items():
            batch = torch.stack([images[i].to(self.device) for i in idxs])  # [B, 3, H, W] uint8
            batch = resize_uint8_bicubic_aa(batch, height, width)  # [B, 3, h, w] uint8
            pixels = (batch.to(torch.float32) - self._mean).div_(self._std)  # [B, 3, h, w] f32
            patches = patchify(pixels, s.patch_size, s.merge_size, s.temporal_patch_size)
            patches = patches.to(self.dtype)  # [B, gh * gw, 3 * T * p * p]
            grid_thw = torch.tensor([1, height // s.patch_size, width // s.patch_size])  # [3]
            for j, i in enumerate(idxs):
                out[i] = (patches[j], grid_thw)
        return out

    def process(
        self,
        prompt_token_ids: list[int],
        images: list[torch.Tensor],
        mm_processor_kwargs: dict,
    ) -> ProcessedPrompt:
        for image in images:
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"images must be uint8 [3, H, W] tensors, got {image.dtype} {list(image.shape)}"
                )
        if self.video_token_id is not None and self.video_token_id in prompt_token_ids:
            raise ValueError(
                "prompt holds video placeholders (<|video_pad|>); vlmx takes images only"
            )
        kw = self.image_settings(mm_processor_kwargs)
        runs = self._find_placeholder_runs(prompt_token_ids)
        if len(runs) != len(images):
            raise ValueError(
                f"prompt has {len(runs)} image placeholders (<|image_pad|>) but {len(images)} "
                f"images were given; put one <|vision_start|><|image_pad|><|vision_end|> in the "
                f"prompt per image (llm.chat writes them for you)"
            )
        mm_hashes = [hash_with_settings(hash_image(image), kw) for image in images]
        outputs = self._cached_preprocess(images, mm_hashes, kw)

        token_ids: list[int] = []
        features: list[MMFeature] = []
        positions: list[torch.Tensor] = []  # [3, n] int64 pieces
        cursor = 0  # next unread index of prompt_token_ids
        next_pos = 0  # next M-RoPE position
        for image_idx, ((start, end), mm_hash, (pixel_values, grid_thw)) in enumerate(
            zip(runs, mm_hashes, outputs, strict=True)
        ):
            _, grid_h, grid_w = (int(x) for x in grid_thw)
            llm_h, llm_w = grid_h // self._merge, grid_w // self._merge
            num_tokens = llm_h * llm_w
            if end - start not in (1, num_tokens):
                raise ValueError(
                    f"image {image_idx} needs 1 placeholder token (<|image_pad|>) or exactly "
                    f"{num_tokens}, but the prompt has a run of {end - start}"
                )
            text = prompt_token_ids[cursor:start]
            token_ids += text
            positions.append(torch.arange(len(text)).expand(3, -1) + next_pos)
            next_pos += len(text)
            placeholder = PlaceholderRange(offset=len(token_ids), length=num_tokens)
            token_ids += [self.image_token_id] * num_tokens
            rows = torch.arange(llm_h).repeat_interleave(llm_w)  # [num_tokens] row of each token
            cols = torch.arange(llm_w).repeat(llm_h)  # [num_tokens] column of each token
            positions.append(torch.stack([torch.zeros_like(rows), rows, cols]) + next_pos)
            next_pos += max(llm_h, llm_w)
            data = {"pixel_values": pixel_values, "image_grid_thw": grid_thw}
            features.append(MMFeature(mm_hash=mm_hash, placeholder=placeholder, data=data))
            cursor = end
        text = prompt_token_ids[cursor:]
        token_ids += text
        positions.append(torch.arange(len(text)).expand(3, -1) + next_pos)
        next_pos += len(text)

        mrope_positions = torch.cat(positions, dim=1)  # [3, num_tokens] int64
        # NOTE: positions never decrease along the prompt, so next_pos == max position + 1, and
        # this equals HF's `llm_positions.max() + 1 - len(input_ids)`.
        return ProcessedPrompt(
            prompt_token_ids=token_ids,
            mm_features=features,
            mrope_positions=mrope_positions,
            mrope_position_delta=next_pos - len(token_ids),
        )

    def _cached_preprocess(
        self, images: list[torch.Tensor], mm_hashes: list[str], kw: dict
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Processor outputs per image; only images whose hash is in no cache entry are computed."""
        found = {h: entry for h in mm_hashes if (entry := self.cache.get(h)) is not None}
        missing = {h: image for h, image in zip(mm_hashes, images, strict=True) if h not in found}
        if missing:
            computed = self.preprocess(list(missing.values()), kw["min_pixels"], kw["max_pixels"])
            for mm_hash, entry in zip(missing, computed, strict=True):
                found[mm_hash] = entry
                self.cache.put(mm_hash, entry)
        return [found[h] for h in mm_hashes]

    def _find_placeholder_runs(self, prompt_token_ids: list[int]) -> list[tuple[int, int]]:
        """(start, end) of each run of consecutive image tokens in the prompt."""
        is_image = torch.tensor(prompt_token_ids, dtype=torch.int64) == self.image_token_id  # [L]
        edges = torch.nn.functional.pad(is_image.to(torch.int8), (1, 1)).diff()  # [L + 1]
        starts = (edges == 1).nonzero().flatten().tolist()
        ends = (edges == -1).nonzero().flatten().tolist()
        return list(zip(starts, ends, strict=True))
