"""Rotary position embeddings: RoPE, M-RoPE (Qwen2-VL) and the 2D rotary of vision towers.

Every table is a pair of float32 `cos`, `sin` of shape `[num_tokens, head_dim]` in the
rotate-half (GPT-NeoX) layout, as `transformers`' `rotate_half` / `apply_rotary_pos_emb` use it:
dims `j` and `j + head_dim / 2` share one frequency.

M-RoPE (HF `Qwen2VLRotaryEmbedding`, transformers 5) gives each of the `head_dim / 2` frequencies
one position axis. `mrope_section` splits the frequencies into three consecutive sections, read
from the temporal, height and width rows of `positions [3, T]`:

```
freq index:  0 ........ s0-1 | s0 ....... s0+s1-1 | s0+s1 ...... head_dim/2-1
axis:        t (row 0)       | h (row 1)          | w (row 2)
```

and the second half of the head repeats the first half. Interleaved M-RoPE (HF
`Qwen3VLTextRotaryEmbedding`) deals the first `3 * s1` / `3 * s2` frequencies out in turn
instead (t h w t h w ...; past those, t):

```
freq index:  0 1 2 3 4 5 ... 3*s1-1 ... head_dim/2-1
axis:        t h w t h w ...   w    ...  t
```

`apply_rotary` runs as one fused Triton kernel (`vlmx.ops.fused`) where it can (CUDA, Triton),
else as `apply_rotary_torch`, the reference the kernel reproduces. A table narrower than the head
(partial rotary, Phi-3 / Phi-4's `partial_rotary_factor`) rotates the first `cos.shape[-1]` dims
of each head and passes the rest through, as HF's `apply_rotary_pos_emb` does when its `cos` is
narrower than q.

LongRoPE (HF rope_type "longrope", `_compute_longrope_parameters`): per-frequency divisors
`short_factor` / `long_factor` on the inverse frequencies and one `attention_factor` on cos and
sin; see `LongRopeEmbedding` for which positions take which factors.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmx.ops import fused


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [num_tokens, num_heads, head_dim]` by `cos`/`sin [num_tokens, head_dim]`.

    Computes in `cos.dtype` and returns `x.dtype`: pass float32 tables for the vision towers (HF
    `apply_rotary_pos_emb_vision` upcasts) and tables cast to the model dtype for the decoder (HF
    `apply_rotary_pos_emb` works in the activations' dtype).
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:  # partial rotary: the rest of each head passes through
        rotated = apply_rotary(x[..., :rotary_dim].contiguous(), cos, sin)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
    if fused.can_fuse_rotary(x, cos, sin):
        return fused.apply_rotary(x, cos, sin)
    return apply_rotary_torch(x, cos, sin)


def apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference for `apply_rotary`: each product and the sum rounded to cos.dtype, as HF's."""
    xc = x.to(cos.dtype)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    # NOTE: built on the CPU in float32, as HF does, so the table is bit-identical on any device.
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    return 1.0 / (theta**exponents)  # [dim / 2]


class _InvFreq:
    """A float32 frequency vector that follows the positions' device and never changes dtype.

    NOTE: kept out of the module's buffers so that `model.to(torch.bfloat16)` cannot round it.
    """

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self._value = inv_freq

    def on(self, device: torch.device) -> torch.Tensor:
        if self._value.device != device:
            self._value = self._value.to(device)
        return self._value


def interleaved_mrope_axis(section: list[int]) -> torch.Tensor:
    """[sum(section)] int64: the position row (0 t, 1 h, 2 w) each frequency reads, interleaved
    (HF `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`)."""
    index = torch.arange(sum(section), device="cpu")
    axis = torch.zeros_like(index)
    for row in (1, 2):
        axis[(index % 3 == row) & (index < 3 * section[row])] = row
    return axis


class RotaryEmbedding(nn.Module):
    """RoPE over `head_dim`, plain (`positions [T]`) or multimodal (`positions [3, T]`).

    Matches HF `Qwen2VLRotaryEmbedding` / `Qwen2_5_VLRotaryEmbedding` (rope_type "default", with
    `mrope_section`), `Qwen3VLTextRotaryEmbedding` (`mrope_interleaved`) and
    `LlamaRotaryEmbedding` (rope_type "default" or "linear").
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        mrope_section: list[int] | None = None,
        scaling_factor: float = 1.0,
        mrope_interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.mrope_section = list(mrope_section) if mrope_section else None
        self._inv_freq = _InvFreq(_inv_freq(head_dim, rope_theta) / scaling_factor)
        self._mrope_axis: _InvFreq | None = None
        if self.mrope_section is not None:
            if sum(self.mrope_section) != head_dim // 2:
                raise ValueError(
                    f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {head_dim // 2}"
                )
            if mrope_interleaved:
                axis = interleaved_mrope_axis(self.mrope_section)
            else:
                axis = torch.cat(
                    [
                        torch.full((n,), i % 3, dtype=torch.long, device="cpu")
                        for i, n in enumerate(self.mrope_section)
                    ]
                )
            self._mrope_axis = _InvFreq(axis)  # [head_dim / 2] position row read by each freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [3, T] int64 -> cos, sin: [T, head_dim] float32."""
        inv_freq = self._inv_freq.on(positions.device)
        if positions.ndim == 1:
            freqs = positions[:, None].float() * inv_freq  # [T, head_dim / 2]
        else:
            if self._mrope_axis is None:
                raise ValueError(f"positions of shape {tuple(positions.shape)} need mrope_section")
            axis = self._mrope_axis.on(positions.device)
            per_freq = positions.index_select(0, axis)  # [head_dim / 2, T]
            freqs = per_freq.t().float() * inv_freq  # [T, head_dim / 2]
        freqs = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        return freqs.cos(), freqs.sin()


class VisionRotaryEmbedding(nn.Module):
    """Axial 2D RoPE of the Qwen2-VL / Qwen2.5-VL vision towers.

    Matches HF `Qwen2VLVisionRotaryEmbedding`: `head_dim / 4` frequencies, applied to the patch's
    row for the first quarter of the head and to its column for the second, then repeated.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self._inv_freq = _InvFreq(_inv_freq(head_dim // 2, theta))  # [head_dim / 4]

    def forward(self, pos_hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos_hw: [N, 2] (row, column) int64 -> cos, sin: [N, head_dim] float32."""
        inv_freq = self._inv_freq.on(pos_hw.device)
        freqs = (pos_hw[..., None].float() * inv_freq).flatten(1)  # [N, head_dim / 2]: h | w
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()


class LongRopeEmbedding(nn.Module):
    """LongRoPE over the first `rotary_dim` dims of a head (Phi-3 / Phi-4-mini).

    Matches HF `Phi4MultimodalRotaryEmbedding` / `Phi3RotaryEmbedding` with rope_type
    "longrope": `inv_freq = 1 / (factor_i * theta ** (2i / rotary_dim))`, cos and sin times
    `attention_factor` (default `sqrt(1 + ln(s) / ln(original_max))`, s = max_position_embeddings
    / original_max_position_embeddings, 1 when s <= 1).

    NOTE: HF picks the factors per forward call: `long_factor` for every token once the
    sequence is longer than `original_max_position_embeddings`, else `short_factor` (and its
    `generate` recomputes the cache when a sequence crosses that length). Over a paged KV cache
    a token's rotation is fixed when it is written, so here the factors go by position: positions
    below `original_max_position_embeddings` take the short factors, the ones from there on the
    long factors. A sequence that stays within `original_max_position_embeddings` tokens equals
    HF exactly; beyond it, its first tokens keep their short-factor keys.
    """

    def __init__(
        self,
        rotary_dim: int,
        rope_theta: float,
        short_factor: list[float],
        long_factor: list[float],
        original_max_position_embeddings: int,
        attention_factor: float,
    ) -> None:
        super().__init__()
        for name, factors in (("short_factor", short_factor), ("long_factor", long_factor)):
            if len(factors) != rotary_dim // 2:
                raise ValueError(
                    f"rope_scaling {name} has {len(factors)} values; the rotary dims "
                    f"({rotary_dim}) need {rotary_dim // 2}"
                )
        self.rotary_dim = rotary_dim
        self.original_max = original_max_position_embeddings
        self.attention_factor = attention_factor
        short = torch.tensor(short_factor, dtype=torch.float32, device="cpu")
        long = torch.tensor(long_factor, dtype=torch.float32, device="cpu")
        # NOTE: HF computes 1 / (factor * theta ** e); the same float32 ops here
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float()
        powers = rope_theta ** (exponents / rotary_dim)  # [rotary_dim / 2]
        self._short = _InvFreq(1.0 / (short * powers))
        self._long = _InvFreq(1.0 / (long * powers))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> cos, sin: [T, rotary_dim] float32."""
        if positions.ndim != 1:
            raise ValueError(f"LongRoPE takes positions [T], got {tuple(positions.shape)}")
        device = positions.device
        is_long = (positions >= self.original_max)[:, None]  # [T, 1]
        inv_freq = torch.where(is_long, self._long.on(device), self._short.on(device))
        freqs = positions[:, None].float() * inv_freq  # [T, rotary_dim / 2]
        freqs = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
