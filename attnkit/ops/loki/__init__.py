"""Loki: low-rank-key sparse attention for decoding."""

from .api import LokiBasis, loki_attention_decode, loki_calibrate, loki_rotate

__all__ = ["LokiBasis", "loki_attention_decode", "loki_calibrate", "loki_rotate"]
