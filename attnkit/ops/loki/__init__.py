"""Loki: low-rank-key sparse attention for decoding."""

from .api import LokiBasis, loki_attention_decode, loki_calibrate, loki_rotate
from .cache import LokiCache, loki_attention_decode_lowrank, loki_cache_append

__all__ = ["LokiBasis", "LokiCache", "loki_attention_decode", "loki_attention_decode_lowrank", "loki_cache_append",
           "loki_calibrate", "loki_rotate"]

from . import triton_register  # noqa: E402,F401  (registers the triton backend; kernels load lazily)
