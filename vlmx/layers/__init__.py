"""Shared model layers; a family file composes these (STYLE.md rule 5).

attention  AttentionMetadata, PagedAttention, varlen_attention (backends)
rotary     RoPE, M-RoPE, vision 2D RoPE
norm       RMSNorm, make_norm
activation activations by HF name, act-and-mul
mlp        MergedLinear (stacked projections), GatedMLP, MLP
vision     patch embedding, ViT block, patch merger, vision index builders
decoder    Llama / Qwen2-style decoder, DecoderConfig, load_weights_into
"""
