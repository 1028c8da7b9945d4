"""What the engine expects of a model family: a `Processor` (host side, once per request before
scheduling) and a `Model` (device side). The runner is typed against `Model` and calls every
member below unconditionally; the engine against `Processor`.

A family module (`models/<family>.py`) provides both and is named in `models/registry.py`; see
docs/ADDING_A_MODEL.md. `models.base.VLMBase` implements the text half of `Model` and
`models.processing.ImageProcessorBase` the shared pipeline of `Processor`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Protocol

from torch import Tensor, nn

from vlmx.layers.attention import AttentionMetadata
from vlmx.layers.decoder import DecoderDims
from vlmx.multimodal.inputs import MMFeature, ProcessedPrompt


class ProcessorCache(Protocol):
    def clear(self) -> None: ...

    def __len__(self) -> int: ...


class Processor(Protocol):
    """Built as `cls(model_config, tokenizer, device)`: `tokenizer` is the engine's (the
    processor reads its special token ids and, where a family needs it, tokenizes the text it
    inserts), `device` where the encoder inputs go."""

    shrink_images_hint: str  # how a user makes images cost fewer tokens, quoted in errors
    cache: ProcessorCache  # preprocessed images by mm_hash; `LLM.reset_mm_cache` clears it

    # Optional: `encode_prompt(text, add_special_tokens) -> list[int]`, used instead of
    # `tokenizer.encode` for a
    # prompt given as text, by a family whose image tags are text (Phi-4's `<|image_1|>`).

    def process(
        self,
        prompt_token_ids: list[int],  # tokenized prompt, one placeholder per image
        images: list[Tensor],  # uint8 [3, H, W], RGB, on the CPU
        mm_processor_kwargs: dict,  # per-prompt overrides of the engine-wide kwargs
    ) -> ProcessedPrompt: ...  # expanded ids, one MMFeature per image (M-RoPE positions)


class Model(nn.Module, ABC):
    """A family's model, an `nn.Module` built under the target device and dtype as
    `cls(hf_config)`; weights arrive through `load_weights`."""

    config: DecoderDims  # the decoder's sizes (`DecoderConfig` / `GemmaConfig`)
    uses_mrope: bool  # positions are [3, T] when True, else [T]
    # False: image tokens attend bidirectionally, so an image's span must be prefilled in one
    # step (the scheduler keeps it whole)
    chunk_images: bool = True
    # True: the decoder cross-attends to per-request image states (`CrossAttentionModel`)
    uses_cross_attention: bool = False

    # the KV cache's shape, and the width of the embeddings, from `config`
    num_layers = property(lambda self: self.config.num_layers)
    num_kv_heads = property(lambda self: self.config.num_kv_heads)
    head_dim = property(lambda self: self.config.head_dim)
    hidden_size = property(lambda self: self.config.hidden_size)

    @abstractmethod
    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """[T] int64 -> [T, width]: width = hidden, or more where the decoder takes more than
        the embeddings at its input (Qwen3-VL's DeepStack levels); `forward` reads that width."""

    @abstractmethod
    def encode_images(self, features: list[MMFeature]) -> list[Tensor]:
        """One [feature.num_embeds, width] tensor per image (`embed_tokens`' width), all images
        in one batched call."""

    @abstractmethod
    def profile_image_features(self, num_embeds: int) -> list[MMFeature]:
        """Dummy encoder inputs for memory profiling, on the model's device and dtype: at least
        one image, embeddings summing to about `num_embeds`, each image at the largest size the
        family's processor makes under its default settings (smaller where that one image
        would exceed `num_embeds` and the family allows smaller images). `encode_images` of
        them peaks as the largest encoder step the scheduler can build."""

    @abstractmethod
    def forward(
        self,
        inputs_embeds: Tensor,  # [T, width] (`embed_tokens`)
        positions: Tensor,  # [T] int64, or [3, T] with M-RoPE
        kv_caches: list[Tensor],  # one per layer
        attn_metadata: AttentionMetadata,
    ) -> Tensor:
        """[T, hidden] hidden states after the decoder's final norm."""

    @abstractmethod
    def compute_logits(self, hidden_states: Tensor) -> Tensor:
        """[N, hidden] -> [N, vocab]."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load (checkpoint name, tensor) pairs; raise on missing or unexpected names."""


class CrossAttentionModel(Model):
    """A model whose decoder cross-attends to its requests' images (Mllama): the worker keeps
    each request's cross-attention K/V from its first step to its end (or preemption) and
    passes them each step in `AttentionMetadata.cross_attention`."""

    uses_cross_attention = True
    num_cross_keys_per_image: int  # keys one image adds to its request's cross K/V

    @abstractmethod
    def cross_attention_kv(self, features: list[MMFeature]) -> Tensor:
        """One request's images -> [num_cross_layers, 2, num_keys, num_kv_heads, head_dim]."""

    @abstractmethod
    def cross_key_valid(self, features: list[MMFeature]) -> Tensor:
        """[num_keys] bool on the CPU, False at the keys of padding (Mllama: the tiles past an
        image's own), which only text rows that see no image attend to."""

    @abstractmethod
    def cross_kv_bytes_per_image(self) -> int:
        """Device bytes of one image's cross-attention K/V (what the worker reserves per image)."""

    @abstractmethod
    def profile_cross_features(self, num_images: int) -> list[MMFeature]:
        """`num_images` dummy images at the largest size, for `cross_attention_kv`'s peak."""
