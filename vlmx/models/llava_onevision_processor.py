"""LLaVA-OneVision processor: AnyRes tiling on the model's device.

Matches transformers 5.24 `LlavaOnevisionProcessor` with `LlavaOnevisionImageProcessor`
(torchvision backend), op for op. How an image is processed depends on the prompt it is in, as
in HF (its `batch_num_images`, one prompt's images given as one list):

```
a prompt's only image, uint8 [3, H, W]  (AnyRes)
  --best_resolution over image_grid_pinpoints--> canvas (rows * S, cols * S)
  --resize(bicubic, antialias, uint8) to fit, aspect kept; pad with 0 to the canvas, centred
  --cut into rows * cols S x S tiles, row-major; the base: the image resized to S x S
  --(x - mean * 255) / (std * 255)--> pixel_values [1 + rows * cols, 3, S, S]  (base first)
  tokens: side**2 (base) + oh * (ow + 1)   (the unpadded, maybe scaled grid, a newline per row)

each image of a prompt with several
  --pad to a square with the mean colour (int(mean * 255)), centred; resize to S x S
  --> pixel_values [1, 3, S, S];  tokens: side**2 + 1 (its features and one newline)
```

`side**2` is the processor's `num_image_tokens` (729 for 384 px SigLIP tiles); with
`vision_feature_select_strategy="default"` each image has one token fewer (HF tiles no image
then: only several-image prompts are accepted). The model reads `data["image_size"]` to lay
out the tile features as the processor counted them (`layers/anyres.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vlmx.layers.anyres import AnyResLayout, anyres_layout, best_resolution, fit_size, max_tiles_of
from vlmx.models.processing import (
    Expansion,
    ImageProcessorBase,
    check_placeholder_count,
    find_token_runs,
    preprocess_in_groups,
)
from vlmx.models.processor_settings import (
    BICUBIC,
    check_processor_flags,
    first_set,
    require_token_id,
    special_token_id,
)
from vlmx.multimodal.inputs import ProcessedPrompt

_MULTI_IMAGE = "multi_image"  # the prompt-settings key `process` sets (no user kwarg)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the image processor's class defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, slots=True)
class AnyResSettings:
    """The processor's settings (checkpoint files, checked against the model config), and
    whether the prompt has several images (then no image is tiled)."""

    tile_size: int  # S: tiles and the base are S x S pixels
    side: int  # features per tile side (sqrt(num_image_tokens))
    pinpoints: tuple[tuple[int, int], ...]  # canvases (height, width), multiples of S
    max_tiles: int  # N of vision_aspect_ratio="anyres_max_N"
    drop_first: bool  # vision_feature_select_strategy == "default"
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    multi_image: bool = False

    @property
    def pad_color(self) -> tuple[int, ...]:
        """The square padding of several-image prompts (HF: `int(mean * 255)` per channel)."""
        return tuple(int(m * 255) for m in self.image_mean)


def layout_of(height: int, width: int, s: AnyResSettings) -> AnyResLayout:
    return anyres_layout(height, width, list(s.pinpoints), s.tile_size, s.side, s.max_tiles)


def num_image_tokens_of(height: int, width: int, s: AnyResSettings) -> int:
    """The `<image>` tokens an image of height x width pixels becomes (HF
    `LlavaOnevisionProcessor.replace_image_token`)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    base = s.side**2 - (1 if s.drop_first else 0)
    if s.multi_image:
        return base + 1
    return base + layout_of(height, width, s).num_grid_features


class LlavaOnevisionProcessor(ImageProcessorBase[tuple[torch.Tensor, torch.Tensor]]):
    """The processor of LLaVA-OneVision checkpoints (`vlmx.models.interface.Processor`).

    ```
    prompt:      t t <image> t                one <image> per image (the chat template's form)
    expanded:    t t <image> * n t            n = num_image_tokens_of(...), all image features
    ```
    A prompt that is already expanded (exactly n `<image>` tokens per image) is kept as it is.
    """

    shrink_images_hint = (
        "fewer pixels per image (a prompt's only image is tiled over up to the largest of the "
        "config's image_grid_pinpoints; LLaVA-OneVision takes no mm_processor_kwargs)"
    )
    image_processor_name = "LlavaOnevisionImageProcessor"
    placeholder_token = "<image>"
    placeholder_hint = (
        "the chat template writes it for an {'type': 'image'} part; llm.chat does it for you"
    )
    video_token = "<video>"

    def configure(self, image_config: dict, processor: dict) -> None:
        check_no_kwargs(self.engine_kwargs)
        check_processor_flags(image_config, resample=(BICUBIC,))
        cfg = self.hf_config
        vision = cfg.vision_config
        tile = _tile_size(image_config.get("size") or {"height": 384, "width": 384})
        crop = (image_config.get("crop_size") or {}).get("height")
        if image_config.get("do_center_crop") or crop not in (None, tile):
            raise ValueError(
                "image processor config sets do_center_crop or a crop_size other than its size; "
                "vlmx supports neither for LLaVA-OneVision"
            )
        if tile != vision.image_size:
            raise ValueError(
                f"image processor tiles of {tile} px do not match the vision tower's image_size "
                f"{vision.image_size}; fix the checkpoint's processor config"
            )
        side = vision.image_size // vision.patch_size
        num_tokens = int(first_set(processor.get("num_image_tokens"), side**2))
        if num_tokens != side**2:
            raise ValueError(
                f"num_image_tokens {num_tokens} does not match the vision tower's {side**2} "
                "features per tile ((image_size / patch_size) ** 2); fix the processor config"
            )
        pinpoints = image_config.get("image_grid_pinpoints") or cfg.image_grid_pinpoints
        if [list(p) for p in pinpoints] != [list(p) for p in cfg.image_grid_pinpoints]:
            raise ValueError(
                "the image processor's image_grid_pinpoints differ from the model config's; "
                "fix the checkpoint's processor config"
            )
        strategy = cfg.vision_feature_select_strategy
        _check_same(processor, "vision_feature_select_strategy", strategy)
        _check_same(processor, "vision_aspect_ratio", cfg.vision_aspect_ratio)
        self.settings = AnyResSettings(
            tile_size=tile,
            side=side,
            pinpoints=tuple((int(h), int(w)) for h, w in pinpoints),
            max_tiles=max_tiles_of(cfg.vision_aspect_ratio),
            drop_first=strategy == "default",
            image_mean=tuple(first_set(image_config.get("image_mean"), OPENAI_CLIP_MEAN)),
            image_std=tuple(first_set(image_config.get("image_std"), OPENAI_CLIP_STD)),
            rescale_factor=float(first_set(image_config.get("rescale_factor"), 1 / 255)),
        )
        self.image_token_id = require_token_id(self.tokenizer, "<image>", "LLaVA-OneVision")
        if self.image_token_id != cfg.image_token_id:
            raise ValueError(
                f"the tokenizer's <image> token has id {self.image_token_id} but the config's "
                f"image_token_index is {cfg.image_token_id}"
            )
        self.video_token_id = special_token_id(self.tokenizer, "<video>")
        s = self.settings
        self.use_normalization(s.image_mean, s.image_std, s.rescale_factor)

    def count_placeholders(self, prompt_token_ids: list[int]) -> int:
        """Every `<image>` token (the chat template writes a message's images side by side)."""
        return prompt_token_ids.count(self.image_token_id)

    def check_placeholders(self, prompt_token_ids: list[int], num_images: int) -> None:
        """One `<image>` per image, or more (an expanded prompt, checked in
        `placeholder_spans`)."""
        if self.count_placeholders(prompt_token_ids) < num_images:
            self._placeholder_error(prompt_token_ids, num_images)

    def _placeholder_error(self, prompt_token_ids: list[int], num_images: int) -> None:
        check_placeholder_count(
            self.count_placeholders(prompt_token_ids),
            num_images,
            self.placeholder_token,
            hint=f"{self.placeholder_hint}; or each image's exact expansion",
        )

    def placeholder_spans(
        self, prompt_token_ids: list[int], expansions: list[Expansion]
    ) -> list[tuple[int, int]]:
        """Each image's `<image>` token, or (an expanded prompt) its run of exactly its
        embeddings' tokens, in order; runs of images side by side are split.

        ```
        ids:    t I I t        one I per image            -> [1, 2) [2, 3)
        ids:    t I*n1 I*n2 t  expanded, n_i per image    -> [1, 1 + n1) [1 + n1, 1 + n1 + n2)
        ```
        """
        positions = [i for i, t in enumerate(prompt_token_ids) if t == self.image_token_id]
        if len(positions) == len(expansions):
            return [(i, i + 1) for i in positions]
        spans: list[tuple[int, int]] = []
        runs = iter(find_token_runs(prompt_token_ids, self.image_token_id))
        start, end = 0, 0  # the unread part of the current run
        for e in expansions:
            if start == end:
                start, end = next(runs, (0, 0))
            if end - start < e.length:
                break
            spans.append((start, start + e.length))
            start += e.length
        if len(spans) != len(expansions) or start != end or next(runs, None) is not None:
            self._placeholder_error(prompt_token_ids, len(expansions))
        return spans

    def process(
        self, prompt_token_ids: list[int], images: list[torch.Tensor], mm_processor_kwargs: dict
    ) -> ProcessedPrompt:
        """The shared pipeline, with the prompt's settings saying whether it has several images
        (the only per-prompt setting; no user kwargs)."""
        check_no_kwargs(mm_processor_kwargs or {})
        return super().process(prompt_token_ids, images, {_MULTI_IMAGE: len(images) > 1})

    def prompt_settings(self, mm_processor_kwargs: dict) -> AnyResSettings:
        """The settings of a prompt; `mm_processor_kwargs` is the dict `process` builds."""
        s = replace(self.settings, multi_image=bool(mm_processor_kwargs.get(_MULTI_IMAGE)))
        if s.drop_first and not s.multi_image:
            raise ValueError(
                "vision_feature_select_strategy='default' cannot tile a prompt's only image "
                "(transformers refuses it too); send it with another image or use a checkpoint "
                "with vision_feature_select_strategy='full'"
            )
        return s

    def num_image_tokens(
        self, height: int, width: int, mm_processor_kwargs: dict | None = None, num_images: int = 1
    ) -> int:
        """Embeddings (`<image>` tokens) an image of `height` x `width` pixels becomes in a
        prompt of `num_images` images."""
        check_no_kwargs(mm_processor_kwargs or {})
        s = self.prompt_settings({_MULTI_IMAGE: num_images > 1})
        return num_image_tokens_of(height, width, s)

    def preprocess(
        self, images: list[torch.Tensor], s: AnyResSettings
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 [3, H, W] images -> per image (pixel_values [num_tiles, 3, S, S] in the model
        dtype on the device, image_size [2] int64 (H, W) on the CPU), no cache. Images of one
        size are processed in one batch."""
        run = self._square if s.multi_image else self._anyres

        def key(image: torch.Tensor) -> tuple[int, ...]:
            return tuple(image.shape[-2:])

        def finish(group: tuple[int, ...], batch: torch.Tensor) -> list[tuple]:
            pixels = self.normalize(run(batch, s)).to(self.dtype)  # [B, n, 3, S, S]
            return [(p, torch.tensor(group, dtype=torch.int64)) for p in pixels]

        return preprocess_in_groups(images, key, self.device, finish)

    def _anyres(self, batch: torch.Tensor, s: AnyResSettings) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, 1 + rows * cols, 3, S, S]: the base, then the tiles."""
        b, _, height, width = batch.shape
        tile = s.tile_size
        canvas_h, canvas_w = best_resolution(height, width, list(s.pinpoints))
        new_h, new_w = fit_size(height, width, canvas_h, canvas_w)
        resized = self.resize(batch, new_h, new_w, "bicubic")  # [B, 3, new_h, new_w]
        top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2  # HF: divmod, rest after
        canvas = batch.new_zeros(b, 3, canvas_h, canvas_w)
        canvas[:, :, top : top + new_h, left : left + new_w] = resized
        rows, cols = canvas_h // tile, canvas_w // tile
        tiles = canvas.view(b, 3, rows, tile, cols, tile).permute(0, 2, 4, 1, 3, 5)
        tiles = tiles.reshape(b, rows * cols, 3, tile, tile)  # row-major tiles
        base = self.resize(batch, tile, tile, "bicubic")  # [B, 3, S, S]
        return torch.cat([base[:, None], tiles], dim=1)

    def _square(self, batch: torch.Tensor, s: AnyResSettings) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, 1, 3, S, S]: padded to a square with the mean colour,
        centred (HF `pad_to_square`), resized."""
        b, _, height, width = batch.shape
        side = max(height, width)
        if height != width:
            color = torch.tensor(s.pad_color, dtype=torch.uint8, device=batch.device)
            square = color.view(1, 3, 1, 1).expand(b, 3, side, side).clone()
            top, left = (side - height) // 2, (side - width) // 2
            square[:, :, top : top + height, left : left + width] = batch
            batch = square
        return self.resize(batch, s.tile_size, s.tile_size, "bicubic")[:, None]

    def expand(
        self, image: torch.Tensor, output: tuple[torch.Tensor, torch.Tensor], s: AnyResSettings
    ) -> Expansion:
        height, width = image.shape[-2:]
        num_tokens = num_image_tokens_of(height, width, s)
        pixels, image_size = output
        data = {"pixel_values": pixels, "image_size": image_size}
        return Expansion([self.image_token_id] * num_tokens, 0, num_tokens, data)


def check_no_kwargs(kwargs: dict) -> None:
    if kwargs:
        raise ValueError(
            f"unknown mm_processor_kwargs {sorted(kwargs)} for LLaVA-OneVision; it takes none "
            "(its tiling follows the config's image_grid_pinpoints and vision_aspect_ratio)"
        )


def _tile_size(size: dict) -> int:
    """S of the image processor's `size` ({"height": S, "width": S} or {"shortest_edge": S})."""
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    if size.get("height") != size.get("width") or size.get("height") is None:
        raise ValueError(f"image processor size {size} is not square; LLaVA tiles are square")
    return int(size["height"])


def _check_same(processor: dict, key: str, model_value) -> None:
    """A processor-config setting, where given, equals the model config's."""
    value = processor.get(key)
    if value is not None and value != model_value:
        raise ValueError(
            f"the processor config's {key}={value!r} differs from the model config's "
            f"{model_value!r}; fix the checkpoint's processor config"
        )
