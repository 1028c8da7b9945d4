"""Qwen-VL processor: every image at the tower's one size, 256 tokens in its `<img>` span.

Matches the published `visual.py` image transform (torchvision on a PIL RGB image):

```
uint8 [3, H, W] --bicubic, antialiased, to image_size x image_size (448)--> uint8
  --/255, (x - CLIP mean) / CLIP std--> pixel_values [3, S, S] float32
```

Prompt layout (the published tokenizer's): each image is `<img>...</img>`, whose inside the
published tokenizer fills with the image's path padded to 256 tokens by `<imgpad>`; the model
overwrites those 256 positions with the image's embeddings. Here images come from
`multi_modal_data`, so a prompt writes `<img></img>` per image (`Picture 1: <img></img>\\n`),
which becomes `<img>` + 256 x `<imgpad>` + `</img>`. A prompt already in that form is kept.
"""

from __future__ import annotations

import torch

from vlmx.models.processing import Expansion, ImageProcessorBase
from vlmx.models.processor_settings import reject_unknown_kwargs, require_token_id

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QwenVLProcessor(ImageProcessorBase[torch.Tensor]):
    """The processor of Qwen-VL (see `vlmx.models.interface`)."""

    shrink_images_hint = "fewer images per prompt (each costs 256 tokens)"
    placeholder_token = "<img></img>"
    placeholder_example = "Picture 1: <img></img>\\n"

    def configure(self, _: dict, __: dict) -> None:
        visual = self.hf_config.visual
        reject_unknown_kwargs(self.engine_kwargs, (), "Qwen-VL", "none")
        self.image_size = visual["image_size"]
        self.num_queries = visual["n_queries"]
        self.start_token_id = require_token_id(self.tokenizer, "<img>", "Qwen-VL")
        self.end_token_id = require_token_id(self.tokenizer, "</img>", "Qwen-VL")
        self.image_token_id = require_token_id(self.tokenizer, "<imgpad>", "Qwen-VL")
        if self.start_token_id != visual["image_start_id"]:
            raise ValueError(
                f"the tokenizer's <img> is {self.start_token_id}, but config.json visual "
                f"image_start_id is {visual['image_start_id']}"
            )
        self.use_normalization(CLIP_MEAN, CLIP_STD, 1 / 255)

    def prompt_settings(self, mm_processor_kwargs: dict) -> dict:
        reject_unknown_kwargs(mm_processor_kwargs, (), "Qwen-VL", "none")
        return {"image_size": self.image_size}

    def preprocess(self, images: list[torch.Tensor], settings: dict) -> list[torch.Tensor]:
        size = settings["image_size"]
        return self.preprocess_resized(
            images, lambda h, w: (size, size), "bicubic", lambda batch: list(batch.unbind(0))
        )

    def expand(self, image: torch.Tensor, pixels: torch.Tensor, settings: dict) -> Expansion:
        token_ids = [self.start_token_id, *[self.image_token_id] * self.num_queries]
        return Expansion(
            [*token_ids, self.end_token_id], 1, self.num_queries, {"pixel_values": pixels}
        )

    def count_placeholders(self, prompt_token_ids: list[int]) -> int:
        return prompt_token_ids.count(self.start_token_id)

    def placeholder_spans(
        self, prompt_token_ids: list[int], expansions: list[Expansion]
    ) -> list[tuple[int, int]]:
        """Each `<img>` up to its `</img>`, holding nothing or exactly the 256 `<imgpad>`."""
        spans = []
        starts = [i for i, t in enumerate(prompt_token_ids) if t == self.start_token_id]
        for image_idx, (start, e) in enumerate(zip(starts, expansions, strict=True)):
            try:
                end = prompt_token_ids.index(self.end_token_id, start)
            except ValueError:
                end = -1
            inside = prompt_token_ids[start + 1 : end] if end >= 0 else None
            if inside is not None and inside in ([], e.token_ids[1:-1]):
                spans.append((start, end + 1))
                continue
            raise ValueError(
                f"image {image_idx}'s <img> must be followed by </img> with nothing between "
                f"(or exactly {e.length} <imgpad>); the images come from multi_modal_data, "
                "not from paths inside the tags"
            )
        return spans
