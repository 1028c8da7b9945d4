"""Idefics3 / SmolVLM processor: images -> tiles on the model's device, placeholder layout.

Matches transformers 5.24 `Idefics3ImageProcessor` (= `SmolVLMImageProcessor`, the default
torchvision backend) and the image part of `Idefics3Processor` / `SmolVLMProcessor`:

```
uint8 [3, H, W]
  --resize, longest edge -> size["longest_edge"] (up or down; even short side)-->  [3, h1, w1]
  --resize, both sides up to multiples of M = max_image_size["longest_edge"]-->    [3, h2, w2]
  --cut into (h2/M) x (w2/M) tiles of M x M, row-major; + the whole image resized to M x M
  --.float(), (x - mean * 255) / (std * 255)-->  pixel_values [num_tiles + 1, 3, M, M]
```

Without image splitting (or when h2 = w2 = M) the image is one M x M frame. Every resize is
LANCZOS (config `resample: 1`) on uint8, with torch's CPU fixed-point kernel, which
`vlmx.multimodal.resize.resize_uint8` reproduces bit for bit on any device (torch has no
LANCZOS on CUDA, where HF falls back to bicubic; we stay equal to HF's default, the CPU).

Placeholder layout of one image (`L` = image_seq_len `<image>` tokens per frame):

```
split into 2x2:  <fake><row_1_col_1><image>*L<fake><row_1_col_2><image>*L "\n"
                 <fake><row_2_col_1><image>*L<fake><row_2_col_2><image>*L "\n\n"
                 <fake><global-img><image>*L<fake>
not split:       <fake><global-img><image>*L<fake>
```

The whole layout is one `PlaceholderRange`; `data["layout_ids"]` holds its token ids, and the
model fills the `<image>` rows with image features and the others with their token embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from vlmx.models.processing import (
    Expansion,
    ImageProcessorBase,
    preprocess_in_groups,
)
from vlmx.models.processor_settings import (
    BICUBIC,
    LANCZOS,
    check_processor_flags,
    longest_edge_of,
    reject_unknown_kwargs,
    require_token_id,
    special_token_id,
)

SUPPORTED_KWARGS = ("size", "max_image_size", "do_image_splitting", "do_resize")
MAX_IMAGE_SIZE = 4096  # HF's cap on the longest edge after the first resize


@dataclass(frozen=True, slots=True)
class ImageSettings:
    """Image-processor settings; the defaults are Idefics3ImageProcessor's class defaults."""

    longest_edge: int = 4 * 364  # size["longest_edge"]
    max_image_size: int = 364  # max_image_size["longest_edge"], the side of a tile
    do_image_splitting: bool = True
    do_resize: bool = True
    resample: int = LANCZOS
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_STD
    rescale_factor: float = 1 / 255


def apply_kwargs(settings: ImageSettings, kwargs: dict) -> ImageSettings:
    """`settings` updated by `mm_processor_kwargs` (HF's image-processor argument forms)."""
    reject_unknown_kwargs(
        kwargs,
        SUPPORTED_KWARGS,
        "Idefics3 / SmolVLM",
        "size={'longest_edge': int}, max_image_size={'longest_edge': int}, "
        "do_image_splitting=bool, do_resize=bool",
    )
    changes: dict = {}
    if "size" in kwargs:
        changes["longest_edge"] = longest_edge_of(kwargs["size"], "size")
    if "max_image_size" in kwargs:
        changes["max_image_size"] = longest_edge_of(kwargs["max_image_size"], "max_image_size")
    for key in ("do_image_splitting", "do_resize"):
        if key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise ValueError(f"mm_processor_kwargs {key}={kwargs[key]!r} must be True or False")
            changes[key] = kwargs[key]
    return replace(settings, **changes) if changes else settings


def resolve_image_settings(raw: dict) -> ImageSettings:
    """Class defaults < the checkpoint's image-processor config."""
    # do_resize=false is honoured; resample 1 = LANCZOS, 3 = BICUBIC
    check_processor_flags(raw, ("do_rescale", "do_normalize"), resample=(LANCZOS, BICUBIC))
    resample = raw.get("resample") or LANCZOS
    default = ImageSettings()
    settings = ImageSettings(
        do_resize=raw.get("do_resize", True) is not False,
        do_image_splitting=raw.get("do_image_splitting", default.do_image_splitting),
        resample=resample,
        image_mean=tuple(raw.get("image_mean") or default.image_mean),
        image_std=tuple(raw.get("image_std") or default.image_std),
        rescale_factor=raw.get("rescale_factor") or default.rescale_factor,
    )
    file_kwargs = {k: raw[k] for k in ("size", "max_image_size") if raw.get(k)}
    return apply_kwargs(settings, file_kwargs)


def resized_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """HF `get_resize_output_image_size`: longest edge -> `longest_edge` (also upscaling), the
    other side by the aspect ratio, rounded up to even; then capped at MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def tiled_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """HF `resize_for_vision_encoder`: both sides up to multiples of `tile`, the short one from
    the long one by the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """What one image becomes: the sizes it is resized to and its grid of tiles."""

    resized: tuple[int, int]  # after the longest-edge resize
    tiled: tuple[int, int]  # after the resize to multiples of the tile (== resized if unused)
    rows: int  # tiles per column (0: not split, one M x M frame)
    cols: int


def plan_image(height: int, width: int, s: ImageSettings) -> ImagePlan:
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    resized = resized_size(height, width, s.longest_edge) if s.do_resize else (height, width)
    m = s.max_image_size
    if not s.do_image_splitting:
        return ImagePlan(resized, (m, m), 0, 0)
    tiled = tiled_size(*resized, m)
    if min(tiled) <= 0:
        raise ValueError(
            f"image of {height}x{width} pixels is too elongated to tile; crop or pad it first"
        )
    if tiled[0] > m or tiled[1] > m:
        return ImagePlan(resized, tiled, tiled[0] // m, tiled[1] // m)
    return ImagePlan(resized, tiled, 0, 0)


class Idefics3Processor(ImageProcessorBase[torch.Tensor]):
    """The processor of Idefics3 and SmolVLM (see `vlmx.models.interface`).

    A prompt holds one `<image>` per image (the form vLLM's example and `llm.chat` write), or
    the full layout already (ids from HF's processor); each becomes the layout drawn above.
    """

    shrink_images_hint = "mm_processor_kwargs={'size': {'longest_edge': ...}}"
    placeholder_token = "<image>"
    video_token = "<video>"

    def configure(self, raw: dict, processor: dict) -> None:
        hf_config = self.hf_config
        self.settings = apply_kwargs(resolve_image_settings(raw), self.engine_kwargs)
        vision = hf_config.vision_config
        self.patch_size: int = vision.patch_size
        self.scale_factor: int = hf_config.scale_factor
        model_seq_len = (vision.image_size // vision.patch_size) ** 2 // self.scale_factor**2
        self.image_seq_len: int = processor.get("image_seq_len", model_seq_len)
        if self.image_seq_len != model_seq_len:
            raise ValueError(
                f"processor config image_seq_len={self.image_seq_len} does not match the model's "
                f"{model_seq_len} ((image_size / patch_size)**2 / scale_factor**2)"
            )
        self._check_tile(self.settings)

        tokenizer = self.tokenizer
        self.image_token_id = hf_config.image_token_id
        self.fake_token_id = require_token_id(tokenizer, "<fake_token_around_image>", "Idefics3")
        self.global_token_id = require_token_id(tokenizer, "<global-img>", "Idefics3")
        self.video_token_id = special_token_id(tokenizer, "<video>")
        # NOTE: every piece between two special tokens is tokenized on its own, as HF does.
        self._newline = tokenizer.encode("\n", add_special_tokens=False)
        self._double_newline = tokenizer.encode("\n\n", add_special_tokens=False)
        self._tile_tags: dict[tuple[int, int], list[int]] = {}  # (row, col) -> ids of its tag
        s = self.settings
        self.use_normalization(s.image_mean, s.image_std, s.rescale_factor)

    def _check_tile(self, s: ImageSettings) -> None:
        side = s.max_image_size // self.patch_size
        if s.max_image_size % self.patch_size or side**2 // self.scale_factor**2 != (
            self.image_seq_len
        ):
            raise ValueError(
                f"max_image_size={{'longest_edge': {s.max_image_size}}} gives tiles of "
                f"{side}x{side} patches, but the model takes {self.image_seq_len} tokens per tile "
                f"({self.scale_factor}x pixel shuffle); leave max_image_size at the checkpoint's "
                "value"
            )

    def prompt_settings(self, mm_processor_kwargs: dict) -> ImageSettings:
        """The engine-wide settings, updated by one prompt's `mm_processor_kwargs`."""
        s = apply_kwargs(self.settings, mm_processor_kwargs)
        self._check_tile(s)
        return s

    def layout_ids(self, rows: int, cols: int) -> list[int]:
        """Token ids of one image's placeholder layout (see the module docstring)."""
        frame = [self.image_token_id] * self.image_seq_len
        ids: list[int] = []
        for r in range(1, rows + 1):
            for c in range(1, cols + 1):
                tag = self._tile_tags.get((r, c))
                if tag is None:  # one special token up to row / column 6, plain text past it
                    tag = self.tokenizer.encode(f"<row_{r}_col_{c}>", add_special_tokens=False)
                    self._tile_tags[(r, c)] = tag
                ids += [self.fake_token_id, *tag, *frame]
            ids += self._newline if r < rows else self._double_newline
        return ids + [self.fake_token_id, self.global_token_id, *frame, self.fake_token_id]

    def preprocess(self, images: list[torch.Tensor], s: ImageSettings) -> list[torch.Tensor]:
        """uint8 [3, H, W] images -> per image pixel_values [num_frames, 3, M, M] (model dtype,
        on the device): tiles row-major, then the global view. No cache. Images of one input
        size are resized and normalized as one batch."""
        kernel = "lanczos" if s.resample == LANCZOS else "bicubic"
        m = s.max_image_size

        def run(size: tuple[int, int], x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] uint8
            plan = plan_image(*size, s)
            if plan.resized != size:
                x = self.resize(x, *plan.resized, kernel)
            if plan.tiled != plan.resized:
                x = self.resize(x, *plan.tiled, kernel)  # [B, 3, h2, w2] uint8
            if plan.rows:
                b = x.shape[0]
                tiles = x.reshape(b, 3, plan.rows, m, plan.cols, m).permute(0, 2, 4, 1, 3, 5)
                tiles = tiles.reshape(b, plan.rows * plan.cols, 3, m, m)
                whole = self.resize(x, m, m, kernel)[:, None]  # [B, 1, 3, M, M]
                x = torch.cat([tiles, whole], dim=1)  # [B, rows * cols + 1, 3, M, M]
            else:
                x = x[:, None]  # [B, 1, 3, M, M]
            return self.normalize(x).to(self.dtype)

        return preprocess_in_groups(images, lambda im: tuple(im.shape[-2:]), self.device, run)

    def expand(self, image: torch.Tensor, pixels: torch.Tensor, s: ImageSettings) -> Expansion:
        plan = plan_image(*image.shape[-2:], s)
        layout = self.layout_ids(plan.rows, plan.cols)
        data = {
            "pixel_values": pixels,  # [num_frames, 3, M, M]
            "layout_ids": torch.tensor(layout, dtype=torch.int64),  # [len(layout)] CPU
        }
        return Expansion(layout, 0, len(layout), data)

    def placeholder_spans(
        self, ids: list[int], expansions: list[Expansion]
    ) -> list[tuple[int, int]]:
        """Per image, the next `<image>`: a lone one, or the frame of an expanded layout (HF's
        ids), which must then be exactly this image's layout."""
        spans = []
        cursor = 0
        for image_idx, e in enumerate(expansions):
            layout = e.token_ids
            start = ids.index(self.image_token_id, cursor)
            if not self._in_layout(ids, start):  # one <image> per image
                spans.append((start, start + 1))
                cursor = start + 1
                continue
            begin = start - layout.index(self.image_token_id)
            num_tiles = layout.count(self.fake_token_id) - 2  # one per tile, two around the global
            if begin < cursor or ids[begin : begin + len(layout)] != layout:
                raise ValueError(
                    f"image {image_idx}: the prompt holds an expanded image layout that does "
                    f"not match this image at these settings ({num_tiles} tiles of "
                    f"{self.image_seq_len} tokens + a global view); pass one <image> per image "
                    "and let vlmx expand it"
                )
            spans.append((begin, begin + len(layout)))
            cursor = begin + len(layout)
        return spans

    def _in_layout(self, ids: list[int], idx: int) -> bool:
        """Whether the <image> at `idx` opens a frame of an expanded layout: a run of exactly
        image_seq_len <image> tokens shortly after a `<fake_token_around_image>` (tile tags past
        row / column 6 are several plain tokens, hence the short look-back)."""
        if idx and ids[idx - 1] == self.image_token_id:
            return False
        end = idx + self.image_seq_len
        if ids[idx:end] != [self.image_token_id] * self.image_seq_len or (
            end < len(ids) and ids[end] == self.image_token_id
        ):
            return False
        for token in reversed(ids[max(0, idx - 16) : idx]):
            if token == self.fake_token_id:
                return True
            if token == self.image_token_id:
                return False
        return False

    def count_placeholders(self, ids: list[int]) -> int:
        """Lone-form <image> tokens (adjacent ones count one each, as in HF's text) plus expanded
        layouts (one `<global-img>` frame each)."""
        count = 0
        i = 0
        while i < len(ids):
            if ids[i] != self.image_token_id:
                i += 1
            elif self._in_layout(ids, i):
                count += ids[i - 1] == self.global_token_id
                i += self.image_seq_len
            else:
                count += 1
                i += 1
        return count
