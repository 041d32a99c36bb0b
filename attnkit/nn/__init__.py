"""Drop-in nn.Module layers built on attnkit ops."""

from .linear import LightningAttention, LinearAttention, RMSNorm
from .loki import calibrate_loki, set_loki_bases
from .softmax import (
    GroupedQueryAttention,
    KVCache,
    LokiDecoding,
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
    "LokiDecoding",
    "MultiQueryAttention",
    "MultiheadAttention",
    "RMSNorm",
    "calibrate_loki",
    "convert_mha_to_gqa",
    "replace_multihead_attention",
    "set_loki_bases",
]
