"""Gemma 3 processor: fixed-size images (and pan-and-scan crops) on the model's device.

Matches transformers 5.24 `Gemma3ImageProcessor` (torchvision backend) and `Gemma3Processor`:

```
uint8 [3, H, W] --(pan-and-scan: the image, then its crops)--> uint8 [3, h_i, w_i] each
  --tvF.resize(bilinear, antialias, on uint8) to size--> uint8 [3, S, S]
  --.float(), (x - mean * 255) / (std * 255)--> pixel_values [3, S, S]
```

Prompt layout. A prompt holds one `<start_of_image>` per image; HF replaces it in the *text*
and tokenizes the result, so the `\\n\\n` around each image merges with neighbouring text into
whatever tokens the tokenizer makes of it. We do the same on token ids: the text run next to a
replaced placeholder (up to the nearest special token) is decoded, joined with the inserted text
and tokenized again; runs next to nothing inserted keep their ids.

```
no crops:  \\n\\n <boi> SOFT x mm_tokens <eoi> \\n\\n
crops:     Here is the original image \\n\\n<boi>S..S<eoi>\\n\\n and here are some crops to help
           you see better \\n\\n<boi>S..S<eoi>\\n\\n \\n\\n<boi>S..S<eoi>\\n\\n ...
```

Each run of SOFT tokens is one `MMFeature` (the image, then each crop), so each is one
bidirectional block, as HF's `token_type_ids` make it. Prompts already expanded (soft tokens
present) are taken as they are.
"""

from __future__ import annotations

import itertools
import math

import torch

from vlmx.models.processing import (
    ImageProcessorBase,
    check_image_tensors,
    check_placeholder_count,
    find_token_runs,
)
from vlmx.models.processor_settings import (
    BILINEAR,
    check_processor_flags,
    positive_int,
    reject_unknown_kwargs,
)
from vlmx.multimodal.hashing import hash_image, hash_with_settings
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange, ProcessedPrompt

# Gemma3Processor.images_kwargs defaults (the config files store null for these)
PAN_AND_SCAN_DEFAULTS = {
    "do_pan_and_scan": False,
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
SUPPORTED_KWARGS = tuple(PAN_AND_SCAN_DEFAULTS)
_CROPS_INTRO = "Here is the original image "
_CROPS_OUTRO = " and here are some crops to help you see better "


def check_kwargs(base: dict, overrides: dict) -> dict:
    """Pan-and-scan settings: `base` updated by `overrides`, validated."""
    reject_unknown_kwargs(overrides, SUPPORTED_KWARGS, "Gemma 3")
    kw = {**base, **overrides}
    if not isinstance(kw["do_pan_and_scan"], bool):
        raise ValueError(
            f"mm_processor_kwargs do_pan_and_scan={kw['do_pan_and_scan']!r} is no bool"
        )
    for key in ("pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops"):
        positive_int(kw[key], key)
    ratio = kw["pan_and_scan_min_ratio_to_activate"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ValueError(
            f"mm_processor_kwargs pan_and_scan_min_ratio_to_activate={ratio!r} must be a "
            "positive number"
        )
    return kw


def pan_and_scan_boxes(height: int, width: int, kw: dict) -> list[tuple[int, int, int, int]]:
    """Crop boxes (top, left, crop_h, crop_w) of HF `Gemma3ImageProcessor.pan_and_scan_batched`.

    Empty when pan-and-scan is off or does not activate for this aspect ratio.
    """
    if not kw["do_pan_and_scan"]:
        return []
    min_crop, max_crops = kw["pan_and_scan_min_crop_size"], kw["pan_and_scan_max_num_crops"]
    min_ratio = kw["pan_and_scan_min_ratio_to_activate"]
    if width >= height:
        if width / height < min_ratio:
            return []
        n_w = min(int(math.floor(width / min_crop)), int(math.floor(width / height + 0.5)))
        n_w, n_h = min(max_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio:
            return []
        n_h = min(int(math.floor(height / min_crop)), int(math.floor(height / width + 0.5)))
        n_w, n_h = 1, min(max_crops, max(2, n_h))
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop:
        return []
    return [
        (top, left, min(crop_h, height - top), min(crop_w, width - left))
        for top, left in itertools.product(
            [crop_h * i for i in range(n_h)], [crop_w * i for i in range(n_w)]
        )
    ]


class Gemma3Processor(ImageProcessorBase[torch.Tensor]):
    """The processor of Gemma 3 (see `vlmx.models.interface`).

    It runs its own `process` over the shared steps: an image can become several features (its
    pan-and-scan crops), and the text around each placeholder is tokenized again.
    """

    shrink_images_hint = "mm_processor_kwargs={'do_pan_and_scan': False}"
    image_processor_name = "Gemma3ImageProcessor"
    placeholder_token = "<start_of_image>"

    def configure(self, raw: dict, _: dict) -> None:
        hf = self.hf_config
        check_processor_flags(raw, resample=(BILINEAR,))
        size = raw.get("size") or {}
        image_size = hf.vision_config.image_size
        self.height = size.get("height", image_size)
        self.width = size.get("width", image_size)
        if (self.height, self.width) != (image_size, image_size):
            raise ValueError(
                f"image processor size {self.height}x{self.width} does not match the vision "
                f"tower's image_size {image_size}; fix the checkpoint's processor config"
            )
        base = {k: v if raw.get(k) is None else raw[k] for k, v in PAN_AND_SCAN_DEFAULTS.items()}
        self.base_kwargs = check_kwargs(base, self.engine_kwargs)
        self.use_normalization(
            raw.get("image_mean", [0.5, 0.5, 0.5]),
            raw.get("image_std", [0.5, 0.5, 0.5]),
            raw.get("rescale_factor", 1 / 255),
        )
        self.mm_tokens = hf.mm_tokens_per_image
        self.boi_id: int = hf.boi_token_index
        self.eoi_id: int = hf.eoi_token_index
        self.soft_id: int = hf.image_token_index
        self.image_token_id = self.soft_id
        # NOTE: HF's tokenizer splits text at special tokens before anything else, so text is
        # re-tokenized only between them; non-special added tokens stay part of the text.
        self._special_ids = {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special
        } | {self.boi_id, self.eoi_id, self.soft_id}

    def prompt_settings(self, mm_processor_kwargs: dict) -> dict:
        """Pan-and-scan settings of one prompt: the engine-wide ones, updated by its kwargs."""
        return check_kwargs(self.base_kwargs, mm_processor_kwargs)

    def preprocess(
        self, crops: list[torch.Tensor], settings: dict | None = None
    ) -> list[torch.Tensor]:
        """uint8 [3, h, w] crops -> pixel_values [3, S, S] (model dtype, on device), no cache.

        Crops of one input size are resized and normalized in one batch."""
        return self.preprocess_resized(
            crops,
            lambda height, width: (self.height, self.width),
            "bilinear",
            lambda pixels: pixels.to(self.dtype),  # [B, 3, S, S]
        )

    def process(
        self, prompt_token_ids: list[int], images: list[torch.Tensor], mm_processor_kwargs: dict
    ) -> ProcessedPrompt:
        check_image_tensors(images)
        kw = self.prompt_settings(mm_processor_kwargs or {})
        # per image: the whole image, then its crops
        crops: list[list[torch.Tensor]] = []
        keys: list[list[str]] = []
        for image in images:
            h, w = image.shape[-2:]
            boxes = pan_and_scan_boxes(h, w, kw)
            crops.append([image] + [image[:, t : t + ch, le : le + cw] for t, le, ch, cw in boxes])
            content = hash_image(image)
            keys.append(
                [hash_with_settings(content, {**kw, "crop": i}) for i in range(len(crops[-1]))]
            )
        flat_keys = [k for ks in keys for k in ks]
        pixels = self.cache.get_or_compute(
            flat_keys, [c for cs in crops for c in cs], self.preprocess
        )

        if self.soft_id in prompt_token_ids:
            token_ids = list(prompt_token_ids)
            spans = find_token_runs(prompt_token_ids, self.soft_id)
            if len(spans) != len(flat_keys):
                raise ValueError(
                    f"the expanded prompt has {len(spans)} runs of image soft tokens but the "
                    f"{len(images)} images need {len(flat_keys)} (image + pan-and-scan crops)"
                )
        else:
            num_boi = prompt_token_ids.count(self.boi_id)
            check_placeholder_count(num_boi, len(images), self.placeholder_token)
            token_ids, spans = self._expand(prompt_token_ids, [len(c) - 1 for c in crops])
        features = []
        for (start, end), key, px in zip(spans, flat_keys, pixels, strict=True):
            if end - start != self.mm_tokens:
                raise ValueError(
                    f"an image needs {self.mm_tokens} soft tokens but the prompt has a run of "
                    f"{end - start}"
                )
            placeholder = PlaceholderRange(offset=start, length=end - start)
            features.append(
                MMFeature(mm_hash=key, placeholder=placeholder, data={"pixel_values": px})
            )
        return ProcessedPrompt(prompt_token_ids=token_ids, mm_features=features)

    def _image_items(self, num_crops: int) -> list[str | int | list[int]]:
        """What HF's `replace_image_token` puts in place of one <start_of_image>: text (str),
        special tokens (int) and soft-token runs (list)."""
        one = ["\n\n", self.boi_id, [self.soft_id] * self.mm_tokens, self.eoi_id, "\n\n"]
        if not num_crops:
            return one
        items: list[str | int | list[int]] = [_CROPS_INTRO, *one, _CROPS_OUTRO]
        for i in range(num_crops):
            items += ([" "] if i else []) + one
        return items

    def _expand(
        self, ids: list[int], num_crops: list[int]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        pending: list[str | list[int]] = []  # text piece since the last special token

        def flush() -> None:
            if any(isinstance(p, str) for p in pending):
                text = "".join(
                    "".join(group)
                    if is_text
                    else self.tokenizer.decode(
                        [t for p in group for t in p], clean_up_tokenization_spaces=False
                    )
                    for is_text, group in itertools.groupby(
                        pending, key=lambda p: isinstance(p, str)
                    )
                )
                out.extend(self.tokenizer.encode(text, add_special_tokens=False))
            else:
                for p in pending:
                    out.extend(p)
            pending.clear()

        image_idx = 0
        for t in ids:
            if t not in self._special_ids:
                pending.append([t])
                continue
            if t != self.boi_id:
                flush()
                out.append(t)
                continue
            for item in self._image_items(num_crops[image_idx]):
                if isinstance(item, str):
                    pending.append(item)
                elif isinstance(item, int):
                    flush()
                    out.append(item)
                else:
                    flush()
                    spans.append((len(out), len(out) + len(item)))
                    out.extend(item)
            image_idx += 1
        flush()
        return out, spans
