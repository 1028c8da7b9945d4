"""Vision-transformer pieces of the Qwen2-VL family (and any ViT with fused qkv and 2D RoPE).

Patches arrive flattened, `[num_patches, C * tp * p * p]`, in the order HF's Qwen2-VL image
processor writes them: frame-major, then row-major over 2x2 merge blocks, then row-major inside
a block. Four consecutive patches are one block, which the merger concatenates:

```
grid 4x4 patches, merge 2:    patch order:   0  1 |  4  5
                                             2  3 |  6  7
                                             -----+-----
                                             8  9 | 12 13
                                            10 11 | 14 15
```

The index builders below run on the host over Python ints (one loop per image, never per
patch) and return CPU tensors that the caller moves to the device in one copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmx.layers.attention import VarlenSegments, varlen_attention
from vlmx.layers.mlp import MLP, GatedMLP
from vlmx.layers.norm import RMSNorm, make_norm
from vlmx.layers.rotary import apply_rotary
from vlmx.ops import fused

Grid = tuple[int, int, int]  # (t, h, w) in patches


class PatchProjection(nn.Linear):
    """A Conv3d with kernel == stride, as a matmul over flattened patches.

    Loads HF `PatchEmbed.proj` (Conv3d weight `[embed, C, tp, p, p]`) reshaped to
    `[embed, C * tp * p * p]`; the processor flattens each patch in the same (C, tp, p, p) order.
    """

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> None:
        param = getattr(self, param_name)
        if tensor.numel() != param.numel() or shard is not None:
            raise ValueError(
                f"patch projection {param_name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(param.shape)} (or a Conv3d kernel of the same size)"
            )
        with torch.no_grad():
            param.copy_(tensor.reshape(param.shape))


class PatchEmbed(nn.Module):
    """Matches HF `PatchEmbed` / `Qwen2_5_VisionPatchEmbed` / `Qwen3VLVisionPatchEmbed` (with
    `bias`): [N, C*tp*p*p] -> [N, embed_dim]."""

    def __init__(self, patch_dim: int, embed_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = PatchProjection(patch_dim, embed_dim, bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    """Matches HF `VisionAttention` (Qwen2-VL) / `Qwen2_5_VLVisionAttention`.

    Fused `qkv` ([N, dim] -> [N, 3 * dim]), 2D RoPE on q and k in float32, attention inside each
    `segments` segment, output projection `proj`.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        qk = qkv[:, :2].reshape(n, 2 * self.num_heads, self.head_dim)  # a view: q's heads, k's
        if fused.can_fuse_rotary(qk, cos, sin):
            fused.apply_rotary(qk, cos, sin, out=qk)  # q and k in place, one launch
            q, k, v = qkv.unbind(1)
        else:
            q, k, v = qkv.unbind(1)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # NOTE: q, k, v may be strided views of qkv (rows 3 * dim apart); both attention paths
        # read them so (FlashAttention takes row strides; the SDPA path gathers rows).
        out = varlen_attention(q, k, v, segments, scale=self.scale)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.

    `norm="layer_norm"`, `gated_mlp=False` matches HF `Qwen2VLVisionBlock` (fc1/act/fc2);
    `norm="rms_norm"`, `gated_mlp=True` matches `Qwen2_5_VLVisionBlock` (gate/up/down with bias).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        act: str,
        norm: str = "layer_norm",
        gated_mlp: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim, eps)
        self.norm2 = make_norm(norm, dim, eps)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp: nn.Module = (
            GatedMLP(dim, mlp_hidden_dim, act, bias=True)
            if gated_mlp
            else MLP(dim, mlp_hidden_dim, act, bias=True)
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VarlenSegments
    ) -> torch.Tensor:
        x, delta = self.forward_deferred(x, None, cos, sin, segments)
        return x + delta

    def forward_deferred(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: VarlenSegments,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on `x + delta` (delta: the block before's MLP output, None for none),
        returning `(its input, its MLP output)` with that sum still to take, so that each
        residual add happens inside the norm after it (`run_vision_blocks`)."""
        h, x = _add_norm(self.norm1, delta, x)
        h, x = _add_norm(self.norm2, self.attn(h, cos, sin, segments), x)
        return x, self.mlp(h)


def _add_norm(
    norm: nn.Module, delta: torch.Tensor | None, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm(x + delta), x + delta)`, the sum rounded to x's dtype as HF's `x = x + delta`;
    RMSNorm does both in one pass where its kernel runs."""
    if delta is None:
        return norm(x), x
    if isinstance(norm, RMSNorm):
        return norm.add_forward(delta, x)
    x = x + delta
    return norm(x), x


def run_vision_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segments_of: Callable[[int], VarlenSegments],
) -> torch.Tensor:
    """`x` through `VisionBlock`s, block i attending inside `segments_of(i)` (the same few
    `VarlenSegments` for every block, built once per forward); each residual add is fused into
    the norm that follows it (two passes over x fewer per block)."""
    delta = None
    for i, block in enumerate(blocks):
        x, delta = block.forward_deferred(x, delta, cos, sin, segments_of(i))
    return x if delta is None else x + delta


class PatchMerger(nn.Module):
    """Matches HF `PatchMerger` / `Qwen2_5_VLPatchMerger`.

    norm each patch, concatenate each block of `merge_size**2` consecutive patches, then
    Linear-GELU-Linear: [N, context_dim] -> [N / merge_size**2, out_dim]. The MLP is an
    `nn.Sequential` so its weights keep the checkpoint names `mlp.0` / `mlp.2`.
    """

    def __init__(
        self, out_dim: int, context_dim: int, merge_size: int = 2, norm: str = "layer_norm"
    ) -> None:
        super().__init__()
        self.hidden_size = context_dim * merge_size**2
        self.ln_q = make_norm(norm, context_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


def vision_position_ids(grids: list[Grid], merge_size: int) -> torch.Tensor:
    """(row, column) of every patch in processor order: [sum(t*h*w), 2] int64, on the CPU.

    Matches HF `get_vision_position_ids(grid_thw, spatial_merge_size)`.
    """
    out = []
    for t, h, w in grids:
        rows = torch.arange(h, device="cpu").view(h, 1).expand(h, w)
        cols = torch.arange(w, device="cpu").view(1, w).expand(h, w)
        hw = torch.stack((rows, cols), dim=-1)  # [h, w, 2]
        hw = hw.view(h // merge_size, merge_size, w // merge_size, merge_size, 2)
        hw = hw.permute(0, 2, 1, 3, 4).reshape(h * w, 2)  # block-major, as the processor
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def vision_cu_seqlens(grids: list[Grid]) -> list[int]:
    """Boundaries of full-attention segments: one per frame of each image."""
    cu = [0]
    for t, h, w in grids:
        cu.extend(cu[-1] + (i + 1) * h * w for i in range(t))
    return cu


def window_index(
    grids: list[Grid], merge_size: int, window_merged: int
) -> tuple[torch.Tensor, list[int]]:
    """Reorder merge blocks window by window (Qwen2.5-VL window attention).

    Matches HF `get_vision_window_index`. Each frame's grid of merge blocks (`h/m x w/m`) is cut
    into `window_merged x window_merged` windows (the last row / column of windows may be
    partial); blocks are listed window after window, row-major inside a window.

    Returns `index [num_blocks]` int64 (CPU): position `i` of the window order holds block
    `index[i]` of the processor order; and the window boundaries in patches (`[0, ..., N]`).
    """
    unit = merge_size**2
    ws = window_merged
    indexes = []
    cu = [0]
    base = 0
    for t, h, w in grids:
        gh, gw = h // merge_size, w // merge_size
        pad_h, pad_w = (-gh) % ws, (-gw) % ws
        nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
        idx = torch.arange(t * gh * gw, device="cpu").view(t, gh, gw)
        idx = F.pad(idx, (0, pad_w, 0, pad_h), value=-1)
        idx = idx.view(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)
        counts = (idx >= 0).sum(-1)  # blocks per window
        flat = idx.flatten()
        indexes.append(flat[flat >= 0] + base)
        start = cu[-1]
        cu.extend(start + n for n in (counts[counts > 0] * unit).cumsum(0).tolist())
        base += t * gh * gw
    return torch.cat(indexes), cu
