"""Data that describes the images of one request after processing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True, frozen=True)
class PlaceholderRange:
    """Where one image's embeddings go in the prompt.

    ```
    prompt tokens:  t t <vs> P P P P P P <ve> t t
                             ^offset     ^offset + length - 1
    ```
    """

    offset: int  # index of the first placeholder token in the expanded prompt
    length: int  # number of placeholder tokens == number of embeddings the encoder yields

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class MMFeature:
    """One image of a request, processed and ready for the vision encoder.

    `mm_hash` identifies the encoder output: two features with the same hash produce the same
    embeddings, so the encoder cache and the prefix cache key on it.
    """

    mm_hash: str  # content hash of the pixels and of the processor settings that shaped them
    placeholder: PlaceholderRange
    data: dict[str, torch.Tensor] = field(default_factory=dict)  # encoder inputs (family-defined)

    @property
    def num_embeds(self) -> int:
        return self.placeholder.length


@dataclass(slots=True)
class ProcessedPrompt:
    """A prompt after the family's processor: expanded token ids and one feature per image."""

    prompt_token_ids: list[int]
    mm_features: list[MMFeature]
    # M-RoPE models: [3, num_prompt_tokens] int64 positions, and the offset that turns a token
    # index i >= num_prompt_tokens into its position (i + mrope_position_delta on all 3 axes).
    mrope_positions: torch.Tensor | None = None
    mrope_position_delta: int = 0
    # Keys that shape the KV of every token of the prompt beyond its ids and the images its
    # tokens cover (Mllama: every image, which the text before the first image attends to);
    # part of the first block's prefix-cache hash.
    prefix_extra_keys: tuple = ()
