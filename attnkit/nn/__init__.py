"""Drop-in nn.Module layers built on attnkit ops."""

from .linear import LightningAttention, LinearAttention, RMSNorm
from .softmax import (
    GroupedQueryAttention,
    KVCache,
    MultiheadAttention,
    MultiQueryAttention,
    convert_mha_to_gqa,
    replace_multihead_attention,
)

__all__ = [
    "GroupedQueryAttention",
    "KVCache",
    "LightningAttention",
    "LinearAttention",
    "MultiQueryAttention",
    "MultiheadAttention",
    "RMSNorm",
    "convert_mha_to_gqa",
    "replace_multihead_attention",
]
