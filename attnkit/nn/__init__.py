"""Drop-in nn.Module layers built on attnkit ops."""

from .linear import LightningAttention, LinearAttention, RMSNorm

__all__ = ["LightningAttention", "LinearAttention", "RMSNorm"]
