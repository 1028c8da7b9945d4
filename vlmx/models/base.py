"""What every family's model shares: the text half of the model interface around its decoder.

A family's model (`vlmx.models.interface.Model`) is a vision tower and a projector in front of
a decoder. Everything past the image embeddings is the same in every family, and lives here:

```
input_ids --embed_tokens--> [T, hidden] --forward (the decoder)--> [T, hidden]
  --compute_logits: @ lm_head.weight.T, or @ embed_tokens.weight.T when tied--> [N, vocab]
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.attention import AttentionMetadata
from vlmx.layers.decoder import load_weights_into
from vlmx.models.interface import Model
from vlmx.multimodal.inputs import MMFeature, PlaceholderRange


def profile_features(
    num_embeds: int, per_image: int, data_of: Callable[[int], dict[str, torch.Tensor]]
) -> list[MMFeature]:
    """`max(1, num_embeds // per_image)` dummy images of `per_image` embeddings each, image i's
    encoder inputs from `data_of(i)` (for `Model.profile_image_features`)."""
    return [
        MMFeature(
            mm_hash=f"profile-{i}", placeholder=PlaceholderRange(0, per_image), data=data_of(i)
        )
        for i in range(max(1, num_embeds // per_image))
    ]


class VLMBase(Model):
    """The decoder side of a family's model.

    A family builds its decoder (`layers.decoder.DecoderModel` or `layers.gemma.
    GemmaDecoderModel`) at the attribute `decoder_name`, its decoder config at `self.config`, and
    `self.lm_head` with `build_lm_head` (None: the logits use the tied embedding matrix). It
    declares its checkpoint names in `weight_prefixes` and `skipped_weight_suffixes`.
    """

    decoder_name = "language_model"
    # checkpoint prefix -> module prefix, first match wins
    weight_prefixes: tuple[tuple[str, str], ...] = ()
    # checkpoint tensors that are no parameters (rotary buffers some checkpoints carry)
    skipped_weight_suffixes: tuple[str, ...] = (".inv_freq",)
    lm_head: nn.Linear | None

    @property
    def decoder(self) -> nn.Module:
        return getattr(self, self.decoder_name)

    @property
    def embedding(self) -> torch.Tensor:
        """The token embedding matrix [vocab, hidden]: its device and dtype are the model's."""
        return self.decoder.embed_tokens.weight

    def build_lm_head(self, tied: bool) -> nn.Linear | None:
        if tied:
            return None
        return nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64, or [3, T] with M-RoPE
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.decoder(inputs_embeds, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.decoder.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(hidden_states, head.weight)  # [N, vocab]

    def embed_blocks(
        self, features: list[MMFeature], ids_key: str, image_embeds: torch.Tensor
    ) -> list[torch.Tensor]:
        """For a family whose placeholder span interleaves its image tokens with others (tile
        tags, row breaks): each span's token ids (`data[ids_key]`, [num_embeds] int64) embedded,
        the rows of `self.image_token_id` filled with `image_embeds` [num_image_tokens, hidden]
        in order. One [num_embeds, hidden] tensor per feature, so the runner copies a span as
        one piece."""
        block_ids = torch.cat([f.data[ids_key] for f in features])  # [sum(num_embeds)]
        block_ids = block_ids.to(self.embedding.device, non_blocking=True)
        blocks = self.embed_tokens(block_ids)  # [sum(num_embeds), hidden]
        is_image = (block_ids == self.image_token_id).unsqueeze(-1)  # [sum(num_embeds), 1]
        blocks = blocks.masked_scatter(is_image, image_embeds.to(blocks.dtype))
        return list(blocks.split([f.num_embeds for f in features]))

    def rename_weight(self, name: str) -> str | None:
        """A checkpoint name -> the module name it has here (None: skipped). An unknown name
        comes back as it is, so that `load_weights_into` reports it as unexpected."""
        if name.endswith(self.skipped_weight_suffixes):
            return None
        for ckpt_prefix, prefix in self.weight_prefixes:
            if name.startswith(ckpt_prefix):
                return prefix + name[len(ckpt_prefix) :]
        return name

    def map_weight_name(self, name: str) -> str | None:
        """`rename_weight`, and lm_head's tensors skipped while it is tied."""
        mapped = self.rename_weight(name)
        if mapped is not None and mapped.startswith("lm_head.") and self.lm_head is None:
            return None
        return mapped

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights_into(self, weights, self.map_weight_name)

    def load_weights_but_head(
        self, weights: Iterable[tuple[str, torch.Tensor]], into: nn.Module
    ) -> torch.Tensor | None:
        """Load every checkpoint tensor but lm_head.weight into `into` (this model without an
        lm_head, or a module holding all its modules but lm_head); return the checkpoint's
        lm_head.weight, shape-checked, or None when it has none. For families whose config
        does not settle whether lm_head is tied: they decide once they see the checkpoint."""
        heads: list[torch.Tensor] = []

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if self.rename_weight(name) != "lm_head.weight":
                    yield name, tensor
                elif heads:
                    raise ValueError(f"weight {name!r} appears twice in the checkpoint")
                else:
                    heads.append(tensor)

        load_weights_into(into, stream(), self.map_weight_name)
        if not heads:
            return None
        expected = tuple(self.decoder.embed_tokens.weight.shape)
        if tuple(heads[0].shape) != expected:
            raise ValueError(
                f"weight 'lm_head.weight' has shape {tuple(heads[0].shape)}, expected {expected}"
            )
        return heads[0]
