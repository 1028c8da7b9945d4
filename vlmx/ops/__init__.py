"""Kernels behind the attention layers: Triton paged attention / KV store, varlen FlashAttention.

Each module imports its backend lazily, so importing `vlmx.ops.*` works where the backend
(Triton, a CUDA build of torch) is missing; ask the module's `*_available(device)` first.
"""
