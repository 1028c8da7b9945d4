"""A Llama / Qwen2-style decoder over a flat varlen batch with a paged KV cache.

embed -> N x [RMSNorm -> fused qkv -> RoPE / M-RoPE -> PagedAttention -> o_proj -> residual,
RMSNorm -> gated MLP -> residual] -> final RMSNorm. Bias flags, head_dim, rope settings, tied
embeddings and each layer's sliding window come from `DecoderConfig`, so other families can
reuse it.

Also here: `load_weights_into`, the checkpoint loader shared by the families, which stacks a
checkpoint's separate q/k/v and gate/up tensors into the fused layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmx.layers.attention import AttentionMetadata, PagedAttention
from vlmx.layers.mlp import GatedMLP, MergedLinear
from vlmx.layers.norm import RMSNorm
from vlmx.layers.rotary import RotaryEmbedding, apply_rotary


def rope_settings(cfg) -> tuple[float, float, list[int] | None]:
    """(rope_theta, linear scaling factor, mrope_section) of an HF text config.

    Reads `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (older configs).
    """
    params = getattr(cfg, "rope_parameters", None)
    if not params:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", "mrope"):
        factor = 1.0
    elif rope_type == "linear":
        factor = float(params["factor"])
    else:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported by vlmx's decoder; "
            "supported: 'default', 'mrope', 'linear'"
        )
    section = params.get("mrope_section")
    return float(params["rope_theta"]), factor, list(section) if section else None


def sliding_windows(cfg) -> tuple[int | None, ...]:
    """Per layer, the sliding window of an HF text config (None: the layer attends globally).

    As transformers decides: Qwen2 / Qwen2-VL / Qwen2.5-VL / Qwen3 configs keep `sliding_window`
    only with `use_sliding_window`, and their `layer_types` (set by the config from
    `max_window_layers`: layers `i >= max_window_layers` slide) name the sliding layers;
    Mistral (no `layer_types`) slides on every layer whenever `sliding_window` is set.
    """
    num_layers = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return (None,) * num_layers
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:
        return (int(window),) * num_layers
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown or len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types {list(layer_types)}: vlmx's decoder takes one of 'sliding_attention' "
            f"/ 'full_attention' for each of the {num_layers} layers"
        )
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


@dataclass(slots=True, frozen=True)
class DecoderDims:
    """The sizes every decoder config has (`DecoderConfig`, `GemmaConfig`); the runner reads
    them as `Model.config`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @staticmethod
    def fields_from_hf(cfg) -> dict:
        """Those sizes from an HF text config (Llama / Qwen2 / Gemma 3 field names)."""
        return {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_layers": cfg.num_hidden_layers,
            "num_heads": cfg.num_attention_heads,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "head_dim": getattr(cfg, "head_dim", None)
            or cfg.hidden_size // cfg.num_attention_heads,
            "rms_norm_eps": cfg.rms_norm_eps,
        }


@dataclass(slots=True, frozen=True)
class DecoderConfig(DecoderDims):
    rope_theta: float
    rope_scaling_factor: float = 1.0
    mrope_section: tuple[int, ...] | None = None  # set for M-RoPE (positions [3, T])
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    layer_windows: tuple[int | None, ...] = ()  # per layer sliding window; () = all global
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    mrope_interleaved: bool = False  # M-RoPE frequencies dealt t h w t h w ... (Qwen3-VL)

    def __post_init__(self) -> None:
        DecoderDims.__post_init__(self)  # NOTE: no zero-argument super() in a slots dataclass
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} must sum to head_dim / 2 "
                f"= {self.head_dim // 2}"
            )

    @classmethod
    def from_hf(
        cls,
        cfg,
        *,
        qkv_bias: bool | None = None,
        o_bias: bool | None = None,
        tie_word_embeddings: bool | None = None,
        default_mrope_section: list[int] | None = None,
    ) -> DecoderConfig:
        """From an HF text config (Llama / Qwen2 field names).

        `qkv_bias` / `o_bias` override `attention_bias` (Qwen2 has q/k/v bias and no o bias).
        """
        theta, factor, section = rope_settings(cfg)
        section = section or default_mrope_section
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            **DecoderDims.fields_from_hf(cfg),
            rope_theta=theta,
            rope_scaling_factor=factor,
            mrope_section=tuple(section) if section else None,
            hidden_act=getattr(cfg, "hidden_act", "silu"),
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
            o_bias=attention_bias if o_bias is None else o_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            layer_windows=sliding_windows(cfg),
            tie_word_embeddings=bool(
                getattr(cfg, "tie_word_embeddings", False)
                if tie_word_embeddings is None
                else tie_word_embeddings
            ),
        )


class DecoderAttention(nn.Module):
    """Matches HF `Qwen2VLAttention` / `LlamaAttention` with q/k/v fused into `qkv_proj`.

    x: [T, hidden] -> qkv [T, (num_heads + 2 * num_kv_heads) * head_dim] -> (`norm_qk`) -> RoPE
    -> paged attention -> o_proj -> [T, hidden]. Families with per-head q/k norms (Gemma 3)
    subclass it and override `norm_qk`.
    """

    def __init__(
        self,
        dims: DecoderDims,
        *,
        qkv_bias: bool,
        o_bias: bool,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        # NOTE: head counts and head_dim live on `self.attn`
        self.attn = PagedAttention(
            dims.num_heads, dims.num_kv_heads, dims.head_dim, scale, sliding_window
        )
        self.q_size = dims.num_heads * dims.head_dim
        self.kv_size = dims.num_kv_heads * dims.head_dim
        sizes = [self.q_size, self.kv_size, self.kv_size]
        self.qkv_proj = MergedLinear(dims.hidden_size, sizes, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, dims.hidden_size, bias=o_bias)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, num_heads, head_dim], k [T, num_kv_heads, head_dim] before RoPE: unchanged."""
        return q, k

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor, metadata: AttentionMetadata
    ) -> Tensor:
        """x [T, hidden], cos / sin [T, head_dim] -> [T, hidden]."""
        num_tokens, a = x.shape[0], self.attn
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.norm_qk(
            q.view(num_tokens, a.num_heads, a.head_dim),
            k.view(num_tokens, a.num_kv_heads, a.head_dim),
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(num_tokens, a.num_kv_heads, a.head_dim)
        out = self.attn(q, k, v, kv_cache, metadata)  # [T, num_heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class QKNormDecoderAttention(DecoderAttention):
    """Matches HF `Qwen3Attention` / `Qwen3VLTextAttention`: `DecoderAttention` with an RMSNorm
    over each head of q and of k (`q_norm`, `k_norm`, weight [head_dim]) before RoPE."""

    def __init__(self, dims: DecoderDims, **kwargs) -> None:
        super().__init__(dims, **kwargs)
        self.q_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps)
        self.k_norm = RMSNorm(dims.head_dim, dims.rms_norm_eps)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class DecoderLayer(nn.Module):
    """Matches HF `Qwen2VLDecoderLayer` / `LlamaDecoderLayer` / `Qwen3VLTextDecoderLayer`."""

    def __init__(self, cfg: DecoderConfig, sliding_window: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attention = QKNormDecoderAttention if cfg.qk_norm else DecoderAttention
        self.self_attn = attention(
            cfg,
            qkv_bias=cfg.qkv_bias,
            o_bias=cfg.o_bias,
            scale=cfg.head_dim**-0.5,
            sliding_window=sliding_window,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor, metadata: AttentionMetadata
    ) -> Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, metadata)
        h, x = self.post_attention_layernorm.add_forward(h, x)  # x += attn; h = norm(x)
        return x + self.mlp(h)


class DecoderModel(nn.Module):
    """Matches HF `Qwen2VLTextModel` / `Qwen2_5_VLTextModel` / `LlamaModel` on a flat batch.

    Parameter names follow the HF text model (`embed_tokens`, `layers.{i}.self_attn.qkv_proj`,
    `layers.{i}.mlp.gate_up_proj`, `norm`), so a checkpoint maps onto it by prefix only.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        windows = cfg.layer_windows or (None,) * cfg.num_layers
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim,
            cfg.rope_theta,
            list(cfg.mrope_section) if cfg.mrope_section else None,
            cfg.rope_scaling_factor,
            cfg.mrope_interleaved,
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] or [3, T] int64 (M-RoPE)
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # NOTE: one rotary table per call, shared by all layers; cast to the activations' dtype
        # as HF does before `apply_rotary_pos_emb`.
        cos, sin = self.rotary_emb(positions)
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        x = inputs_embeds
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, attn_metadata)
        return self.norm(x)


# (fused module, checkpoint module, part): a checkpoint's `*.q_proj.weight` is part 0 of ours
# `*.qkv_proj.weight`, and so on.
STACKED_PARAMS: tuple[tuple[str, str, int], ...] = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


def load_weights_into(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    map_name: Callable[[str], str | None],
) -> None:
    """Copy checkpoint tensors into `model`'s parameters; every parameter must be filled once.

    `map_name` turns a checkpoint name into a parameter name of `model` (None: skip the tensor).
    Parts of stacked layers (`STACKED_PARAMS`) go into their rows; a module with a
    `load_weight(param_name, tensor, shard)` method loads its own tensors (stacked or reshaped).
    Raises ValueError on an unexpected, duplicated, misshapen or missing weight.
    """
    params = dict(model.named_parameters())
    expected: set[tuple[str, int | None]] = set()
    for name in params:
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, MergedLinear):
            expected.update((name, i) for i in range(len(module.output_sizes)))
        else:
            expected.add((name, None))

    loaded: set[tuple[str, int | None]] = set()
    for ckpt_name, tensor in weights:
        name = map_name(ckpt_name)
        if name is None:
            continue
        shard = None
        for fused, part, idx in STACKED_PARAMS:
            candidate = name.replace(f".{part}.", f".{fused}.")
            if candidate != name and candidate in params:
                name, shard = candidate, idx
                break
        if name not in params:
            raise ValueError(
                f"unexpected weight {ckpt_name!r} in the checkpoint: {type(model).__name__} has "
                f"no parameter {name!r}; is the checkpoint of another architecture?"
            )
        if (name, shard) in loaded:
            raise ValueError(f"weight {ckpt_name!r} appears twice in the checkpoint")
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        if hasattr(module, "load_weight"):
            module.load_weight(param_name, tensor, shard)
        else:
            param = params[name]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"weight {ckpt_name!r} has shape {tuple(tensor.shape)}, but {name!r} "
                    f"expects {tuple(param.shape)}; does the config match the checkpoint?"
                )
            with torch.no_grad():
                param.copy_(tensor)
        loaded.add((name, shard))

    missing = sorted(f"{n}" if s is None else f"{n} (part {s})" for n, s in expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise ValueError(
            f"the checkpoint is missing {len(missing)} weight(s) of {type(model).__name__}: {shown}"
        )
