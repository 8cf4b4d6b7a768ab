"""The GPT-2 module, its attention and loss kernels, and generation with a KV cache."""

from .gpt import GPT, Block, CausalSelfAttention, KVCache, MLP

__all__ = ["GPT", "Block", "CausalSelfAttention", "KVCache", "MLP"]
